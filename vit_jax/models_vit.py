"""Flax Linen Vision Transformer whose parameter tree is the original Google checkpoints'.

Parameter names are the Linen names of google-research/vision_transformer (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`, `pre_logits`,
`head`), so loading an original `.npz` is the fixed pre-Linen rename in `checkpoint.py`.
Images are NHWC in [-1, 1].
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import models_resnet

Array = jax.Array
Dtype = Any

# The original checkpoints use LayerNorm epsilon 1e-6 (Flax's default; timm's too).
_LN_EPS = 1e-6


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x-mean)^2] is exact where E[x^2]-E[x]^2 loses bits on large means,
  # which keeps logits within 1e-5 of timm / Hugging Face.
  return nn.LayerNorm(
    epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
  )


# `remat_policy` names -> jax.checkpoint_policies: from least memory (recompute the whole block)
# to most (keep every matmul output, recompute only elementwise ops).
REMAT_POLICIES = (
  "nothing_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_saveable",
  "everything_saveable",
)


def get_remat_policy(name: str) -> Callable:
  """The jax.checkpoint policy called `name` (one of REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {name!r}")
  return getattr(jax.checkpoint_policies, name)


@jax.custom_vjp
def cotangent_boundary(x: Array) -> Array:
  """Identity whose gradient XLA computes once, as a buffer, instead of re-deriving it per use.

  Why: in the backward pass of a pre-LayerNorm stack, the residual stream's gradient at block i is
  a chain of elementwise adds over blocks L-1..i. XLA:CPU's fusion copies that whole chain into
  each of its consumers (the transposes feeding the weight-gradient matmuls), which is quadratic
  in depth (a quarter of a ViT-Ti/16 batch-8 training step on the CPU). An optimisation barrier does not stop it (XLA:CPU removes barriers
  before fusion); a conditional does, so the backward pass routes the gradient through one whose
  predicate XLA cannot fold. The values are exactly those without it.
  """
  return x


def _cotangent_boundary_fwd(x: Array) -> tuple[Array, None]:
  return x, None


def _cotangent_boundary_bwd(_, g: Array) -> tuple[Array]:
  # `keep` is always true; the barrier only hides that from the simplifier, which would fold a
  # constant predicate (or two identical branches) away. A replicated constant, so a sharded
  # gradient needs no communication. The zeros branch never runs.
  keep = jax.lax.optimization_barrier(jnp.array(True))
  return (jax.lax.cond(keep, lambda t: t, jnp.zeros_like, g),)


cotangent_boundary.defvjp(_cotangent_boundary_fwd, _cotangent_boundary_bwd)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (the class slot included) to the token sequence."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    shape = (1, inputs.shape[1], inputs.shape[2])
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    return inputs + pe.astype(inputs.dtype)


def padded_dot_product_attention(
  q: Array, k: Array, v: Array, *, implementation: Optional[str], multiple: int = 64
) -> Array:
  """`jax.nn.dot_product_attention` with the tokens padded to a multiple of `multiple`.

  cuDNN's fused attention rejects sequence lengths such as ViT's 197 (196 patches + class token);
  padding to 256 and masking the padded keys with `key_value_seq_lengths` computes exactly the
  same outputs for the real tokens, which are then sliced back out. [B, T, heads, head_dim].
  """
  t = q.shape[1]
  padded = -(-t // multiple) * multiple
  if padded == t:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
  lengths = jnp.full((q.shape[0],), t, jnp.int32)
  out = jax.nn.dot_product_attention(
    pad(q),
    pad(k),
    pad(v),
    implementation=implementation,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
  )
  return out[:, :t]


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dropout -> Dense -> Dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  # Keep only GELU's input for the backward pass and recompute the rest (its tanh) there: one
  # [batch, tokens, mlp_dim] tensor per block less to store, write and read back.
  recompute_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(
      nn.Dense,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
    )
    x = dense(self.mlp_dim)(inputs)
    # The checkpoints were trained with the tanh approximation (flax.linen.gelu's default).
    gelu = functools.partial(nn.gelu, approximate=self.gelu_approximate)
    x = (jax.checkpoint(gelu) if self.recompute_gelu else gelu)(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(inputs.shape[-1])(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the parameter layout of flax.linen.MultiHeadDotProductAttention.

  query/key/value kernels are (D, heads, head_dim), out is (heads, head_dim, D), as in the
  checkpoints. Without attention dropout it calls `jax.nn.dot_product_attention`, which XLA fuses
  (and which uses cuDNN flash attention on GPU when `attention_impl='cudnn'`, with the tokens
  padded to a multiple of 64 as cuDNN requires).
  """

  num_heads: int
  dropout_rate: float = 0.0
  attention_impl: Optional[str] = None  # None (XLA), "einsum" or "cudnn"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"hidden_size {features} is not divisible by num_heads {self.num_heads}")
    head_dim = features // self.num_heads
    dense = functools.partial(
      nn.DenseGeneral,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
    )
    q, k, v = (dense((self.num_heads, head_dim), name=n)(x) for n in ("query", "key", "value"))
    if (self.dropout_rate > 0.0 and not deterministic) or self.attention_impl == "einsum":
      # Dropout on the attention weights needs them materialised; on TPU this form also
      # compiles to a faster step than dot_product_attention (models.attention_impl_default).
      logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(head_dim).astype(q.dtype), k)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
      weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    elif self.attention_impl == "cudnn":
      out = padded_dot_product_attention(q, k, v, implementation="cudnn")
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return nn.DenseGeneral(
      features,
      axis=(-2, -1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name="out",
    )(out)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = True
  recompute_gelu: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop_path(self, x: Array, deterministic: bool) -> Array:
    """Stochastic depth: drops the whole residual branch per example."""
    if deterministic or self.drop_path_rate == 0.0:
      return x
    keep = 1.0 - self.drop_path_rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _layer_norm("LayerNorm_0", **kw)(inputs)
    x = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.attention_dropout_rate,
      attention_impl=self.attention_impl,
      name="MultiHeadDotProductAttention_0",
      **kw,
    )(x, deterministic=deterministic)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = inputs + self._drop_path(x, deterministic)
    y = _layer_norm("LayerNorm_1", **kw)(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dropout_rate=self.dropout_rate,
      gelu_approximate=self.gelu_approximate,
      recompute_gelu=self.recompute_gelu,
      name="MlpBlock_0",
      **kw,
    )(y, deterministic=deterministic)
    return x + self._drop_path(y, deterministic)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks, final LayerNorm (applied to every token)."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  gelu_approximate: bool = True
  recompute_gelu: bool = False
  attention_impl: Optional[str] = None
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  # cotangent_boundary before each block: pays on XLA:CPU only (models.get_model decides).
  cotangent_boundaries: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    # static_argnums=(2,): `deterministic` is a Python bool, not traced.
    block_cls = Encoder1DBlock
    if self.remat:
      block_cls = nn.remat(
        Encoder1DBlock, static_argnums=(2,), policy=get_remat_policy(self.remat_policy)
      )
    for i in range(self.num_layers):
      if self.cotangent_boundaries:
        x = cotangent_boundary(x)
      # Stochastic depth grows linearly with depth, 0 for the first block.
      rate = self.stochastic_depth * i / max(self.num_layers - 1, 1)
      x = block_cls(
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=rate,
        gelu_approximate=self.gelu_approximate,
        recompute_gelu=self.recompute_gelu,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x, not train)
    return _layer_norm("encoder_norm", self.dtype, self.param_dtype)(x)


class VisionTransformer(nn.Module):
  """ViT classifier. `num_classes` 0 or None returns the pooled (pre-head) features."""

  num_classes: Optional[int]
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  representation_size: Optional[int] = None
  classifier: str = "token"  # "token" (class token) or "gap" (global average pooling)
  gelu_approximate: bool = True
  recompute_gelu: bool = False  # MlpBlock's: less activation memory and traffic, same values
  head_bias_init: float = 0.0
  attention_impl: Optional[str] = None
  remat: bool = False
  # What a rematerialised block keeps for the backward pass: a name in REMAT_POLICIES.
  remat_policy: str = "nothing_saveable"
  cotangent_boundaries: bool = False  # Encoder's; models.get_model turns it on for XLA:CPU
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  model_name: Optional[str] = None
  # The hybrid ResNet stem (models_resnet.ResNetConfig, or a mapping / ConfigDict with
  # num_layers and width_factor, as the original `config.resnet`); None: patches of the image.
  resnet: Optional[Any] = None

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    if self.classifier not in ("token", "gap"):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    x = images.astype(self.dtype)
    resnet = models_resnet.resnet_config(self.resnet)
    if resnet is not None:  # patches are then cut from the stem's feature map
      x = models_resnet.resnet_stem(x, resnet, self.dtype)
    p = self.patch_size
    x = nn.Conv(
      self.hidden_size,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="embedding",
    )(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))  # row-major over (h, w), as the checkpoints
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
    x = Encoder(
      num_layers=self.num_layers,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      stochastic_depth=self.stochastic_depth,
      gelu_approximate=self.gelu_approximate,
      recompute_gelu=self.recompute_gelu,
      attention_impl=self.attention_impl,
      remat=self.remat,
      remat_policy=self.remat_policy,
      cotangent_boundaries=self.cotangent_boundaries,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="Transformer",
    )(x, train=train)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.Dense(
        self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_logits"
      )(x)
      x = jnp.tanh(x)
    if self.num_classes:
      x = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init),
        name="head",
      )(x)
    return x.astype(jnp.float32)
