"""The timm export: `VisionTransformer` (plain and hybrid) and, for a BiT, `ResNetV2`, as
model.safetensors + timm's hub config.json."""

import functools
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax import models, models_bit, models_resnet
from vit_jax.convert import pytorch
from vit_jax.convert.metadata import MEAN_STD, POSEMB, ConversionError, Flat, feature_side
from vit_jax.convert.pytorch import CONFIG_FILE, WEIGHTS_FILE, Params


def timm_state_dict(flat: Flat, meta: Mapping[str, Any], path: str = "<params>") -> Flat:
  """timm `VisionTransformer` state dict (numpy) for a model `timm_model_args(meta)` builds; for
  a BiT, timm `ResNetV2`'s (`timm_bit_model`)."""
  if models.is_bit(meta["architecture"]):
    return _timm_bit_state_dict(Params(flat, path), meta["architecture"], meta["num_classes"])
  if meta["architecture"]["representation_size"] is not None:
    raise ConversionError(
      f"{path}: has a representation layer (pre_logits, tanh before the head) that timm 1.x "
      "cannot represent; use --format hf (exports the backbone with pre_logits as the pooler), "
      "or fine-tune with representation_size=None"
    )
  p = Params(flat, path)
  sd = _timm_backbone(p, meta["architecture"].get("resnet"))
  sd |= {
    "patch_embed.proj.weight": pytorch.conv(p("embedding/kernel")),
    "patch_embed.proj.bias": p("embedding/bias"),
    "pos_embed": p(POSEMB),
  }
  if meta["architecture"]["classifier"] == "token":
    sd["cls_token"] = p("cls")
  for i in range(meta["architecture"]["num_layers"]):
    b, t = pytorch.block(i), f"blocks.{i}."
    attn = f"{b}/MultiHeadDotProductAttention_0"
    sd[t + "norm1.weight"], sd[t + "norm1.bias"] = (
      p(f"{b}/LayerNorm_0/scale"),
      p(f"{b}/LayerNorm_0/bias"),
    )
    sd[t + "attn.qkv.weight"] = np.concatenate(
      [pytorch.attn_in(p(f"{attn}/{n}/kernel")) for n in ("query", "key", "value")]
    )
    sd[t + "attn.qkv.bias"] = np.concatenate(
      [p(f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    )
    sd[t + "attn.proj.weight"] = pytorch.attn_out(p(f"{attn}/out/kernel"))
    sd[t + "attn.proj.bias"] = p(f"{attn}/out/bias")
    sd[t + "norm2.weight"], sd[t + "norm2.bias"] = (
      p(f"{b}/LayerNorm_1/scale"),
      p(f"{b}/LayerNorm_1/bias"),
    )
    for j, name in enumerate(("fc1", "fc2")):
      sd[f"{t}mlp.{name}.weight"] = pytorch.linear(p(f"{b}/MlpBlock_0/Dense_{j}/kernel"))
      sd[f"{t}mlp.{name}.bias"] = p(f"{b}/MlpBlock_0/Dense_{j}/bias")
  sd["norm.weight"] = p("Transformer/encoder_norm/scale")
  sd["norm.bias"] = p("Transformer/encoder_norm/bias")
  if meta["num_classes"]:
    sd["head.weight"], sd["head.bias"] = pytorch.linear(p("head/kernel")), p("head/bias")
  p.check_all_used()
  return sd


def _timm_backbone(p: Params, resnet: Optional[Mapping[str, Any]]) -> Flat:
  """The hybrid stem as timm's ResNetV2 names it inside `patch_embed.backbone` (the root alone
  is timm's stem Sequential; with stages, a ResNetV2 whose stem is `stem`)."""
  if not resnet:
    return {}
  root = "patch_embed.backbone." + ("stem." if resnet["num_layers"] else "")
  sd = {
    root + "conv.weight": pytorch.conv(p("conv_root/kernel")),
    root + "norm.weight": p("gn_root/scale"),
    root + "norm.bias": p("gn_root/bias"),
  }
  for s, units in enumerate(resnet["num_layers"]):
    for u in range(units):
      src, dst = f"block{s + 1}/unit{u + 1}/", f"patch_embed.backbone.stages.{s}.blocks.{u}."
      for r in (1, 2, 3):
        sd[f"{dst}conv{r}.weight"] = pytorch.conv(p(f"{src}conv{r}/kernel"))
        sd[f"{dst}norm{r}.weight"] = p(f"{src}gn{r}/scale")
        sd[f"{dst}norm{r}.bias"] = p(f"{src}gn{r}/bias")
      if u == 0:
        sd[f"{dst}downsample.conv.weight"] = pytorch.conv(p(f"{src}conv_proj/kernel"))
        sd[f"{dst}downsample.norm.weight"] = p(f"{src}gn_proj/scale")
        sd[f"{dst}downsample.norm.bias"] = p(f"{src}gn_proj/bias")
  return sd


def _timm_bit_state_dict(p: Params, arch: Mapping[str, Any], num_classes: int) -> Flat:
  """A BiT's parameters by timm ResNetV2's names (as timm's `_load_weights` maps the files)."""
  sd = {"stem.conv.weight": pytorch.conv(p("root_block/standardized_conv2d/kernel"))}
  for s, units in enumerate(arch["resnet"]["num_layers"]):
    for u in range(units):
      src, dst = f"block{s + 1}/unit{u + 1:02d}/", f"stages.{s}.blocks.{u}."
      for r, letter in enumerate("abc", 1):
        sd[f"{dst}conv{r}.weight"] = pytorch.conv(p(f"{src}{letter}/standardized_conv2d/kernel"))
        sd[f"{dst}norm{r}.weight"] = p(f"{src}{letter}/group_norm/scale")
        sd[f"{dst}norm{r}.bias"] = p(f"{src}{letter}/group_norm/bias")
      if u == 0:
        sd[f"{dst}downsample.conv.weight"] = pytorch.conv(
          p(f"{src}a/proj/standardized_conv2d/kernel")
        )
  sd["norm.weight"], sd["norm.bias"] = p("group_norm/scale"), p("group_norm/bias")
  if num_classes:
    sd["head.fc.weight"] = pytorch.conv(p("head/conv2d/kernel"))
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
  pytorch.check_import_order()
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
    mean=MEAN_STD,
    std=MEAN_STD,
    num_classes=num_classes,
    pool_size=None,
    first_conv=first_conv,
    classifier=classifier,
  )


def timm_backbone(resnet: Mapping[str, Any]) -> "torch.nn.Module":  # noqa: F821
  """timm's module for the hybrid stem `resnet` ({num_layers, width_factor}), as timm's own
  hybrid ViTs build it (`vision_transformer_hybrid._resnetv2`: SAME padding, no pre-activation),
  with the Flax GroupNorm epsilon (1e-6) so that the outputs match."""
  pytorch.check_import_order()
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
  pytorch.check_import_order()
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
    side = feature_side(meta["image_size"], arch)
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


def export_timm(
  flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>"
) -> str:
  """Writes model.safetensors + config.json for timm; returns 'logits' or 'features'."""
  sd = timm_state_dict(flat, meta, path)
  config = timm_config(meta)
  os.makedirs(output_dir, exist_ok=True)
  pytorch.save_safetensors(sd, os.path.join(output_dir, WEIGHTS_FILE))
  pytorch.write_json(config, os.path.join(output_dir, CONFIG_FILE))
  return "logits" if meta["num_classes"] else "features"


def load_timm(model_dir: str) -> "torch.nn.Module":  # noqa: F821
  """The timm `VisionTransformer` (a BiT: `ResNetV2`) in `model_dir`, loaded strictly, in eval
  mode."""
  pytorch.check_import_order()
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
