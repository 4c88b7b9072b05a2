"""The ResNet (v1.5, GroupNorm, weight-standardised) stem of the hybrid ResNet+ViT models.

Names and arithmetic follow google-research/vision_transformer `models_resnet.py`, so that the
published hybrid checkpoints (R50+ViT-B_16, R26+ViT-S_32, R_Ti_16, ...) load by name:
`conv_root`, `gn_root`, then `block{s}/unit{u}/{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}`.
"""

import dataclasses
from typing import Any, Mapping, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

Array = Any


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """`config.resnet` of the original hybrid configs: stage depths and width multiplier.

  `num_layers=()` is the root alone (7x7/2 conv and 3x3/2 max-pool: a /4 feature map).
  """

  num_layers: tuple[int, ...] = ()
  width_factor: float = 1.0

  @property
  def width(self) -> int:
    """Channels of the root; stage s has 4 * width * 2**(s-1) output channels."""
    return int(64 * self.width_factor)

  @property
  def _halvings(self) -> int:
    """Stride-2 layers: the root conv, its pool, and the first unit of every stage after the
    first."""
    return 2 + max(len(self.num_layers) - 1, 0)

  @property
  def stride(self) -> int:
    """Input pixels per feature-map pixel: 4 for the root, then 2 per stage after the first."""
    return 2**self._halvings

  def feature_side(self, image_size: int) -> int:
    """Side of the stem's feature map for `image_size` px (SAME padding rounds up)."""
    for _ in range(self._halvings):
      image_size = -(-image_size // 2)
    return image_size

  def to_dict(self) -> dict[str, Any]:
    return dict(num_layers=list(self.num_layers), width_factor=self.width_factor)


def resnet_config(value: Union[None, ResNetConfig, Mapping[str, Any], Any]) -> ResNetConfig | None:
  """A ResNetConfig from None, a ResNetConfig, a mapping or a ConfigDict (`num_layers`,
  `width_factor`); raises ValueError on anything else."""
  if value is None or isinstance(value, ResNetConfig):
    return value
  get = value.get if isinstance(value, Mapping) else lambda k, d=None: getattr(value, k, d)
  try:
    cfg = ResNetConfig(
      num_layers=tuple(int(n) for n in get("num_layers", ())),
      width_factor=float(get("width_factor", 1.0)),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"resnet must have num_layers (a tuple of ints) and width_factor (a number), got {value!r}"
    ) from e
  if cfg.width < 32 or cfg.width % 32 or any(n < 1 for n in cfg.num_layers):
    raise ValueError(
      f"resnet: width_factor {cfg.width_factor} gives {cfg.width} root channels, "
      "which GroupNorm's 32 groups need to be a positive multiple of 32; "
      f"num_layers {cfg.num_layers} must be positive"
    )
  return cfg


def stem_stride(value: Union[None, ResNetConfig, Mapping[str, Any], Any]) -> int:
  """Input pixels per feature-map pixel of the stem `value` (see resnet_config); 1 without one."""
  cfg = resnet_config(value)
  return 1 if cfg is None else cfg.stride


def weight_standardize(w: Array, axis: Sequence[int], eps: float) -> Array:
  """Subtracts the mean and divides by the standard deviation (per output channel)."""
  w = w - jnp.mean(w, axis=axis)
  return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Conv):
  """Convolution with weight standardisation (the stored kernel is the raw one)."""

  def standardize(self, kernel: Array) -> Array:
    """The hybrids' standardisation (google-research/vision_transformer); BiT overrides it."""
    return weight_standardize(kernel, axis=[0, 1, 2], eps=1e-5)

  def param(self, name: str, init_fn: Any, *init_args: Any, **kwargs: Any) -> Any:
    param = super().param(name, init_fn, *init_args, **kwargs)
    if name == "kernel":
      param = self.standardize(param)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1, 3x3 (strided), 1x1 convs with GroupNorm; 4 * features outputs."""

  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, s, name: StdConv(f, k, s, use_bias=False, dtype=self.dtype, name=name)
    gn = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, name=name, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = gn("gn_proj")(conv(self.features * 4, (1, 1), self.strides, "conv_proj")(x))
    y = nn.relu(gn("gn1")(conv(self.features, (1, 1), (1, 1), "conv1")(x)))
    y = nn.relu(gn("gn2")(conv(self.features, (3, 3), self.strides, "conv2")(y)))
    # gn3 starts at zero: each unit starts as (projected) identity.
    y = gn("gn3", scale_init=nn.initializers.zeros)(
      conv(self.features * 4, (1, 1), (1, 1), "conv3")(y)
    )
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units; the first carries the stride (and the projection)."""

  block_size: int
  nout: int
  first_stride: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = ResidualUnit(self.nout, strides=self.first_stride, dtype=self.dtype, name="unit1")(x)
    for i in range(1, self.block_size):
      x = ResidualUnit(self.nout, strides=(1, 1), dtype=self.dtype, name=f"unit{i + 1}")(x)
    return x


def resnet_stem(x: Array, config: ResNetConfig, dtype: Any = jnp.float32) -> Array:
  """Root (StdConv 7x7/2, GroupNorm, relu, max-pool 3x3/2) then the stages. Call it inside the
  ViT's compact `__call__`: its modules then sit at the ViT's top level, as in the checkpoints."""
  width = config.width
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=dtype, name="conv_root")(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, name="gn_root")(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  for i, block_size in enumerate(config.num_layers):
    x = ResNetStage(
      block_size=block_size,
      nout=width * 2**i,
      first_stride=(1, 1) if i == 0 else (2, 2),
      dtype=dtype,
      name=f"block{i + 1}",
    )(x)
  return x
