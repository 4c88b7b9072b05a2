"""Input of every export: a checkpoint's parameters and its complete, validated metadata.

Convention: `flat` is {Linen-named '/'-joined path: float32 numpy array} (checkpoint.load_flat).
"""

import functools
import json
import math
import os
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_jax import checkpoint, models, models_resnet

Flat = dict[str, np.ndarray]
POSEMB = "Transformer/posembed_input/pos_embedding"
MEAN_STD = [0.5, 0.5, 0.5]  # the checkpoints' (x - 127.5) / 127.5 input scaling
# A BiT file does not say its resolution (a CNN takes any); BiT's upstream one unless told.
BIT_IMAGE_SIZE = 224


class ConversionError(checkpoint.CheckpointError):
  """A checkpoint that cannot be exported to the requested format (message says why)."""


def load_input(path: str) -> tuple[Flat, dict[str, Any]]:
  """(flat float32 params, metadata or {}) from an .npz, a training workdir or an orbax step."""
  params, metadata = checkpoint.load_for_inference(path)
  flat = flax.traverse_util.flatten_dict(dict(params), sep="/")
  return {k: np.asarray(v).astype(np.float32) for k, v in flat.items()}, dict(metadata or {})


def feature_side(size: int, arch: Mapping[str, Any]) -> int:
  """Side of what the patch conv sees for `size` px: the image, or the hybrid stem's map."""
  resnet = models_resnet.resnet_config(arch.get("resnet"))
  return size if resnet is None else resnet.feature_side(size)


def _grid_size(flat: Flat, classifier: str, path: str) -> int:
  """Side of the (square) patch grid the position embeddings were trained for."""
  tokens = flat[POSEMB].shape[1] - (1 if classifier == "token" else 0)
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise checkpoint.CheckpointError(
      f"{path}: {POSEMB} has {flat[POSEMB].shape[1]} tokens: not a square grid"
      f"{' plus a class token' if classifier == 'token' else ''}"
    )
  return grid


def _infer_metadata(flat: Flat, path: str, model_name: Optional[str]) -> dict[str, Any]:
  """Metadata for a file without its .json: the preset `model_name` plus what the file says."""
  if model_name is None:
    raise checkpoint.CheckpointError(
      f"{path}: no metadata file ({os.path.splitext(path)[0]}.json) beside it: pass "
      f"--model_name (one of {', '.join(models.MODEL_CONFIGS)})"
    )
  if model_name not in models.MODEL_CONFIGS:
    raise checkpoint.CheckpointError(
      f"{path}: unknown --model_name {model_name!r}; known: {', '.join(models.MODEL_CONFIGS)}"
    )
  rep = flat.get("pre_logits/kernel")
  head = flat.get("head/conv2d/kernel" if checkpoint.is_bit(flat) else "head/kernel")
  model = models.get_model(model_name, num_classes=0 if head is None else int(head.shape[-1]))
  if not models.is_bit(model):
    # The file decides the representation layer; gelu as the Google checkpoints were trained.
    model = model.clone(
      representation_size=None if rep is None else int(rep.shape[-1]), gelu_approximate=True
    )
  return models.model_metadata(model, image_size=None)  # the resolution: from the file, later


def _check_shapes(flat: Flat, meta: Mapping[str, Any], path: str) -> None:
  """Raises unless `flat` has exactly the keys and shapes of the model `meta` describes."""
  model = models.model_from_metadata(meta)
  size = meta["image_size"]
  try:
    abstract = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )["params"]
  except Exception as e:  # e.g. hidden_size not divisible by num_heads
    raise checkpoint.CheckpointError(f"{path}: metadata describes no valid model: {e}") from None
  want = {
    k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(dict(abstract), sep="/").items()
  }
  have = {k: tuple(v.shape) for k, v in flat.items()}
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
  problems += [
    f"{k}: file {have[k]}, model {want[k]}"
    for k in sorted(set(have) & set(want))
    if have[k] != want[k]
  ]
  if problems:
    raise checkpoint.CheckpointError(
      f"{path}: does not match model {meta.get('model_name')!r} "
      f"({len(problems)} differences; wrong --model_name?): " + "; ".join(problems[:6])
    )


def resolve_metadata(
  flat: Flat,
  metadata: Mapping[str, Any],
  path: str,
  *,
  model_name: Optional[str] = None,
  image_size: Optional[int] = None,
) -> dict[str, Any]:
  """Completes and validates the metadata of a checkpoint (see models.model_metadata).

  Without metadata, `model_name` is required; the image size then follows from the position
  embedding grid (a BiT's is `image_size` or BIT_IMAGE_SIZE), the class count from the head, the
  representation layer from `pre_logits`. Missing class names become `LABEL_i` (with a warning).
  Raises CheckpointError on mismatches.
  """
  bit = checkpoint.is_bit(flat)
  if not bit and ("embedding/kernel" not in flat or POSEMB not in flat):
    raise checkpoint.CheckpointError(
      f"{path}: not a ViT checkpoint (no embedding/kernel or {POSEMB}) nor a BiT one "
      f"(no {checkpoint.BIT_ROOT})"
    )
  if metadata:
    meta = json.loads(json.dumps(dict(metadata)))  # a deep copy
    if model_name is not None and meta.get("model_name") not in (None, model_name):
      raise checkpoint.CheckpointError(
        f"{path}: --model_name {model_name!r} differs from the metadata's {meta['model_name']!r}"
      )
    if "architecture" not in meta or "num_classes" not in meta:
      raise checkpoint.CheckpointError(f"{path}: metadata lacks 'architecture'/'num_classes'")
  else:
    meta = _infer_metadata(flat, path, model_name)
  arch = meta["architecture"]
  if models.is_bit(arch) != bit:
    family = lambda is_bit: "BiT ResNet" if is_bit else "ViT"
    raise checkpoint.CheckpointError(
      f"{path}: a {family(bit)} checkpoint, but the model {meta.get('model_name')!r} is a "
      f"{family(models.is_bit(arch))}: wrong --model_name?"
    )
  if bit:
    meta["image_size"] = int(image_size or meta.get("image_size") or BIT_IMAGE_SIZE)
    return _complete(flat, meta, path)
  if any(k.startswith("conv_root/") for k in flat) != bool(arch.get("resnet")):
    raise checkpoint.CheckpointError(
      f"{path}: {'a' if arch.get('resnet') else 'no'} ResNet stem in the model "
      f"{meta.get('model_name')!r}, {'none' if arch.get('resnet') else 'one'} in the file "
      "(conv_root/kernel): wrong --model_name?"
    )
  grid = _grid_size(flat, arch.get("classifier", "token"), path)
  # Input pixels per token side: the patch, times the hybrid stem's stride.
  pixels = arch["patch_size"] * models_resnet.stem_stride(arch.get("resnet"))
  size = image_size or meta.get("image_size") or grid * pixels
  tokens = feature_side(size, arch) // arch["patch_size"]  # per side: the patch conv is VALID
  if tokens != grid:
    # Exporting at another resolution would need resampled position embeddings: the original code
    # zooms the grid corner-aligned, timm and transformers interpolate bilinearly or bicubically
    # (up to 0.37 apart on a small grid), so the converter never does.
    raise checkpoint.CheckpointError(
      f"{path}: image size {size} gives a {tokens}x{tokens} patch grid, the position "
      f"embeddings are {grid}x{grid} "
      f"(image size {grid * pixels}); export at the trained resolution"
    )
  meta["image_size"] = int(size)
  return _complete(flat, meta, path)


def _complete(flat: Flat, meta: dict[str, Any], path: str) -> dict[str, Any]:
  """Checks the shapes against the model `meta` describes and fills in the class names."""
  _check_shapes(flat, meta, path)
  num_classes = meta["num_classes"] or 0
  names = meta.get("class_names")
  if num_classes and (not names or len(names) != num_classes):
    logging.warning(
      "%s: %s; using LABEL_0..LABEL_%d",
      path,
      "no class names" if not names else f"{len(names)} class names for {num_classes} classes",
      num_classes - 1,
    )
    names = [f"LABEL_{i}" for i in range(num_classes)]
  meta["class_names"] = [str(n) for n in names] if num_classes else None
  return meta
