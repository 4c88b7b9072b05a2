"""`convert()`: read a checkpoint, export it to a staging folder, check its outputs against the
Flax model, and move it into place only when the check passed."""

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging

from vit_jax.convert import (
  hf_export,
  metadata,
  onnx_export,
  onnx_int8,
  parity,
  pytorch,
  timm_export,
)

FORMATS = ("timm", "hf")  # the PyTorch libraries
ALL_FORMATS = FORMATS + ("onnx",)  # what convert() writes


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  output_dir: str
  format: str
  outputs: str  # "logits" or "features"
  max_abs_diff: Optional[float]  # None when the check was skipped
  num_images: int
  int8: Optional[dict[str, Any]] = None  # onnx with int8: the quantization and its measurement


def check_export(
  output_dir: str,
  fmt: str,
  flat: metadata.Flat,
  meta: Mapping[str, Any],
  images: np.ndarray,
  *,
  outputs: str = "logits",
  tolerance: float = parity.DEFAULT_TOLERANCE,
) -> float:
  """Loads `output_dir` in PyTorch (onnxruntime for onnx) and returns max |export - flax|;
  raises ParityError above `tolerance`. `meta` describes the Flax side (it may differ from what
  was exported)."""
  if fmt == "onnx":
    got = onnx_export.onnx_forward(os.path.join(output_dir, onnx_export.ONNX_FILE), images)
  else:
    load = timm_export.load_timm if fmt == "timm" else hf_export.load_hf
    got = pytorch.torch_forward(load(output_dir), images)
  want = parity.flax_forward(flat, meta, images, outputs=outputs)
  return parity.compare(got, want, output_dir, fmt, outputs=outputs, tolerance=tolerance)


EXPORTS = {
  "timm": timm_export.export_timm,
  "hf": hf_export.export_hf,
  "onnx": onnx_export.export_onnx,
}


def convert(
  checkpoint_path: str,
  output_dir: str,
  fmt: str,
  *,
  model_name: Optional[str] = None,
  image_size: Optional[int] = None,
  num_check_images: int = 4,
  tolerance: float = parity.DEFAULT_TOLERANCE,
  int8: Optional[onnx_int8.Int8Options] = None,
) -> ConversionResult:
  """Converts a checkpoint to `fmt` (ALL_FORMATS) in `output_dir` and checks the outputs.

  Files are written to a staging folder beside `output_dir` and moved into it only after the
  parity check passed (`num_check_images=0` skips the check) and, with `int8` (onnx only), after
  model.int8.onnx kept its accuracy on the test split. Raises CheckpointError (bad input,
  including ConversionError: not representable in `fmt`), ParityError or AccuracyDropError.
  """
  if fmt not in ALL_FORMATS:
    raise ValueError(f"format must be one of {ALL_FORMATS}, got {fmt!r}")
  if int8 is not None and fmt != "onnx":
    raise metadata.ConversionError(f"--int8 quantizes an ONNX model: use --format onnx, not {fmt}")
  if num_check_images < 0:
    raise ValueError(f"num_check_images must be >= 0, got {num_check_images}")
  path = os.fspath(checkpoint_path)
  flat, saved = metadata.load_input(path)
  meta = metadata.resolve_metadata(flat, saved, path, model_name=model_name, image_size=image_size)
  output_dir = os.path.abspath(os.fspath(output_dir))
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    outputs = EXPORTS[fmt](flat, meta, staging, path)
    diff = None
    if num_check_images:
      images = parity.check_images(num_check_images, meta["image_size"])
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
    measured = onnx_int8.export_int8(path, meta, staging, int8) if int8 else None
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
    int8=measured,
  )
