"""Model presets by the names of the original checkpoints, and `get_model`."""

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from vit_jax import models_resnet, models_vit


def _vit(
  patch: int,
  hidden: int,
  mlp: int,
  heads: int,
  layers: int,
  dropout: float = 0.0,
  classifier: str = "token",
  resnet: Optional[tuple[tuple[int, ...], float]] = None,
) -> dict[str, Any]:
  return dict(
    patch_size=patch,
    hidden_size=hidden,
    mlp_dim=mlp,
    num_heads=heads,
    num_layers=layers,
    dropout_rate=dropout,
    attention_dropout_rate=0.0,
    classifier=classifier,
    representation_size=None,
    resnet=None if resnet is None else models_resnet.ResNetConfig(*resnet),
  )


# Sizes and dropout as google-research/vision_transformer `configs/models.py`.
# `representation_size` is None: fine-tuning drops the in21k `pre_logits` (see checkpoint.py).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
  "ViT-Ti_16": _vit(16, 192, 768, 3, 12),
  "ViT-S_16": _vit(16, 384, 1536, 6, 12),
  "ViT-S_32": _vit(32, 384, 1536, 6, 12),
  "ViT-B_16": _vit(16, 768, 3072, 12, 12),
  "ViT-B_32": _vit(32, 768, 3072, 12, 12),
  "ViT-B_8": _vit(8, 768, 3072, 12, 12),
  "ViT-L_16": _vit(16, 1024, 4096, 16, 24, dropout=0.1),
  "ViT-L_32": _vit(32, 1024, 4096, 16, 24),
  "ViT-H_14": _vit(14, 1280, 5120, 16, 32, dropout=0.1),
  "ViT-S_16-gap-norep": _vit(16, 384, 1536, 6, 12, classifier="gap"),
  "ViT-B_16-gap-norep": _vit(16, 768, 3072, 12, 12, classifier="gap"),
  # Hybrids: a ResNet stem (stage depths, width factor), then patches of its feature map.
  "R+ViT-Ti_16": _vit(8, 192, 768, 3, 12, resnet=((), 1)),
  "R26+ViT-S_32": _vit(1, 384, 1536, 6, 12, resnet=((2, 2, 2, 2), 1)),
  "R26+ViT-B_32": _vit(1, 768, 3072, 12, 12, resnet=((2, 2, 2, 2), 1)),
  "R50+ViT-B_16": _vit(1, 768, 3072, 12, 12, dropout=0.1, resnet=((3, 4, 9), 1)),
  "R50+ViT-L_32": _vit(1, 1024, 4096, 16, 24, dropout=0.1, resnet=((3, 4, 6, 3), 1)),
  # Tiny models for tests: google-research/vision_transformer's `testing` and a wider one
  # that can learn.
  "testing": _vit(16, 10, 10, 2, 1, dropout=0.1),
  "ViT-tiny_4": _vit(4, 64, 256, 4, 4),
  # ViT-tiny_4 with 7x7 patches: a 28x28 image is 16 tokens, not 49.
  "ViT-tiny_7": _vit(7, 64, 256, 4, 4),
  # The offline demo's model (configs/pretrain_fmnist.py, shoes.py:demo): ViT-tiny_7's encoder
  # after a 32-channel ResNet root (/4), 2x2 patches of its map: 8 px per token, a 32 px image
  # is 16 tokens.
  "R+ViT-tiny_8": _vit(2, 64, 256, 4, 4, resnet=((), 0.5)),
}
_FIELDS = frozenset(
  f for f in models_vit.VisionTransformer.__dataclass_fields__ if f not in ("parent", "name")
)
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("", "cudnn")  # "": XLA's attention


def cotangent_boundaries_default(platform: Optional[str] = None) -> bool:
  """Whether `cotangent_boundaries` pays on `platform` (default: jax's default backend).

  On the CPU backend: without them XLA:CPU re-derives the residual stream's gradient in every
  consumer (quadratic in depth). XLA:GPU does not form that fusion; there they would only add a
  conditional per block.
  """
  return (platform or jax.default_backend()) == "cpu"


def get_model(name: str, num_classes: int | None, **overrides: Any) -> models_vit.VisionTransformer:
  """Returns the preset `name` with `num_classes` outputs; `overrides` replace preset fields.

  `overrides` may be a config's `model` block as it is (`**config.model`): a None value keeps the
  preset's field; `dtype` may be a name ("bfloat16"); `attention_impl` "" is XLA's attention;
  `resnet` may be a mapping whose None entries keep the preset stem's; `cotangent_boundaries` None
  is `cotangent_boundaries_default()`, resolved here, once. Raises ValueError naming a bad field.
  """
  if name not in MODEL_CONFIGS:
    raise ValueError(f"Unknown model_name {name!r}; known: {', '.join(MODEL_CONFIGS)}")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(overrides) - _FIELDS
  if unknown:
    raise ValueError(
      f"Unknown model field(s) {sorted(unknown)} for {name}; known: {sorted(_FIELDS)}"
    )
  if isinstance(overrides.get("dtype"), str):
    if overrides["dtype"] not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {overrides['dtype']!r}")
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if "attention_impl" in overrides:
    if overrides["attention_impl"] not in ATTENTION_IMPLS:
      raise ValueError(
        f"attention_impl must be '' (XLA) or 'cudnn', got {overrides['attention_impl']!r}"
      )
    overrides["attention_impl"] = overrides["attention_impl"] or None
  if "remat_policy" in overrides and overrides["remat_policy"] not in models_vit.REMAT_POLICIES:
    raise ValueError(
      f"remat_policy must be one of {', '.join(models_vit.REMAT_POLICIES)}, got "
      f"{overrides['remat_policy']!r}"
    )
  kwargs = {**MODEL_CONFIGS[name], **overrides}
  if "resnet" in overrides:
    kwargs["resnet"] = _merge_resnet(MODEL_CONFIGS[name]["resnet"], overrides["resnet"])
  if kwargs.get("cotangent_boundaries") is None:
    kwargs["cotangent_boundaries"] = cotangent_boundaries_default()
  return models_vit.VisionTransformer(num_classes=num_classes, model_name=name, **kwargs)


def _merge_resnet(
  preset: Optional[models_resnet.ResNetConfig], value: Any
) -> Optional[models_resnet.ResNetConfig]:
  """`value`'s set fields over the preset's stem; None when neither has one."""
  if value is None or isinstance(value, models_resnet.ResNetConfig):
    return value or preset
  get = value.get if isinstance(value, Mapping) else lambda k: getattr(value, k, None)
  given = {k: get(k) for k in ("num_layers", "width_factor") if get(k) is not None}
  if not given:
    return preset
  base = (preset or models_resnet.ResNetConfig()).to_dict()
  return models_resnet.resnet_config({**base, **given})


# The fields that define the computed function; written beside every export (params.json) so a
# converter or predictor rebuilds exactly the trained model without the training config.
_ARCH_FIELDS = (
  "patch_size",
  "hidden_size",
  "mlp_dim",
  "num_heads",
  "num_layers",
  "classifier",
  "representation_size",
  "gelu_approximate",
  "resnet",
)


def model_metadata(
  model: models_vit.VisionTransformer,
  *,
  image_size: Optional[int],
  class_names: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
  """JSON-able description of `model` for an export: architecture, resolution, labels."""
  return dict(
    model_name=model.model_name,
    num_classes=model.num_classes or 0,
    image_size=None if image_size is None else int(image_size),
    class_names=list(class_names) if class_names is not None else None,
    architecture={f: _json_field(getattr(model, f)) for f in _ARCH_FIELDS},
  )


def _json_field(value: Any) -> Any:
  return value.to_dict() if isinstance(value, models_resnet.ResNetConfig) else value


def model_from_metadata(meta: Mapping[str, Any], **overrides: Any) -> models_vit.VisionTransformer:
  """Rebuilds the model described by `model_metadata` (inference settings: no dropout)."""
  arch = dict(meta["architecture"])
  arch["resnet"] = models_resnet.resnet_config(arch.get("resnet"))  # absent in older exports
  return models_vit.VisionTransformer(
    num_classes=meta["num_classes"], model_name=meta.get("model_name"), **{**arch, **overrides}
  )
