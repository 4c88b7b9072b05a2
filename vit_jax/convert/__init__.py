"""Exports a Flax ViT or BiT ResNet (the original Google trees) to timm, Hugging Face and ONNX.

`convert()` reads a checkpoint, writes a folder for the chosen library (timm: `model.safetensors`
+ timm's hub `config.json`; hf: ViTConfig + safetensors + preprocessor config; onnx: the timm model
traced by `torch.onnx.export`, its metadata in the file), loads it back and checks its outputs
against the Flax model; the folder appears only when the check passes. What a format cannot hold
(`pre_logits` in timm, a GAP, hybrid or BiT model in hf, ...) is an error, never different
outputs. A BiT exports as timm's ResNetV2 (`resnetv2_50x1_bit`, ...).
How each export loads: checkpoints/README.md.

One module per target (`timm_export`, `hf_export`, `onnx_export`) over the shared `metadata`
(what a checkpoint is), `pytorch` (what the torch targets share) and `parity` (the output check);
`pipeline` runs them; `onnx_int8` adds model.int8.onnx, measured on the test split and gated.
Only that measurement imports TensorFlow (the input pipeline); torch, timm and transformers are
imported when used.
"""

from vit_jax.convert.hf_export import export_hf, load_hf
from vit_jax.convert.metadata import ConversionError, resolve_metadata
from vit_jax.convert.onnx_export import ONNX_FILE, ONNX_METADATA_KEY, export_onnx, onnx_forward
from vit_jax.convert.onnx_int8 import (
  DEFAULT_CALIBRATION_IMAGES,
  DEFAULT_MAX_ACCURACY_DROP,
  ONNX_INT8_FILE,
  AccuracyDropError,
  Int8Options,
)
from vit_jax.convert.onnx_int8 import METHODS as INT8_METHODS
from vit_jax.convert.onnx_int8 import quantize as quantize_onnx
from vit_jax.convert.onnx_int8 import read_metadata as read_onnx_metadata
from vit_jax.convert.onnx_int8 import session as onnx_session
from vit_jax.convert.parity import DEFAULT_TOLERANCE, ParityError, check_images, flax_forward
from vit_jax.convert.pipeline import (
  ALL_FORMATS,
  FORMATS,
  ConversionResult,
  check_export,
  convert,
)
from vit_jax.convert.pytorch import check_import_order, torch_forward
from vit_jax.convert.timm_export import export_timm, load_timm

__all__ = [
  "ALL_FORMATS",
  "DEFAULT_CALIBRATION_IMAGES",
  "DEFAULT_MAX_ACCURACY_DROP",
  "INT8_METHODS",
  "ONNX_INT8_FILE",
  "AccuracyDropError",
  "Int8Options",
  "onnx_session",
  "quantize_onnx",
  "read_onnx_metadata",
  "DEFAULT_TOLERANCE",
  "FORMATS",
  "ONNX_FILE",
  "ONNX_METADATA_KEY",
  "ConversionError",
  "ConversionResult",
  "ParityError",
  "check_export",
  "check_images",
  "check_import_order",
  "convert",
  "export_hf",
  "export_onnx",
  "export_timm",
  "flax_forward",
  "load_hf",
  "load_timm",
  "onnx_forward",
  "resolve_metadata",
  "torch_forward",
]
