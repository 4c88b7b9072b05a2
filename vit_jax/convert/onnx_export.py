"""The ONNX export: the timm model traced by `torch.onnx.export`, its metadata inside the file."""

import json
import os
import tempfile
import warnings
from typing import Any, Mapping

import numpy as np

from vit_jax.convert import pytorch, timm_export
from vit_jax.convert.metadata import Flat

ONNX_FILE = "model.onnx"
# JSON: model_name, image_size, class_names, architecture, precision (+ int8: its measurement)
ONNX_METADATA_KEY = "vit_jax"
ONNX_OPSET = 17


def export_onnx(
  flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>"
) -> str:
  """Writes model.onnx (input `images` NCHW in [-1, 1], output `logits`, any batch size);
  returns 'logits' or 'features'. What timm cannot represent is an error here too."""
  pytorch.check_import_order()
  import onnx  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  os.makedirs(output_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".timm-", dir=output_dir) as timm_dir:
    outputs = timm_export.export_timm(flat, meta, timm_dir, path)
    model = timm_export.load_timm(timm_dir)
  size = meta["image_size"]
  target = os.path.join(output_dir, ONNX_FILE)
  # dynamo=False: the TorchScript exporter needs no onnxscript and handles timm's ViT as is.
  # It warns that it is the legacy exporter and about Python conditions on shapes in its
  # trace; the parity check is what counts.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.onnx.export(
      model,
      (torch.zeros(1, 3, size, size),),
      target,
      dynamo=False,
      input_names=["images"],
      output_names=["logits"],
      opset_version=ONNX_OPSET,
      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
  proto = onnx.load(target)
  info = dict(
    model_name=meta.get("model_name"),
    image_size=size,
    class_names=meta["class_names"] or [],
    architecture=meta["architecture"],
    precision="fp32",
  )
  onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(info)})
  onnx.save(proto, target)
  os.chmod(target, 0o644)
  return outputs


def onnx_forward(model_path: str, images: np.ndarray) -> np.ndarray:
  """onnxruntime's outputs of an ONNX export for NHWC images in [-1, 1]."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
  x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
  return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float32)
