"""Writes `.npz` files with the exact key layout of the published Google ViT and BiT checkpoints.

The key list is written out here from the published files' layout (flat "/"-joined pre-linen
names such as Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel, attention kernels as
[hidden, heads, head_dim]), independently of vit_jax's model code, so loading it tests the loader
rather than restating it.
Values are random with realistic scales (kernels ~ N(0, 1/fan_in), LayerNorm scales 1 +- 0.2,
nonzero biases and head), so a wrong transpose or a GELU mismatch shows in the logits.
"""

import numpy as np


def google_vit_arrays(
  *,
  hidden: int,
  mlp: int,
  heads: int,
  layers: int,
  patch: int,
  grid: int,
  num_classes: int,
  pre_logits: bool = False,
  zero_head: bool = False,
  classifier: str = "token",
  seed: int = 0,
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  f32 = np.float32

  def kernel(*shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(f32)

  def vec(n, scale=0.2, center=0.0):
    return (center + scale * rng.standard_normal(n)).astype(f32)

  hd = hidden // heads
  tokens = grid * grid + (1 if classifier == "token" else 0)
  a = {
    "embedding/kernel": kernel(patch, patch, 3, hidden, fan_in=patch * patch * 3),
    "embedding/bias": vec(hidden),
    "Transformer/posembed_input/pos_embedding": vec((1, tokens, hidden), 0.5),
    "Transformer/encoder_norm/scale": vec(hidden, 0.2, 1.0),
    "Transformer/encoder_norm/bias": vec(hidden),
  }
  if classifier == "token":
    a["cls"] = vec((1, 1, hidden), 0.5)
  for i in range(layers):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      a[b + ln + "/scale"] = vec(hidden, 0.2, 1.0)
      a[b + ln + "/bias"] = vec(hidden)
    for n in ("query", "key", "value"):
      a[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = kernel(hidden, heads, hd, fan_in=hidden)
      a[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = vec((heads, hd))
    a[b + "MultiHeadDotProductAttention_1/out/kernel"] = kernel(heads, hd, hidden, fan_in=hidden)
    a[b + "MultiHeadDotProductAttention_1/out/bias"] = vec(hidden)
    a[b + "MlpBlock_3/Dense_0/kernel"] = kernel(hidden, mlp, fan_in=hidden)
    a[b + "MlpBlock_3/Dense_0/bias"] = vec(mlp)
    a[b + "MlpBlock_3/Dense_1/kernel"] = kernel(mlp, hidden, fan_in=mlp)
    a[b + "MlpBlock_3/Dense_1/bias"] = vec(hidden)
  if pre_logits:
    a["pre_logits/kernel"] = kernel(hidden, hidden, fan_in=hidden)
    a["pre_logits/bias"] = vec(hidden)
  if num_classes:
    a["head/kernel"] = (
      np.zeros((hidden, num_classes), f32)
      if zero_head
      else kernel(hidden, num_classes, fan_in=hidden)
    )
    a["head/bias"] = np.zeros(num_classes, f32) if zero_head else vec(num_classes)
  return a


# The real ViT-B/16 ImageNet-21k file: 202 arrays, pre_logits, zeroed 21843-class head.
B16_IN21K = dict(
  hidden=768,
  mlp=3072,
  heads=12,
  layers=12,
  patch=16,
  grid=14,
  num_classes=21843,
  pre_logits=True,
  zero_head=True,
)
TINY = dict(hidden=32, mlp=64, heads=4, layers=2, patch=8, grid=4, num_classes=5)


def write_npz(path, arrays: dict[str, np.ndarray]) -> str:
  np.savez(path, **arrays)
  return str(path)


def hybrid_arrays(
  *, num_layers: tuple[int, ...], width: int, seed: int = 1, **vit
) -> dict[str, np.ndarray]:
  """A ResNet+ViT hybrid file: the ViT keys with an embedding over the stem's channels, plus
  `conv_root`, `gn_root` and `block{s}/unit{u}/...`, the GroupNorm parameters stored
  (1, 1, 1, C) as in the published R_Ti_16 / R50 files."""
  rng = np.random.default_rng(seed)
  f32 = np.float32
  gn = lambda c: {
    "scale": (1 + 0.2 * rng.standard_normal((1, 1, 1, c))).astype(f32),
    "bias": (0.2 * rng.standard_normal((1, 1, 1, c))).astype(f32),
  }
  conv = lambda k, cin, cout: rng.standard_normal((k, k, cin, cout)).astype(f32)
  a = {"conv_root/kernel": conv(7, 3, width)}
  a.update({f"gn_root/{k}": v for k, v in gn(width).items()})
  cin = width
  for s, units in enumerate(num_layers):
    w = width * 2**s
    for u in range(units):
      p = f"block{s + 1}/unit{u + 1}/"
      for r, (k, ci, co) in enumerate(((1, cin, w), (3, w, w), (1, w, 4 * w)), 1):
        a[f"{p}conv{r}/kernel"] = conv(k, ci, co)
        a.update({f"{p}gn{r}/{n}": v for n, v in gn(co).items()})
      if u == 0:
        a[f"{p}conv_proj/kernel"] = conv(1, cin, 4 * w)
        a.update({f"{p}gn_proj/{n}": v for n, v in gn(4 * w).items()})
      cin = 4 * w
  vit_arrays = google_vit_arrays(**vit)
  patch, hidden = vit["patch"], vit["hidden"]
  vit_arrays["embedding/kernel"] = (
    rng.standard_normal((patch, patch, cin, hidden)) / np.sqrt(patch * patch * cin)
  ).astype(f32)
  return {**a, **vit_arrays}


def bit_arrays(
  *, num_layers: tuple[int, ...], width: int, num_classes: int, seed: int = 2
) -> dict[str, np.ndarray]:
  """A BiT ResNetV2 file as published (BiT-M-R50x1.npz, ...): every key under `resnet/`, conv
  kernels HWIO named `standardized_conv2d/kernel`, GroupNorm `gamma`/`beta` as (C,), the norm
  under a conv's letter being the one applied before it, the shortcut projection under
  `unit01/a/proj`, a final `group_norm` and a 1x1-conv `head/conv2d` with bias."""
  rng = np.random.default_rng(seed)
  f32 = np.float32
  conv = lambda k, cin, cout: (
    rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
  ).astype(f32)
  gn = lambda prefix, c: {
    f"{prefix}group_norm/gamma": (1 + 0.2 * rng.standard_normal(c)).astype(f32),
    f"{prefix}group_norm/beta": (0.2 * rng.standard_normal(c)).astype(f32),
  }
  a = {"resnet/root_block/standardized_conv2d/kernel": conv(7, 3, width)}
  cin = width
  for s, units in enumerate(num_layers):
    mid = width * 2**s
    for u in range(units):
      p = f"resnet/block{s + 1}/unit{u + 1:02d}/"
      for letter, (k, ci, co) in zip("abc", ((1, cin, mid), (3, mid, mid), (1, mid, 4 * mid))):
        a[f"{p}{letter}/standardized_conv2d/kernel"] = conv(k, ci, co)
        a.update(gn(f"{p}{letter}/", ci))
      if u == 0:
        a[f"{p}a/proj/standardized_conv2d/kernel"] = conv(1, cin, 4 * mid)
      cin = 4 * mid
  a.update(gn("resnet/", cin))
  a["resnet/head/conv2d/kernel"] = conv(1, cin, num_classes)
  a["resnet/head/conv2d/bias"] = (0.3 * rng.standard_normal(num_classes)).astype(f32)
  return a
