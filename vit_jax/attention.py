"""Attention weights of a ViT and their rollout (Abnar & Zuidema 2020) as maps over the image.

The model runs attention through `jax.nn.dot_product_attention`, which never materialises the
weights; here they are recomputed from each block's query and key projections, captured with
Flax's `capture_intermediates`, as softmax(q k^T / sqrt(head_dim)): the model itself is
untouched and pays nothing. Rollout: average the heads, add the identity (the residual path),
renormalise the rows, multiply through the layers. The map is the class token's row over the
patch tokens; a GAP model has no class token, so its map is the rollout averaged over all tokens
(`map_kind` says which).

A BiT ResNet has no attention: `attention_maps` gives its class activation map instead (Zhou et
al. 2016): the head applied at every position of the last feature map, for the top class. The
model averages exactly these positions into its logit, so the map shows where that logit comes
from.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models, models_bit, models_vit, predict


def _is_query_or_key(module: Any, method_name: str) -> bool:
  return (
    method_name == "__call__"
    and module.name in ("query", "key")
    and isinstance(module.parent, models_vit.MultiHeadDotProductAttention)
  )


@functools.partial(jax.jit, static_argnums=(0,))
def _weights(model: models_vit.VisionTransformer, params: Any, images: jax.Array) -> jax.Array:
  _, state = model.apply(
    {"params": params},
    images,
    train=False,
    capture_intermediates=_is_query_or_key,
    mutable=["intermediates"],
  )
  blocks = state["intermediates"]["Transformer"]
  out = []
  for i in range(model.num_layers):
    attn = blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]
    q, k = (attn[n]["__call__"][0].astype(jnp.float32) for n in ("query", "key"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    out.append(jax.nn.softmax(logits, axis=-1))
  return jnp.stack(out)


def attention_weights(
  model: models_vit.VisionTransformer, params: Any, images: np.ndarray
) -> np.ndarray:
  """[layers, batch, heads, tokens, tokens]: each block's attention, rows sum to 1."""
  return np.asarray(_weights(model, params, jnp.asarray(images, jnp.float32)))


def rollout(weights: np.ndarray) -> np.ndarray:
  """[layers, batch, heads, T, T] -> [batch, T, T]: how much each output token draws on each
  input token through every layer, the residual path counted as attention to oneself."""
  mixed = weights.mean(axis=2) + np.eye(weights.shape[-1])
  mixed = mixed / mixed.sum(axis=-1, keepdims=True)
  joint = mixed[0]
  for layer in mixed[1:]:
    joint = layer @ joint
  return joint


def map_kind(model: models.Model) -> str:
  """What `attention_maps` shows, in words, for a figure title."""
  if isinstance(model, models_bit.BiT):
    return "class activation map of the top class (a CNN has no attention)"
  if model.classifier == "token":
    return "attention rollout from the class token"
  return "attention rollout averaged over tokens (GAP model: no class token)"


def token_maps(model: models_vit.VisionTransformer, joint: np.ndarray) -> np.ndarray:
  """[batch, T, T] rollout -> [batch, grid, grid] over the patch tokens (for a hybrid, the
  patches of the stem's feature map), each map scaled to a maximum of 1."""
  if model.classifier == "token":
    scores = joint[:, 0, 1:]
  else:
    scores = joint.mean(axis=1)
  grid = int(round(np.sqrt(scores.shape[1])))
  if grid * grid != scores.shape[1]:
    raise ValueError(f"{scores.shape[1]} patch tokens do not form a square grid")
  maps = scores.reshape(-1, grid, grid)
  return maps / maps.max(axis=(1, 2), keepdims=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _feature_map_and_logits(
  model: models_bit.BiT, params: Any, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
  logits, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  return state["intermediates"]["feature_map"][0].astype(jnp.float32), logits


def class_activation_maps(model: models_bit.BiT, params: Any, images: np.ndarray) -> np.ndarray:
  """[batch, h, w] raw class activation maps of a BiT for its top class: the head's kernel and
  bias at every position of the final feature map, whose mean is the top logit."""
  features, logits = _feature_map_and_logits(model, params, jnp.asarray(images, jnp.float32))
  top = np.argmax(np.asarray(logits), axis=-1)
  head = params["head"]["conv2d"]
  kernel = np.asarray(head["kernel"], np.float32)[0, 0][:, top]  # [C, batch]
  bias = np.asarray(head["bias"], np.float32)[top]
  return np.einsum("bhwc,cb->bhw", np.asarray(features), kernel) + bias[:, None, None]


def attention_maps(model: models.Model, params: Any, images: np.ndarray) -> np.ndarray:
  """[batch, H, W, 3] model inputs -> [batch, H, W] maps in [0, 1] upsampled over the images:
  a ViT's attention rollout, a BiT's class activation map (its positive part)."""
  if isinstance(model, models_bit.BiT):
    maps = np.maximum(class_activation_maps(model, params, images), 0)
    maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
  else:
    maps = token_maps(model, rollout(attention_weights(model, params, images)))
  height, width = images.shape[1:3]
  return np.stack([predict.resize_bilinear(m[..., None], height, width)[..., 0] for m in maps])
