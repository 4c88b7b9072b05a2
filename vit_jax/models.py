"""Model presets by the names of the original checkpoints, and `get_model`.

Two families: the ViTs (and ResNet+ViT hybrids) of models_vit.py, and the BiT ResNetV2 CNNs of
models_bit.py, the ViT paper's baseline. Both take NHWC images in [-1, 1] and return logits.
"""

from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from vit_jax import models_bit, models_resnet, models_vit

Model = Union[models_vit.VisionTransformer, models_bit.BiT]


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


def _bit(num_layers: tuple[int, ...], width_factor: float) -> dict[str, Any]:
  return dict(family="bit", resnet=models_resnet.ResNetConfig(num_layers, width_factor))


# BiT (Kolesnikov et al. 2020): BiT-M is pretrained on ImageNet-21k (21,843-class head), BiT-S on
# ImageNet-1k (1,000); the architectures are the same.
BIT_CONFIGS: dict[str, dict[str, Any]] = {
  f"BiT-{data}-R{depth}x{width}": _bit(models_bit.DEPTHS[depth], width)
  for data in ("M", "S")
  for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))
}
# For a CNN-vs-ViT comparison at R+ViT-tiny_8's size on 32 px Fashion-MNIST: two stages of two
# units at half width (32 root channels): 207,523 parameters with 3 classes.
BIT_CONFIGS["BiT-tiny"] = _bit((2, 2), 0.5)
MODEL_CONFIGS.update(BIT_CONFIGS)

_FIELDS = frozenset(
  f for f in models_vit.VisionTransformer.__dataclass_fields__ if f not in ("parent", "name")
)
DTYPES = ("float32", "bfloat16")
# "": jax.nn.dot_product_attention (XLA's); "einsum": the weights as an einsum and a float32
# softmax, as flax's attention (faster on TPU); "cudnn": cuDNN's fused attention (NVIDIA GPUs).
ATTENTION_IMPLS = ("", "einsum", "cudnn")


def dtype_default(platform: Optional[str] = None) -> str:
  """The compute dtype a config's `model.dtype=None` means on `platform` (default: jax's default
  backend): bfloat16 on TPU, whose matrix units compute in it (a float32 matmul there is bf16
  passes anyway) and whose HBM is the limit; float32 elsewhere, the checkpoints' own numbers."""
  return "bfloat16" if (platform or jax.default_backend()) == "tpu" else "float32"


def attention_impl_default(platform: Optional[str] = None) -> str:
  """What a config's `model.attention_impl=None` means on `platform`: "einsum" on TPU, where the
  TPU compiler estimates ViT-B/16's bf16 train step 5.5 % faster with it than with
  jax.nn.dot_product_attention; "" (XLA's dot_product_attention) elsewhere."""
  return "einsum" if (platform or jax.default_backend()) == "tpu" else ""


def cotangent_boundaries_default(platform: Optional[str] = None) -> bool:
  """Whether `cotangent_boundaries` pays on `platform` (default: jax's default backend).

  On the CPU backend: without them XLA:CPU re-derives the residual stream's gradient in every
  consumer (quadratic in depth). XLA:GPU does not form that fusion; there they would only add a
  conditional per block.
  """
  return (platform or jax.default_backend()) == "cpu"


def pretrained_url(name: str) -> str:
  """Where the original checkpoint `{name}.npz` of a preset is published (ImageNet-21k for the
  ViTs and BiT-M, ImageNet-1k for BiT-S)."""
  if name in BIT_CONFIGS:
    return f"https://storage.googleapis.com/bit_models/{name}.npz"
  return f"https://storage.googleapis.com/vit_models/imagenet21k/{name}.npz"


def is_bit(model_or_architecture: Any) -> bool:
  """Whether a model, or the `architecture` of its metadata (model_metadata), is a BiT CNN."""
  if isinstance(model_or_architecture, Mapping):
    return model_or_architecture.get("family") == "bit"
  return isinstance(model_or_architecture, models_bit.BiT)


# ViT fields the shared config passes to every model (configs/common.py): a BiT accepts them at
# these values, which switch them off, and refuses any other.
_VIT_ONLY_DEFAULTS = dict(
  dropout_rate=0.0,
  attention_dropout_rate=0.0,
  stochastic_depth=0.0,
  remat=False,
  remat_policy="nothing_saveable",
  recompute_gelu=False,
  attention_impl="",
  cotangent_boundaries=False,
)
_BIT_FIELDS = frozenset(("dtype", "param_dtype", "resnet"))


def get_model(
  name: str, num_classes: int | None, *, platform: Optional[str] = None, **overrides: Any
) -> Model:
  """Returns the preset `name` with `num_classes` outputs; `overrides` replace preset fields.

  `overrides` may be a config's `model` block as it is (`**config.model`): a None value keeps the
  preset's field; `dtype` may be a name ("bfloat16"); `attention_impl` "" is XLA's attention;
  `resnet` may be a mapping whose None entries keep the preset stem's. `dtype`, `attention_impl`
  and `cotangent_boundaries` None are the defaults for `platform` (`dtype_default`,
  `attention_impl_default`, `cotangent_boundaries_default`; default: jax's default backend),
  resolved here, once. A BiT preset takes `dtype`, `param_dtype` and `resnet` (its stage depths
  and width). Raises ValueError naming a bad field.
  """
  if name not in MODEL_CONFIGS:
    raise ValueError(f"Unknown model_name {name!r}; known: {', '.join(MODEL_CONFIGS)}")
  defaults = {
    "dtype": dtype_default,
    "attention_impl": attention_impl_default,
  }
  resolved = {
    k: f(platform) for k, f in defaults.items() if k in overrides and overrides[k] is None
  }
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if name in BIT_CONFIGS:
    resolved.pop("attention_impl", None)
  overrides.update(resolved)
  if isinstance(overrides.get("dtype"), str):
    if overrides["dtype"] not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {overrides['dtype']!r}")
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if name in BIT_CONFIGS:
    return _get_bit(name, num_classes, overrides)
  unknown = set(overrides) - _FIELDS
  if unknown:
    raise ValueError(
      f"Unknown model field(s) {sorted(unknown)} for {name}; known: {sorted(_FIELDS)}"
    )
  if "attention_impl" in overrides:
    if overrides["attention_impl"] not in ATTENTION_IMPLS:
      raise ValueError(
        f"attention_impl must be '' (XLA), 'einsum' or 'cudnn', got {overrides['attention_impl']!r}"
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
    kwargs["cotangent_boundaries"] = cotangent_boundaries_default(platform)
  return models_vit.VisionTransformer(num_classes=num_classes, model_name=name, **kwargs)


def _get_bit(name: str, num_classes: Optional[int], overrides: dict[str, Any]) -> models_bit.BiT:
  bad = sorted(
    k
    for k, v in overrides.items()
    if k not in _BIT_FIELDS and not (k in _VIT_ONLY_DEFAULTS and v == _VIT_ONLY_DEFAULTS[k])
  )
  if bad:
    raise ValueError(
      f"{bad[0]}={overrides[bad[0]]!r}: {name} is a BiT ResNet, which has no such field "
      f"(ViT-only); it takes {', '.join(sorted(_BIT_FIELDS))}"
    )
  resnet = BIT_CONFIGS[name]["resnet"]
  if "resnet" in overrides:
    resnet = _merge_resnet(resnet, overrides["resnet"])
  kwargs = {k: overrides[k] for k in ("dtype", "param_dtype") if k in overrides}
  return models_bit.BiT(num_classes=num_classes, resnet=resnet, model_name=name, **kwargs)


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
  model: Model,
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
    architecture=_architecture(model),
  )


def _architecture(model: Model) -> dict[str, Any]:
  if is_bit(model):
    return dict(family="bit", resnet=models_resnet.resnet_config(model.resnet).to_dict())
  return {f: _json_field(getattr(model, f)) for f in _ARCH_FIELDS}


def _json_field(value: Any) -> Any:
  return value.to_dict() if isinstance(value, models_resnet.ResNetConfig) else value


def model_from_metadata(meta: Mapping[str, Any], **overrides: Any) -> Model:
  """Rebuilds the model described by `model_metadata` (inference settings: no dropout)."""
  arch = dict(meta["architecture"])
  arch["resnet"] = models_resnet.resnet_config(arch.get("resnet"))  # absent in older exports
  if arch.pop("family", "vit") == "bit":
    return models_bit.BiT(
      num_classes=meta["num_classes"], model_name=meta.get("model_name"), **{**arch, **overrides}
    )
  return models_vit.VisionTransformer(
    num_classes=meta["num_classes"], model_name=meta.get("model_name"), **{**arch, **overrides}
  )
