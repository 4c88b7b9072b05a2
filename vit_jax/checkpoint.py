"""The original Google ViT and BiT `.npz` formats: load, strict merge, position-embedding resize,
save.

A Google `.npz` is a flat `np.savez` archive of `/`-joined parameter paths with the pre-Linen
numbering inside each encoder block (`MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`). The model (models_vit.py) uses the Linen numbering, so loading and saving is the
fixed rename `_PRE_LINEN` and its inverse. A BiT file (models_bit.py) has every key under
`resnet/` and names GroupNorm's parameters `gamma`/`beta`; the model's tree is the same without
the prefix, with Flax's `scale`/`bias`. No TensorFlow here: conversion and serving import this.
"""

import json
import os
import re
import zipfile
from typing import Any, Iterable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
import scipy.ndimage
from absl import logging
from flax import traverse_util

Params = Mapping[str, Any]

# Inside `encoderblock_{i}`: pre-Linen name in the file -> Linen name in the model.
_PRE_LINEN = {
  "LayerNorm_0": "LayerNorm_0",
  "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
  "LayerNorm_2": "LayerNorm_1",
  "MlpBlock_3": "MlpBlock_0",
}
_LINEN = {v: k for k, v in _PRE_LINEN.items()}
_BLOCK = re.compile(r"^encoderblock_\d+$")
_POSEMB = "Transformer/posembed_input/pos_embedding"
# Prefixes other producers put in front of the same tree (big_vision, old flax.optim files).
_PREFIXES = ("params/", "opt/target/")
# GroupNorm modules of the hybrid ResNet stem: published files store their scale and bias as
# (1, 1, 1, C) (vision_transformer #156, flax #1721); the model's are (C,).
_GROUPNORM = re.compile(r"(^|/)gn(_root|_proj|\d+)/(scale|bias)$")
# BiT: the root convolution's kernel, in the model's tree (a file has it under `resnet/`).
BIT_ROOT = "root_block/standardized_conv2d/kernel"
_BIT_PREFIX = "resnet/"
_BIT_GROUPNORM = re.compile(r"(^|/)group_norm/(gamma|beta|scale|bias)$")
_TO_FLAX = {"gamma": "scale", "beta": "bias"}
_TO_BIT = {v: k for k, v in _TO_FLAX.items()}


class CheckpointError(ValueError):
  """A checkpoint file that cannot be used: the message names the file and what is wrong."""


def _rename_blocks(flat: dict[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
  out = {}
  for key, value in flat.items():
    parts = key.split("/")
    for i in range(len(parts) - 1):
      if _BLOCK.match(parts[i]) and parts[i + 1] in table:
        parts[i + 1] = table[parts[i + 1]]
    out["/".join(parts)] = value
  return out


def is_bit(flat: Mapping[str, Any]) -> bool:
  """Whether flat `/`-joined parameters (the model's tree) are a BiT ResNet's."""
  return BIT_ROOT in flat


def _family(flat: Mapping[str, Any]) -> str:
  return "BiT ResNet" if is_bit(flat) else "ViT"


def _rename_groupnorm(flat: dict[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
  out = {}
  for key, value in flat.items():
    m = _BIT_GROUPNORM.search(key)
    out[key[: m.start(2)] + table.get(m.group(2), m.group(2)) if m else key] = value
  return out


def _from_bit_file(flat: dict[str, Any], path: str) -> dict[str, Any]:
  stray = sorted(k for k in flat if not k.startswith(_BIT_PREFIX))
  if stray:
    raise CheckpointError(
      f"{path}: a BiT checkpoint with arrays outside {_BIT_PREFIX!r}: {stray[:5]}"
    )
  return _rename_groupnorm({k[len(_BIT_PREFIX) :]: v for k, v in flat.items()}, _TO_FLAX)


def _to_float(key: str, arr: np.ndarray, path: str) -> np.ndarray:
  """float32 for every parameter; bfloat16 stored by np.savez comes back as 2-byte void."""
  if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
    return arr.view(ml_dtypes.bfloat16).astype(np.float32)
  if arr.dtype == ml_dtypes.bfloat16 or arr.dtype in (np.float16, np.float32, np.float64):
    return arr.astype(np.float32)
  raise CheckpointError(f"{path}: array {key!r} has dtype {arr.dtype}, expected a float type")


def load_flat(path: str) -> dict[str, np.ndarray]:
  """Reads an `.npz` into {linen/path: float32 array}, checking that it is a ViT file (plain or
  hybrid: the ResNet stem's GroupNorm parameters come back as (C,)) or a BiT file (its names
  become the model's: see the module docstring)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  flat = {}
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:  # Reading every array checks each CRC: truncation fails here.
        flat[key] = npz[key]
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise CheckpointError(
      f"{path}: not a readable .npz checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
    ) from None
  for prefix in _PREFIXES:
    if flat and all(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix) :]: v for k, v in flat.items()}
  if _BIT_PREFIX + BIT_ROOT in flat:
    return {k: _to_float(k, v, path) for k, v in _from_bit_file(flat, path).items()}
  if "embedding/kernel" not in flat:
    raise CheckpointError(
      f"{path}: not a ViT checkpoint (nor a BiT one): no 'embedding/kernel' (nor "
      f"'{_BIT_PREFIX + BIT_ROOT}') among its {len(flat)} arrays (first keys: {sorted(flat)[:5]})"
    )
  flat = {k: _to_float(k, v, path) for k, v in flat.items()}
  flat = {
    k: v.reshape(v.shape[-1:])
    if _GROUPNORM.search(k) and v.ndim == 4 and v.shape[:3] == (1, 1, 1)
    else v
    for k, v in flat.items()
  }
  return _rename_blocks(flat, _PRE_LINEN)


def load(path: str) -> dict[str, Any]:
  """Loads an original (or exported) `.npz` into the model's nested parameter tree."""
  return traverse_util.unflatten_dict(load_flat(path), sep="/")


def _flatten(params: Params) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(params), sep="/")


def inspect_params(
  *,
  params: Params,
  expected: Params,
  path: str = "<params>",
  allow_missing: Iterable[str] = (),
  allow_extra: Iterable[str] = (),
) -> None:
  """Logs the difference between two trees and raises unless every difference is allowed.

  `allow_missing` / `allow_extra` are regexes over `/`-joined keys: keys the model expects but
  the file lacks, and keys the file has but the model lacks.
  """
  have, want = set(_flatten(params)), set(_flatten(expected))
  missing, extra = sorted(want - have), sorted(have - want)
  if missing:
    logging.info("%s: in the model, not in the file: %s", path, missing)
  if extra:
    logging.info("%s: in the file, not in the model: %s", path, extra)
  bad_missing = [k for k in missing if not any(re.fullmatch(p, k) for p in allow_missing)]
  bad_extra = [k for k in extra if not any(re.fullmatch(p, k) for p in allow_extra)]
  if bad_missing or bad_extra:
    raise CheckpointError(
      f"{path}: does not match the model (a checkpoint of another model?).\n"
      f"  in the model, not in the file ({len(bad_missing)}): {bad_missing[:10]}\n"
      f"  in the file, not in the model ({len(bad_extra)}): {bad_extra[:10]}"
    )


def interpolate_posembed(posemb: np.ndarray, num_tokens: int, has_class_token: bool) -> np.ndarray:
  """Resamples a (1, tokens, D) position embedding to `num_tokens`, keeping the class slot.

  The grid is zoomed bilinearly with corner-aligned sampling (scipy.ndimage.zoom, order=1), as
  google-research/vision_transformer does; equal to torch bilinear with align_corners=True.
  """
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embedding must be (1, tokens, D), got {posemb.shape}")
  tok, grid = (posemb[:, :1], posemb[0, 1:]) if has_class_token else (posemb[:, :0], posemb[0])
  n_new = num_tokens - tok.shape[1]
  gs_old, gs_new = int(round(np.sqrt(len(grid)))), int(round(np.sqrt(n_new)))
  if gs_old**2 != len(grid) or gs_new**2 != n_new:
    raise ValueError(f"position embedding grids must be square: {len(grid)} -> {n_new} tokens")
  grid = grid.reshape(gs_old, gs_old, -1)
  zoom = (gs_new / gs_old, gs_new / gs_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, gs_new * gs_new, -1)
  return np.concatenate([tok, grid], axis=1).astype(posemb.dtype)


def load_pretrained(
  *, pretrained_path: str, init_params: Params, model_config: Any
) -> dict[str, Any]:
  """Loads a pretrained `.npz` for fine-tuning into the shapes of `init_params`.

  - the head (`head/...`) always comes from `init_params` (any class count; the in21k heads are
    zeros);
  - a ViT file for a BiT model, or the reverse, is an error saying so;
  - `pre_logits` is dropped when the model has no representation layer ("drop-head variant"),
    kept when it has one;
  - the position embeddings are resampled to the model's grid, the class slot kept;
  - anything else that differs (keys or shapes) is an error naming the file, key and shapes.
  Every change is logged. `model_config` needs `classifier` and `representation_size`
  (a models_vit.VisionTransformer works).
  """
  path = os.fspath(pretrained_path)
  flat = load_flat(path)
  init = {k: np.asarray(v) if hasattr(v, "shape") else v for k, v in _flatten(init_params).items()}
  logging.info(
    "load_pretrained: %s (%d arrays, %s parameters)",
    path,
    len(flat),
    f"{sum(v.size for v in flat.values()):,}",
  )

  if is_bit(flat) != is_bit(init):
    raise CheckpointError(
      f"{path}: a {_family(flat)} checkpoint, but the model is a {_family(init)}"
      f"{' (' + model_config.model_name + ')' if getattr(model_config, 'model_name', None) else ''}"
      ": pick the model_name the file was trained as"
    )
  has_rep = getattr(model_config, "representation_size", None) is not None
  if not has_rep and any(k.startswith("pre_logits/") for k in flat):
    logging.info("load_pretrained: drop-head variant: dropping pre_logits from %s", path)
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
  # ViT: head/kernel, head/bias; BiT: head/conv2d/kernel, head/conv2d/bias.
  for key in sorted({k for k in [*init, *flat] if k.startswith("head/")}):
    if key in init:
      old = flat.get(key)
      logging.info(
        "load_pretrained: head reset: %s %s -> %s (model init)",
        key,
        None if old is None else old.shape,
        init[key].shape,
      )
      flat[key] = init[key]
    else:  # a feature extractor (num_classes=0) keeps no head
      logging.info("load_pretrained: dropping %s: the model has no head", key)
      del flat[key]
  inspect_params(
    params=traverse_util.unflatten_dict(flat, sep="/"),
    expected=traverse_util.unflatten_dict(init, sep="/"),
    path=path,
  )

  if _POSEMB in init and flat[_POSEMB].shape != init[_POSEMB].shape:
    old, new = flat[_POSEMB].shape, init[_POSEMB].shape
    if old[2] != new[2]:
      raise CheckpointError(f"{path}: {_POSEMB} has width {old[2]}, the model {new[2]}")
    flat[_POSEMB] = interpolate_posembed(
      flat[_POSEMB], new[1], has_class_token=getattr(model_config, "classifier", "token") == "token"
    )
    logging.info("load_pretrained: resized variant: %s %s -> %s", _POSEMB, old, new)

  for key, want in init.items():
    if flat[key].shape != want.shape:
      raise CheckpointError(
        f"{path}: {key} has shape {flat[key].shape} in the file, the model "
        f"expects {want.shape} (a checkpoint of another model size?)"
      )
    flat[key] = flat[key].astype(want.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def save_npz(params: Params, path: str, *, metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes `params` in the original format (float32), atomically: a ViT's with pre-Linen names,
  a BiT's under `resnet/` with `gamma`/`beta`.

  The file loads with `load`, timm's `load_pretrained` (ViT) or `_load_weights` (BiT) and
  big_vision. `metadata` (e.g. class names, model name, image size) goes to a JSON file beside it
  (`x.npz` -> `x.json`): the `.npz` itself holds parameters only, so other readers find no
  unexpected keys.
  """
  path = os.fspath(path)
  flat = {k: np.asarray(v, dtype=np.float32) for k, v in _flatten(params).items()}
  if is_bit(flat):
    flat = {_BIT_PREFIX + k: v for k, v in _rename_groupnorm(flat, _TO_BIT).items()}
  else:
    flat = _rename_blocks(flat, _LINEN)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a tmp name
    np.savez(f, **flat)
  os.replace(tmp, path)  # a killed process leaves the old file or the new one, never half
  if metadata is not None:
    meta_path = os.path.splitext(path)[0] + ".json"
    with open(meta_path + ".tmp", "w") as f:
      json.dump(dict(metadata), f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def chosen_by(metadata: dict[str, Any]) -> Optional[str]:
  """What chose a checkpoint, from the metadata `run_state.export_best` writes beside
  `best_params.npz` ('val_accuracy on the val split, best at step 800'); None for other files."""
  if not metadata.get("best_metric"):
    return None
  return (
    f"{metadata['best_metric']} on the {metadata.get('chosen_on', 'val')} split, best at step "
    f"{metadata.get('best_step')}"
  )


def load_metadata(path: str) -> dict[str, Any]:
  """The JSON written beside an `.npz` by `save_npz`, or {} when there is none."""
  meta_path = os.path.splitext(os.fspath(path))[0] + ".json"
  if not os.path.exists(meta_path):
    return {}
  with open(meta_path) as f:
    return json.load(f)


def _orbax_params(step_dir: str) -> dict[str, Any]:
  """The `params` of a training checkpoint step folder, as numpy on the host (any topology)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (only this path needs it)

  item = os.path.join(step_dir, "default")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(item).item_metadata.tree
  if "params" not in tree:
    raise CheckpointError(f"{step_dir}: an orbax checkpoint without 'params'")
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
  out = ckptr.restore(
    item,
    args=ocp.args.PyTreeRestore(
      item={"params": tree["params"]}, restore_args={"params": restore_args}, partial_restore=True
    ),
  )
  return jax.tree.map(lambda x: np.asarray(x, np.float32), out["params"])


def load_for_inference(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, metadata) from an `.npz`, a training workdir, or an orbax step folder.

  A finished workdir gives the params its run chose (`best_params.npz`, with config.best_metric)
  or else its final `params.npz`; an unfinished one, its latest checkpoint.
  Metadata (model, image size, class names) comes from the JSON beside the `.npz` or the run's
  `run.json`; it is {} for an original Google file.
  """
  path = os.fspath(path).rstrip("/")
  if os.path.isfile(path):
    return load(path), load_metadata(path)
  for name in ("best_params.npz", "params.npz"):
    npz = os.path.join(path, name)
    if os.path.isfile(npz):
      return load(npz), load_metadata(npz)
  workdir, step_dir = path, None
  if os.path.basename(path).isdigit():
    step_dir, workdir = path, os.path.dirname(os.path.dirname(path))
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    steps = sorted(int(d) for d in os.listdir(os.path.join(path, "checkpoints")) if d.isdigit())
    if steps:
      step_dir = os.path.join(path, "checkpoints", str(steps[-1]))
  if step_dir is None or not os.path.isdir(os.path.join(step_dir, "default")):
    raise CheckpointError(
      f"{path}: not a checkpoint: expected an .npz file, a training workdir "
      "(with params.npz or checkpoints/), or an orbax step folder"
    )
  meta = {}
  run_json = os.path.join(workdir, "run.json")
  if os.path.isfile(run_json):
    with open(run_json) as f:
      meta = {k: v for k, v in json.load(f).items() if k != "config"}
  logging.info("load_for_inference: %s", step_dir)
  return _orbax_params(step_dir), meta
