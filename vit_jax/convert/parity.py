"""Parity of an export with the Flax model: check images, the Flax outputs, the comparison."""

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.convert.metadata import Flat

DEFAULT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
  """The exported model's outputs differ from the Flax model's by more than the tolerance."""


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


def compare(
  got: np.ndarray,
  want: np.ndarray,
  where: str,
  fmt: str,
  *,
  outputs: str = "logits",
  tolerance: float = DEFAULT_TOLERANCE,
) -> float:
  """max |got - want| for the export at `where`; raises ParityError above `tolerance`."""
  if got.shape != want.shape:
    raise ParityError(f"{where}: output shape {got.shape}, Flax {want.shape}")
  diff = float(np.max(np.abs(got - want)))
  if not diff <= tolerance:  # also catches NaN
    raise ParityError(
      f"{where}: {fmt} {outputs} differ from the Flax model by {diff:.3g} (tolerance "
      f"{tolerance:g}, max |output| {float(np.max(np.abs(want))):.3g}) on {len(got)} images"
    )
  return diff
