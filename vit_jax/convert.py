"""Exports a Flax ViT or BiT ResNet (the original Google trees) to timm, Hugging Face and ONNX.

`convert()` reads a checkpoint, writes a folder for the chosen library (timm: `model.safetensors`
+ timm's hub `config.json`; hf: ViTConfig + safetensors + preprocessor config; onnx: the timm model
traced by `torch.onnx.export`, its metadata in the file), loads it back and checks its outputs
against the Flax model; the folder appears only when the check passes. What a format cannot hold
(`pre_logits` in timm, a GAP, hybrid or BiT model in hf, ...) is an error, never different
outputs. A BiT exports as timm's ResNetV2 (`resnetv2_50x1_bit`, ...).
How each export loads: checkpoints/README.md.

Nothing here imports TensorFlow; torch, timm and transformers are imported when used.
Convention: `flat` is {Linen-named '/'-joined path: float32 numpy array} (checkpoint.load_flat).
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_jax import checkpoint, models, models_bit, models_resnet

Flat = dict[str, np.ndarray]
FORMATS = ("timm", "hf")  # the PyTorch libraries
ALL_FORMATS = FORMATS + ("onnx",)  # what convert() writes
DEFAULT_TOLERANCE = 1e-4
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
_POSEMB = "Transformer/posembed_input/pos_embedding"
_MEAN_STD = [0.5, 0.5, 0.5]  # the checkpoints' (x - 127.5) / 127.5 input scaling
# A BiT file does not say its resolution (a CNN takes any); BiT's upstream one unless told.
BIT_IMAGE_SIZE = 224


class ConversionError(checkpoint.CheckpointError):
  """A checkpoint that cannot be exported to the requested format (message says why)."""


class ParityError(RuntimeError):
  """The exported model's outputs differ from the Flax model's by more than the tolerance."""


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  output_dir: str
  format: str
  outputs: str  # "logits" or "features"
  max_abs_diff: Optional[float]  # None when the check was skipped
  num_images: int


# --------------------------------------------------------------------------------------------
# Input: parameters and complete metadata.


def _load_input(path: str) -> tuple[Flat, dict[str, Any]]:
  """(flat float32 params, metadata or {}) from an .npz, a training workdir or an orbax step."""
  params, metadata = checkpoint.load_for_inference(path)
  flat = flax.traverse_util.flatten_dict(dict(params), sep="/")
  return {k: np.asarray(v).astype(np.float32) for k, v in flat.items()}, dict(metadata or {})


def _feature_side(size: int, arch: Mapping[str, Any]) -> int:
  """Side of what the patch conv sees for `size` px: the image, or the hybrid stem's map."""
  resnet = models_resnet.resnet_config(arch.get("resnet"))
  return size if resnet is None else resnet.feature_side(size)


def _grid_size(flat: Flat, classifier: str, path: str) -> int:
  """Side of the (square) patch grid the position embeddings were trained for."""
  tokens = flat[_POSEMB].shape[1] - (1 if classifier == "token" else 0)
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise checkpoint.CheckpointError(
      f"{path}: {_POSEMB} has {flat[_POSEMB].shape[1]} tokens: not a square grid"
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
  if not bit and ("embedding/kernel" not in flat or _POSEMB not in flat):
    raise checkpoint.CheckpointError(
      f"{path}: not a ViT checkpoint (no embedding/kernel or {_POSEMB}) nor a BiT one "
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
  tokens = _feature_side(size, arch) // arch["patch_size"]  # per side: the patch conv is VALID
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


# --------------------------------------------------------------------------------------------
# Key mappings. Flax: Dense kernels (in, out), Conv HWIO, attention (D, heads, head_dim).
# torch: Linear weights (out, in), Conv OIHW.


class _Params:
  """Read access to `flat` that remembers which keys were used (nothing may be left over)."""

  def __init__(self, flat: Flat, path: str):
    self._flat, self._path, self._used = flat, path, set()

  def __call__(self, key: str) -> np.ndarray:
    self._used.add(key)
    return self._flat[key]

  def drop(self, prefix: str) -> None:
    self._used.update(k for k in self._flat if k.startswith(prefix))

  def check_all_used(self) -> None:
    left = sorted(set(self._flat) - self._used)
    if left:
      raise ConversionError(f"{self._path}: parameters with no place in the export: {left[:8]}")


def _linear(kernel: np.ndarray) -> np.ndarray:
  return kernel.T


def _attn_in(kernel: np.ndarray) -> np.ndarray:
  """(D, heads, head_dim) -> torch (heads*head_dim, D); head-major like torch's reshape."""
  return kernel.reshape(kernel.shape[0], -1).T


def _attn_out(kernel: np.ndarray) -> np.ndarray:
  """(heads, head_dim, D) -> torch (D, heads*head_dim)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def _conv(kernel: np.ndarray) -> np.ndarray:
  return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def _block(i: int) -> str:
  return f"Transformer/encoderblock_{i}"


def timm_state_dict(flat: Flat, meta: Mapping[str, Any], path: str = "<params>") -> Flat:
  """timm `VisionTransformer` state dict (numpy) for a model `timm_model_args(meta)` builds; for
  a BiT, timm `ResNetV2`'s (`timm_bit_model`)."""
  if models.is_bit(meta["architecture"]):
    return _timm_bit_state_dict(_Params(flat, path), meta["architecture"], meta["num_classes"])
  if meta["architecture"]["representation_size"] is not None:
    raise ConversionError(
      f"{path}: has a representation layer (pre_logits, tanh before the head) that timm 1.x "
      "cannot represent; use --format hf (exports the backbone with pre_logits as the pooler), "
      "or fine-tune with representation_size=None"
    )
  p = _Params(flat, path)
  sd = _timm_backbone(p, meta["architecture"].get("resnet"))
  sd |= {
    "patch_embed.proj.weight": _conv(p("embedding/kernel")),
    "patch_embed.proj.bias": p("embedding/bias"),
    "pos_embed": p(_POSEMB),
  }
  if meta["architecture"]["classifier"] == "token":
    sd["cls_token"] = p("cls")
  for i in range(meta["architecture"]["num_layers"]):
    b, t = _block(i), f"blocks.{i}."
    attn = f"{b}/MultiHeadDotProductAttention_0"
    sd[t + "norm1.weight"], sd[t + "norm1.bias"] = (
      p(f"{b}/LayerNorm_0/scale"),
      p(f"{b}/LayerNorm_0/bias"),
    )
    sd[t + "attn.qkv.weight"] = np.concatenate(
      [_attn_in(p(f"{attn}/{n}/kernel")) for n in ("query", "key", "value")]
    )
    sd[t + "attn.qkv.bias"] = np.concatenate(
      [p(f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    )
    sd[t + "attn.proj.weight"] = _attn_out(p(f"{attn}/out/kernel"))
    sd[t + "attn.proj.bias"] = p(f"{attn}/out/bias")
    sd[t + "norm2.weight"], sd[t + "norm2.bias"] = (
      p(f"{b}/LayerNorm_1/scale"),
      p(f"{b}/LayerNorm_1/bias"),
    )
    for j, name in enumerate(("fc1", "fc2")):
      sd[f"{t}mlp.{name}.weight"] = _linear(p(f"{b}/MlpBlock_0/Dense_{j}/kernel"))
      sd[f"{t}mlp.{name}.bias"] = p(f"{b}/MlpBlock_0/Dense_{j}/bias")
  sd["norm.weight"] = p("Transformer/encoder_norm/scale")
  sd["norm.bias"] = p("Transformer/encoder_norm/bias")
  if meta["num_classes"]:
    sd["head.weight"], sd["head.bias"] = _linear(p("head/kernel")), p("head/bias")
  p.check_all_used()
  return sd


def _timm_backbone(p: _Params, resnet: Optional[Mapping[str, Any]]) -> Flat:
  """The hybrid stem as timm's ResNetV2 names it inside `patch_embed.backbone` (the root alone
  is timm's stem Sequential; with stages, a ResNetV2 whose stem is `stem`)."""
  if not resnet:
    return {}
  root = "patch_embed.backbone." + ("stem." if resnet["num_layers"] else "")
  sd = {
    root + "conv.weight": _conv(p("conv_root/kernel")),
    root + "norm.weight": p("gn_root/scale"),
    root + "norm.bias": p("gn_root/bias"),
  }
  for s, units in enumerate(resnet["num_layers"]):
    for u in range(units):
      src, dst = f"block{s + 1}/unit{u + 1}/", f"patch_embed.backbone.stages.{s}.blocks.{u}."
      for r in (1, 2, 3):
        sd[f"{dst}conv{r}.weight"] = _conv(p(f"{src}conv{r}/kernel"))
        sd[f"{dst}norm{r}.weight"] = p(f"{src}gn{r}/scale")
        sd[f"{dst}norm{r}.bias"] = p(f"{src}gn{r}/bias")
      if u == 0:
        sd[f"{dst}downsample.conv.weight"] = _conv(p(f"{src}conv_proj/kernel"))
        sd[f"{dst}downsample.norm.weight"] = p(f"{src}gn_proj/scale")
        sd[f"{dst}downsample.norm.bias"] = p(f"{src}gn_proj/bias")
  return sd


def _timm_bit_state_dict(p: _Params, arch: Mapping[str, Any], num_classes: int) -> Flat:
  """A BiT's parameters by timm ResNetV2's names (as timm's `_load_weights` maps the files)."""
  sd = {"stem.conv.weight": _conv(p("root_block/standardized_conv2d/kernel"))}
  for s, units in enumerate(arch["resnet"]["num_layers"]):
    for u in range(units):
      src, dst = f"block{s + 1}/unit{u + 1:02d}/", f"stages.{s}.blocks.{u}."
      for r, letter in enumerate("abc", 1):
        sd[f"{dst}conv{r}.weight"] = _conv(p(f"{src}{letter}/standardized_conv2d/kernel"))
        sd[f"{dst}norm{r}.weight"] = p(f"{src}{letter}/group_norm/scale")
        sd[f"{dst}norm{r}.bias"] = p(f"{src}{letter}/group_norm/bias")
      if u == 0:
        sd[f"{dst}downsample.conv.weight"] = _conv(p(f"{src}a/proj/standardized_conv2d/kernel"))
  sd["norm.weight"], sd["norm.bias"] = p("group_norm/scale"), p("group_norm/bias")
  if num_classes:
    sd["head.fc.weight"] = _conv(p("head/conv2d/kernel"))
    sd["head.fc.bias"] = p("head/conv2d/bias")
  p.check_all_used()
  return sd


# timm's registered BiT models, by (stage depths, width factor).
_TIMM_BITS = {
  (models_bit.DEPTHS[depth], float(width)): f"resnetv2_{depth}x{width}_bit"
  for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
}


def timm_bit_model(resnet: Mapping[str, Any], num_classes: int) -> "torch.nn.Module":  # noqa: F821
  """timm's ResNetV2 for the BiT `resnet` ({num_layers, width_factor}), built as timm builds its
  `resnetv2_*_bit` models (fixed padding, StdConv2d) but with the original's standardisation
  epsilon (1e-10, not timm's 1e-8): kernels whose variance nears 1e-8 would otherwise differ."""
  check_import_order()
  from timm.layers import StdConv2d  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2  # pylint: disable=g-import-not-at-top

  cfg = models_resnet.resnet_config(resnet)
  return resnetv2.ResNetV2(
    layers=list(cfg.num_layers),
    num_classes=num_classes,
    width_factor=cfg.width_factor,
    stem_type="fixed",
    conv_layer=functools.partial(StdConv2d, eps=models_bit.WS_EPS),
  )


def _timm_bit_config(meta: Mapping[str, Any]) -> dict[str, Any]:
  """config.json for a BiT: a registered architecture also loads with `timm.create_model` (with
  timm's epsilon, see timm_bit_model); any other (BiT-tiny, changed depths) is labelled as the
  closest and loads with `load_timm` only."""
  cfg = models_resnet.resnet_config(meta["architecture"]["resnet"])
  num_classes, size = meta["num_classes"] or 0, meta["image_size"]
  features = cfg.width * (4 * 2 ** (len(cfg.num_layers) - 1) if cfg.num_layers else 1)
  return dict(
    architecture=_TIMM_BITS.get((cfg.num_layers, cfg.width_factor), "resnetv2_50x1_bit"),
    num_classes=num_classes,
    num_features=features,
    global_pool="avg",
    model_args=dict(num_classes=num_classes),
    pretrained_cfg=timm_pretrained_cfg(
      size, num_classes, fixed_size=False, first_conv="stem.conv", classifier="head.fc"
    ),
    label_names=meta["class_names"] or [],
    vit_jax=dict(model_name=meta.get("model_name"), architecture=meta["architecture"]),
  )


def timm_pretrained_cfg(
  size: int, num_classes: int, *, fixed_size: bool, first_conv: str, classifier: str
) -> dict[str, Any]:
  """timm's pretrained_cfg of an export: our preprocessing (bilinear resize, [-1, 1])."""
  return dict(
    custom_load=False,
    input_size=[3, size, size],
    fixed_input_size=fixed_size,
    interpolation="bilinear",
    crop_pct=1.0,
    crop_mode="center",
    mean=_MEAN_STD,
    std=_MEAN_STD,
    num_classes=num_classes,
    pool_size=None,
    first_conv=first_conv,
    classifier=classifier,
  )


def timm_backbone(resnet: Mapping[str, Any]) -> "torch.nn.Module":  # noqa: F821
  """timm's module for the hybrid stem `resnet` ({num_layers, width_factor}), as timm's own
  hybrid ViTs build it (`vision_transformer_hybrid._resnetv2`: SAME padding, no pre-activation),
  with the Flax GroupNorm epsilon (1e-6) so that the outputs match."""
  check_import_order()
  from timm.layers import GroupNormAct, StdConv2dSame  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2  # pylint: disable=g-import-not-at-top

  cfg = models_resnet.resnet_config(resnet)
  conv = functools.partial(StdConv2dSame, eps=1e-8)
  norm = functools.partial(GroupNormAct, num_groups=32, eps=1e-6)
  if not cfg.num_layers:
    return resnetv2.create_resnetv2_stem(
      3, out_chs=cfg.width, stem_type="same", preact=False, conv_layer=conv, norm_layer=norm
    )
  return resnetv2.ResNetV2(
    layers=list(cfg.num_layers),
    num_classes=0,
    global_pool="",
    width_factor=cfg.width_factor,
    preact=False,
    stem_type="same",
    conv_layer=conv,
    norm_layer=norm,
  )


# timm's registered hybrids (vision_transformer_hybrid.py), by (stem stages, width factor, width,
# depth, heads, patch): `timm.create_model('local-dir:' + dir)` builds these from the label.
_TIMM_HYBRIDS = {
  ((), 1.0, 192, 12, 3, 8): "vit_tiny_r_s16_p8",
  ((2, 2, 2, 2), 1.0, 384, 12, 6, 1): "vit_small_r26_s32",
  ((2, 2, 2, 2), 1.0, 768, 12, 12, 1): "vit_base_r26_s32",
  ((3, 4, 9), 1.0, 768, 12, 12, 1): "vit_base_r50_s16",
  ((3, 4, 6, 3), 1.0, 1024, 24, 16, 1): "vit_large_r50_s32",
}


def _timm_architecture(arch: Mapping[str, Any], image_size: int) -> str:
  """The closest registered timm name (only a label: `model_args` fix the architecture; a hybrid
  that timm does not register loads with `load_timm` only)."""
  if arch.get("resnet"):
    resnet = models_resnet.resnet_config(arch["resnet"])
    prefix = _TIMM_HYBRIDS.get(
      (
        resnet.num_layers,
        resnet.width_factor,
        arch["hidden_size"],
        arch["num_layers"],
        arch["num_heads"],
        arch["patch_size"],
      )
    )
    names = [f"{prefix}_{res}" for res in (image_size, 224)] if prefix else []
  else:
    sizes = {
      (192, 12, 3): "tiny",
      (384, 12, 6): "small",
      (768, 12, 12): "base",
      (1024, 24, 16): "large",
      (1280, 32, 16): "huge",
    }
    size = sizes.get((arch["hidden_size"], arch["num_layers"], arch["num_heads"]))
    names = (
      [f"vit_{size}_patch{arch['patch_size']}_{res}" for res in (image_size, 224)] if size else []
    )
  return next((name for name in names if _timm_is_model(name)), "vit_base_patch16_224")


def _timm_is_model(name: str) -> bool:
  check_import_order()
  import timm  # pylint: disable=g-import-not-at-top

  return timm.is_model(name)


def timm_model_args(meta: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments of timm's `VisionTransformer` for the model `meta` describes."""
  arch = meta["architecture"]
  mlp_ratio = arch["mlp_dim"] / arch["hidden_size"]
  if int(arch["hidden_size"] * mlp_ratio) != arch["mlp_dim"]:  # timm: int(dim * mlp_ratio)
    raise ConversionError(
      f"mlp_dim {arch['mlp_dim']} is not expressible as a timm mlp_ratio of "
      f"hidden_size {arch['hidden_size']}"
    )
  if arch.get("resnet"):
    side = _feature_side(meta["image_size"], arch)
    if side % arch["patch_size"]:
      raise ConversionError(
        f"image size {meta['image_size']}: the ResNet stem's {side}x{side} feature map is not "
        f"a multiple of the patch size {arch['patch_size']}, which timm's HybridEmbed "
        "requires; train at a size where it is"
      )
  gap = arch["classifier"] == "gap"
  return dict(
    img_size=meta["image_size"],
    patch_size=arch["patch_size"],
    embed_dim=arch["hidden_size"],
    depth=arch["num_layers"],
    num_heads=arch["num_heads"],
    mlp_ratio=mlp_ratio,
    num_classes=meta["num_classes"] or 0,
    qkv_bias=True,
    no_embed_class=False,
    pre_norm=False,
    # gap: the Flax model normalises every token, then averages; fc_norm=False keeps timm's
    # norm before the pooling (fc_norm=None would move it after and leave fc_norm unloaded).
    class_token=not gap,
    global_pool="avg" if gap else "token",
    fc_norm=False,
    act_layer="gelu_tanh" if arch["gelu_approximate"] else "gelu",
  )


def timm_config(meta: Mapping[str, Any]) -> dict[str, Any]:
  """config.json in timm's hub layout (what timm's save_for_hf writes)."""
  if models.is_bit(meta["architecture"]):
    return _timm_bit_config(meta)
  args = timm_model_args(meta)
  size = meta["image_size"]
  return dict(
    architecture=_timm_architecture(meta["architecture"], size),
    num_classes=args["num_classes"],
    num_features=args["embed_dim"],
    global_pool=args["global_pool"],
    model_args=args,
    pretrained_cfg=timm_pretrained_cfg(
      size,
      args["num_classes"],
      fixed_size=True,
      first_conv="patch_embed.backbone."
      + ("stem.conv" if (meta["architecture"].get("resnet") or {}).get("num_layers") else "conv")
      if meta["architecture"].get("resnet")
      else "patch_embed.proj",
      classifier="head",
    ),
    label_names=meta["class_names"] or [],
    vit_jax=dict(model_name=meta.get("model_name"), architecture=meta["architecture"]),
  )


def _hf_outputs(flat: Flat, meta: Mapping[str, Any], path: str) -> str:
  """'logits' (ViTForImageClassification) or 'features' (ViTModel with the pre_logits pooler)."""
  arch = meta["architecture"]
  if models.is_bit(arch):
    raise ConversionError(
      f"{path}: a BiT ResNet: --format hf exports ViTs only (not transformers' "
      "BitForImageClassification); use --format timm or onnx"
    )
  if arch.get("resnet"):
    raise ConversionError(
      f"{path}: a ResNet+ViT hybrid: transformers {_transformers_version()} has no ViT with a "
      "ResNet stem that reads this layout (ViTHybrid is gone); use --format timm"
    )
  if arch["classifier"] != "token":
    raise ConversionError(
      f"{path}: classifier '{arch['classifier']}' (global average pooling): Hugging Face ViT "
      "classifies the class token only; use --format timm"
    )
  head = flat.get("head/kernel")
  if arch["representation_size"] is None:
    if not meta["num_classes"]:
      raise ConversionError(
        f"{path}: has no head (num_classes 0): nothing to classify for "
        "ViTForImageClassification; use --format timm for a feature extractor"
      )
    return "logits"
  if head is not None and np.any(head):
    raise ConversionError(
      f"{path}: has a representation layer (pre_logits) and a trained head; neither "
      "ViTForImageClassification (no pooler) nor timm 1.x can apply tanh(pre_logits) before "
      "the head. Fine-tune with representation_size=None to export a classifier"
    )
  logging.warning(
    "%s: pre_logits with %s head (the in21k release): exporting a ViTModel whose "
    "pooler_output is tanh(pre_logits(cls)); the head is dropped",
    path,
    "an all-zero" if head is not None else "no",
  )
  return "features"


def _transformers_version() -> str:
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.__version__


def hf_state_dict(flat: Flat, meta: Mapping[str, Any], path: str = "<params>") -> Flat:
  """transformers ViT state dict with the classic (v4) names that 4.x and 5.x both load."""
  outputs = _hf_outputs(flat, meta, path)
  pre = "vit." if outputs == "logits" else ""
  p = _Params(flat, path)
  e = pre + "embeddings."
  sd = {
    e + "cls_token": p("cls"),
    e + "position_embeddings": p(_POSEMB),
    e + "patch_embeddings.projection.weight": _conv(p("embedding/kernel")),
    e + "patch_embeddings.projection.bias": p("embedding/bias"),
  }
  for i in range(meta["architecture"]["num_layers"]):
    b, t = _block(i), f"{pre}encoder.layer.{i}."
    attn = f"{b}/MultiHeadDotProductAttention_0"
    for n in ("query", "key", "value"):
      sd[f"{t}attention.attention.{n}.weight"] = _attn_in(p(f"{attn}/{n}/kernel"))
      sd[f"{t}attention.attention.{n}.bias"] = p(f"{attn}/{n}/bias").reshape(-1)
    sd[t + "attention.output.dense.weight"] = _attn_out(p(f"{attn}/out/kernel"))
    sd[t + "attention.output.dense.bias"] = p(f"{attn}/out/bias")
    for hf, ln in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_1")):
      sd[f"{t}{hf}.weight"], sd[f"{t}{hf}.bias"] = p(f"{b}/{ln}/scale"), p(f"{b}/{ln}/bias")
    for hf, dense in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
      sd[f"{t}{hf}.weight"] = _linear(p(f"{b}/MlpBlock_0/{dense}/kernel"))
      sd[f"{t}{hf}.bias"] = p(f"{b}/MlpBlock_0/{dense}/bias")
  sd[pre + "layernorm.weight"] = p("Transformer/encoder_norm/scale")
  sd[pre + "layernorm.bias"] = p("Transformer/encoder_norm/bias")
  if outputs == "logits":
    sd["classifier.weight"], sd["classifier.bias"] = _linear(p("head/kernel")), p("head/bias")
  else:
    sd["pooler.dense.weight"] = _linear(p("pre_logits/kernel"))
    sd["pooler.dense.bias"] = p("pre_logits/bias")
    p.drop("head/")  # all zeros (checked above)
  p.check_all_used()
  return sd


def hf_config_kwargs(meta: Mapping[str, Any], outputs: str) -> dict[str, Any]:
  """`transformers.ViTConfig` arguments for the model `meta` describes."""
  arch = meta["architecture"]
  kw = dict(
    hidden_size=arch["hidden_size"],
    num_hidden_layers=arch["num_layers"],
    num_attention_heads=arch["num_heads"],
    intermediate_size=arch["mlp_dim"],
    # The checkpoints were trained with tanh-approximate GELU; HF's "gelu" is exact erf.
    hidden_act="gelu_pytorch_tanh" if arch["gelu_approximate"] else "gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-6,  # HF's default is 1e-12; the checkpoints use 1e-6
    image_size=meta["image_size"],
    patch_size=arch["patch_size"],
    num_channels=3,
    qkv_bias=True,
    encoder_stride=arch["patch_size"],
  )
  if outputs == "logits":
    names = meta["class_names"]
    kw.update(
      architectures=["ViTForImageClassification"],
      id2label={i: n for i, n in enumerate(names)},
      label2id={n: i for i, n in enumerate(names)},
    )
  else:
    kw.update(
      architectures=["ViTModel"], pooler_output_size=arch["representation_size"], pooler_act="tanh"
    )
  return kw


# --------------------------------------------------------------------------------------------
# Writing and loading.


def check_import_order() -> None:
  """Raises RuntimeError if importing torch/timm now would crash the process.

  `import tensorflow` followed by triton (imported by torchvision / timm) segfaults: fail with a
  message instead.
  """
  if "tensorflow" in sys.modules and "triton" not in sys.modules:
    raise RuntimeError(
      "tensorflow was imported before torch/timm: importing timm/torchvision now "
      "would crash the process. Import torch and timm before tensorflow, or "
      "convert in a separate process (scripts/convert_to_pytorch.py)."
    )


def _save_safetensors(sd: Flat, path: str) -> None:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
  # format=pt: transformers refuses safetensors files without it.
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  os.chmod(path, 0o644)  # safetensors writes 0600; like the JSON files, readable by a server


def _write_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def export_timm(
  flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>"
) -> str:
  """Writes model.safetensors + config.json for timm; returns 'logits' or 'features'."""
  sd = timm_state_dict(flat, meta, path)
  config = timm_config(meta)
  os.makedirs(output_dir, exist_ok=True)
  _save_safetensors(sd, os.path.join(output_dir, WEIGHTS_FILE))
  _write_json(config, os.path.join(output_dir, CONFIG_FILE))
  return "logits" if meta["num_classes"] else "features"


def export_hf(flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>") -> str:
  """Writes config.json, model.safetensors, preprocessor_config.json; returns the output kind."""
  check_import_order()
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.image_utils import PILImageResampling  # pylint: disable=g-import-not-at-top

  outputs = _hf_outputs(flat, meta, path)
  sd = hf_state_dict(flat, meta, path)
  os.makedirs(output_dir, exist_ok=True)
  transformers.ViTConfig(**hf_config_kwargs(meta, outputs)).save_pretrained(output_dir)
  size = meta["image_size"]
  transformers.ViTImageProcessor(
    do_resize=True,
    size={"height": size, "width": size},
    resample=PILImageResampling.BILINEAR,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=_MEAN_STD,
    image_std=_MEAN_STD,
  ).save_pretrained(output_dir)
  _save_safetensors(sd, os.path.join(output_dir, WEIGHTS_FILE))
  return outputs


def load_timm(model_dir: str) -> "torch.nn.Module":  # noqa: F821
  """The timm `VisionTransformer` (a BiT: `ResNetV2`) in `model_dir`, loaded strictly, in eval
  mode."""
  check_import_order()
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as timm_vit  # pylint: disable=g-import-not-at-top

  with open(os.path.join(model_dir, CONFIG_FILE)) as f:
    config = json.load(f)
  args = dict(config["model_args"])
  arch = config.get("vit_jax", {}).get("architecture", {})
  resnet = arch.get("resnet")
  if models.is_bit(arch):
    model = timm_bit_model(resnet, args["num_classes"])
  else:
    if resnet:  # a hybrid: the stem is a module, not a JSON argument (see timm_config)
      from timm.models import vision_transformer_hybrid  # pylint: disable=g-import-not-at-top

      args["embed_layer"] = functools.partial(
        vision_transformer_hybrid.HybridEmbed, backbone=timm_backbone(resnet)
      )
    model = timm_vit.VisionTransformer(**args)
  model.load_state_dict(
    safetensors.torch.load_file(os.path.join(model_dir, WEIGHTS_FILE)), strict=True
  )
  model.pretrained_cfg = dict(config["pretrained_cfg"], label_names=config.get("label_names"))
  return model.eval()


def load_hf(model_dir: str) -> "torch.nn.Module":  # noqa: F821
  """ViTForImageClassification (or ViTModel for features) from `model_dir`, all keys checked."""
  check_import_order()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.ViTConfig.from_pretrained(model_dir)
  cls = (
    transformers.ViTModel
    if config.architectures == ["ViTModel"]
    else transformers.ViTForImageClassification
  )
  model, info = cls.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
  bad = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, errors
  if bad:
    raise ConversionError(f"{model_dir}: transformers did not load every weight: {bad}")
  return model.eval()


# --------------------------------------------------------------------------------------------
# ONNX: the timm model traced by torch.onnx.export, metadata inside the file.

ONNX_FILE = "model.onnx"
ONNX_METADATA_KEY = "vit_jax"  # JSON: model_name, image_size, class_names, architecture
ONNX_OPSET = 17


def export_onnx(
  flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>"
) -> str:
  """Writes model.onnx (input `images` NCHW in [-1, 1], output `logits`, any batch size);
  returns 'logits' or 'features'. What timm cannot represent is an error here too."""
  check_import_order()
  import onnx  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  os.makedirs(output_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".timm-", dir=output_dir) as timm_dir:
    outputs = export_timm(flat, meta, timm_dir, path)
    model = load_timm(timm_dir)
  size = meta["image_size"]
  target = os.path.join(output_dir, ONNX_FILE)
  # dynamo=False: the TorchScript exporter needs no onnxscript and handles timm's ViT as is.
  # It warns that it is the legacy exporter and about Python conditions on shapes in its
  # trace; the parity check is what counts.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.onnx.export(
      model,
      (torch.zeros(1, 3, size, size),),
      target,
      dynamo=False,
      input_names=["images"],
      output_names=["logits"],
      opset_version=ONNX_OPSET,
      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
  proto = onnx.load(target)
  info = dict(
    model_name=meta.get("model_name"),
    image_size=size,
    class_names=meta["class_names"] or [],
    architecture=meta["architecture"],
  )
  onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(info)})
  onnx.save(proto, target)
  os.chmod(target, 0o644)
  return outputs


def onnx_forward(model_path: str, images: np.ndarray) -> np.ndarray:
  """onnxruntime's outputs of an ONNX export for NHWC images in [-1, 1]."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
  x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
  return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Parity check.


def check_images(num: int, image_size: int, seed: int = 0) -> np.ndarray:
  """`num` NHWC float32 images in [-1, 1]: a smooth synthetic scene, then uniform noise."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (num, image_size, image_size, 3)).astype(np.float32)
  if num:
    # Photo-like statistics (large smooth regions, an edge) complement the noise.
    y, x = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    disk = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float32)
    scene = np.stack([x * 1.6 - 0.8, 0.5 - y, disk * 1.4 - 0.7], axis=-1)
    images[0] = np.clip(scene + rng.normal(0, 0.03, scene.shape), -1, 1)
  return images


def flax_forward(
  flat: Flat, meta: Mapping[str, Any], images: np.ndarray, *, outputs: str = "logits"
) -> np.ndarray:
  """The Flax model's logits (or pre-head features) for NHWC images in [-1, 1]."""
  model = models.model_from_metadata({**meta, "num_classes": 0} if outputs == "features" else meta)
  keep = {k: v for k, v in flat.items() if not (outputs == "features" and k.startswith("head/"))}
  params = flax.traverse_util.unflatten_dict(keep, sep="/")
  with jax.default_matmul_precision("highest"):  # TF32/bf16 passes on GPU/TPU would cost 1e-3
    out = jax.jit(functools.partial(model.apply, train=False))(
      {"params": params}, jnp.asarray(images)
    )
  return np.asarray(out, dtype=np.float32)


def torch_forward(model: "torch.nn.Module", images: np.ndarray) -> np.ndarray:  # noqa: F821
  """Outputs of a loaded timm or transformers model for NHWC images in [-1, 1]."""
  import torch  # pylint: disable=g-import-not-at-top

  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))
  with torch.inference_mode():
    if hasattr(model, "config"):  # transformers
      out = model(pixel_values=x)
      out = out.logits if hasattr(out, "logits") else out.pooler_output
    else:
      out = model(x)
  return out.float().numpy()


def check_export(
  output_dir: str,
  fmt: str,
  flat: Flat,
  meta: Mapping[str, Any],
  images: np.ndarray,
  *,
  outputs: str = "logits",
  tolerance: float = DEFAULT_TOLERANCE,
) -> float:
  """Loads `output_dir` in PyTorch (onnxruntime for onnx) and returns max |export - flax|;
  raises ParityError above `tolerance`. `meta` describes the Flax side (it may differ from what
  was exported)."""
  if fmt == "onnx":
    got = onnx_forward(os.path.join(output_dir, ONNX_FILE), images)
  else:
    got = torch_forward(load_timm(output_dir) if fmt == "timm" else load_hf(output_dir), images)
  want = flax_forward(flat, meta, images, outputs=outputs)
  if got.shape != want.shape:
    raise ParityError(f"{output_dir}: output shape {got.shape}, Flax {want.shape}")
  diff = float(np.max(np.abs(got - want)))
  if not diff <= tolerance:  # also catches NaN
    raise ParityError(
      f"{output_dir}: {fmt} {outputs} differ from the Flax model by {diff:.3g} (tolerance "
      f"{tolerance:g}, max |output| {float(np.max(np.abs(want))):.3g}) on {len(images)} images"
    )
  return diff


# --------------------------------------------------------------------------------------------
# Entry point.


def convert(
  checkpoint_path: str,
  output_dir: str,
  fmt: str,
  *,
  model_name: Optional[str] = None,
  image_size: Optional[int] = None,
  num_check_images: int = 4,
  tolerance: float = DEFAULT_TOLERANCE,
) -> ConversionResult:
  """Converts a checkpoint to `fmt` (ALL_FORMATS) in `output_dir` and checks the outputs.

  Files are written to a staging folder beside `output_dir` and moved into it only after the
  parity check passed (`num_check_images=0` skips the check). Raises CheckpointError (bad input,
  including ConversionError: not representable in `fmt`) or ParityError.
  """
  if fmt not in ALL_FORMATS:
    raise ValueError(f"format must be one of {ALL_FORMATS}, got {fmt!r}")
  if num_check_images < 0:
    raise ValueError(f"num_check_images must be >= 0, got {num_check_images}")
  path = os.fspath(checkpoint_path)
  flat, metadata = _load_input(path)
  meta = resolve_metadata(flat, metadata, path, model_name=model_name, image_size=image_size)
  output_dir = os.path.abspath(os.fspath(output_dir))
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    export = {"timm": export_timm, "hf": export_hf, "onnx": export_onnx}[fmt]
    outputs = export(flat, meta, staging, path)
    diff = None
    if num_check_images:
      images = check_images(num_check_images, meta["image_size"])
      diff = check_export(staging, fmt, flat, meta, images, outputs=outputs, tolerance=tolerance)
      logging.info(
        "%s -> %s (%s): max |%s difference| %.3g on %d images",
        path,
        output_dir,
        fmt,
        outputs,
        diff,
        num_check_images,
      )
    else:
      logging.warning("%s: parity check skipped (num_check_images=0)", output_dir)
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return ConversionResult(
    output_dir=output_dir,
    format=fmt,
    outputs=outputs,
    max_abs_diff=diff,
    num_images=num_check_images,
  )
