"""BiT (Big Transfer) ResNetV2 classifier: the ViT paper's CNN baseline, by its checkpoints' tree.

Parameter names are those of the published BiT `.npz` files without their `resnet/` prefix:
`root_block/standardized_conv2d`, `block{s}/unit{NN}/{a,b,c}/{group_norm,standardized_conv2d}`,
`block{s}/unit01/a/proj/standardized_conv2d`, `group_norm`, `head/conv2d`; GroupNorm's
`gamma`/`beta` are Flax's `scale`/`bias`. So checkpoint.py's rename is fixed. In a unit, the
group norm named with a conv's letter is the one applied *before* that conv (pre-activation).
Images are NHWC in [-1, 1], as for the ViTs.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import models_resnet

Array = jax.Array
Dtype = Any

# Stage depths of the published sizes (ResNet-50/101/152).
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# The original BiT code standardises with (w - mean) / sqrt(var + 1e-10); timm uses 1e-8.
WS_EPS = 1e-10
GN_EPS = 1e-5  # BiT's (and timm's) GroupNorm epsilon; 32 groups everywhere
GN_GROUPS = 32


def weight_standardize(w: Array, eps: float = WS_EPS) -> Array:
  """BiT's weight standardisation of an HWIO kernel, per output channel."""
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  return w / jnp.sqrt(jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True) + eps)


class BitStdConv(models_resnet.StdConv):
  """The hybrids' StdConv with BiT's standardisation (epsilon inside the square root)."""

  def standardize(self, kernel: Array) -> Array:
    return weight_standardize(kernel)


def _std_conv(features: int, kernel: int, stride: int, dtype: Dtype, param_dtype: Dtype) -> Any:
  # BiT pads symmetrically by (kernel - 1) // 2 (the root's "fixed padding" of 3, then 1 for the
  # 3x3s), where the hybrids use SAME (asymmetric at stride 2).
  pad = (kernel - 1) // 2
  return BitStdConv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    name="standardized_conv2d",
  )


def _group_norm(dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
  # use_fast_variance=False: E[(x-mean)^2], exact where the residual stream has a large mean.
  return nn.GroupNorm(
    num_groups=GN_GROUPS,
    epsilon=GN_EPS,
    dtype=dtype,
    param_dtype=param_dtype,
    use_fast_variance=False,
    name="group_norm",
  )


class StdConvScope(nn.Module):
  """A lone `standardized_conv2d` under its own name (`root_block`, a unit's `proj`)."""

  features: int
  kernel: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _std_conv(self.features, self.kernel, self.stride, self.dtype, self.param_dtype)(x)


class PreActConv(nn.Module):
  """GroupNorm -> ReLU -> StdConv: a unit's `a`, `b` or `c`. With `project`, it also returns
  the shortcut: a 1x1 `proj` of the pre-activated input with `project_stride` (else None)."""

  features: int
  kernel: int
  stride: int = 1
  project: int = 0  # output channels of the shortcut projection; 0: none
  project_stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Optional[Array]]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(_group_norm(**kw)(x))
    shortcut = None
    if self.project:
      shortcut = StdConvScope(self.project, 1, self.project_stride, name="proj", **kw)(x)
    return _std_conv(self.features, self.kernel, self.stride, **kw)(x), shortcut


class BottleneckUnit(nn.Module):
  """Pre-activation bottleneck: a (1x1), b (3x3, strided), c (1x1, 4x wide), plus the shortcut,
  projected (with the stride) in a stage's first unit."""

  features: int
  stride: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = self.features * 4
    project = out if self.project else 0
    y, shortcut = PreActConv(
      self.features, 1, project=project, project_stride=self.stride, name="a", **kw
    )(x)
    y, _ = PreActConv(self.features, 3, self.stride, name="b", **kw)(y)
    y, _ = PreActConv(out, 1, name="c", **kw)(y)
    return y + (x if shortcut is None else shortcut)


class Stage(nn.Module):
  """`block{s}`: `units` bottleneck units, the first projecting and carrying the stride."""

  units: int
  features: int
  stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for u in range(self.units):
      x = BottleneckUnit(
        self.features,
        stride=self.stride if u == 0 else 1,
        project=u == 0,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"unit{u + 1:02d}",
      )(x)
    return x


class BiT(nn.Module):
  """BiT ResNetV2 classifier. `num_classes` 0 or None returns the pooled (pre-head) features.

  `resnet` (models_resnet.ResNetConfig or a mapping): stage depths and width factor, e.g.
  ((3, 4, 6, 3), 1) for R50x1. Any input size works; after the last group norm and ReLU the
  feature map (also sown as `intermediates/feature_map`, for class activation maps) is averaged.
  """

  num_classes: Optional[int]
  resnet: Any = models_resnet.ResNetConfig(DEPTHS[50], 1.0)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  model_name: Optional[str] = None

  @property
  def patch_size(self) -> int:
    """1: a CNN has no patches. What config_checks.validate_config multiplies by the ResNet stride."""
    return 1

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    del train  # no dropout or batch statistics: training and inference compute the same
    cfg = models_resnet.resnet_config(self.resnet)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = StdConvScope(cfg.width, 7, 2, name="root_block", **kw)(images.astype(self.dtype))
    # Zero padding, then a VALID max-pool: the root conv has no ReLU, so the zeros can win.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    for s, units in enumerate(cfg.num_layers):
      x = Stage(units, cfg.width * 2**s, stride=1 if s == 0 else 2, name=f"block{s + 1}", **kw)(x)
    x = nn.relu(_group_norm(**kw)(x))
    self.sow("intermediates", "feature_map", x)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    if self.num_classes:
      x = Head(self.num_classes, name="head", **kw)(x)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


class Head(nn.Module):
  """`head/conv2d`: a 1x1 convolution with bias over the pooled features (zero-initialised)."""

  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Conv(
      self.num_classes,
      (1, 1),
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv2d",
    )(x)
