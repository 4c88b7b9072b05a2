"""What every PyTorch target shares: the import-order guard, the Flax -> torch tensor layouts,
key bookkeeping, safetensors files and running a loaded model.

Flax: Dense kernels (in, out), Conv HWIO, attention (D, heads, head_dim).
torch: Linear weights (out, in), Conv OIHW.
"""

import json
import os
import sys
from typing import Any

import numpy as np

from vit_jax.convert.metadata import ConversionError, Flat

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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


class Params:
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


def linear(kernel: np.ndarray) -> np.ndarray:
  return kernel.T


def attn_in(kernel: np.ndarray) -> np.ndarray:
  """(D, heads, head_dim) -> torch (heads*head_dim, D); head-major like torch's reshape."""
  return kernel.reshape(kernel.shape[0], -1).T


def attn_out(kernel: np.ndarray) -> np.ndarray:
  """(heads, head_dim, D) -> torch (D, heads*head_dim)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def conv(kernel: np.ndarray) -> np.ndarray:
  return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def block(i: int) -> str:
  return f"Transformer/encoderblock_{i}"


def save_safetensors(sd: Flat, path: str) -> None:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
  # format=pt: transformers refuses safetensors files without it.
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  os.chmod(path, 0o644)  # safetensors writes 0600; like the JSON files, readable by a server


def write_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


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
