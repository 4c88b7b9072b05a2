"""The models `vit_jax.serve` can run: one interface over JAX, a timm export and an ONNX file.

Each backend loads once and exposes `model_name`, `image_size`, `class_names` and
`__call__(images) -> probabilities`: NHWC float32 images in [-1, 1] (predict.preprocess) in,
[N, classes] float32 out. A checkpoint that cannot be served raises BackendError (one line).

* jax: a training workdir, params.npz (+ params.json) or an orbax step (predict.Predictor).
* torch: a folder written by `scripts/convert_to_pytorch.py --format timm` (convert.load_timm).
* onnx: the folder (or its model.onnx) `scripts/convert_to_pytorch.py --format onnx` wrote; the
  file's metadata (convert.ONNX_METADATA_KEY) holds the model name, image size and class names.

Nothing here imports TensorFlow, so torch may be imported in the same process.
"""

import json
import os
from typing import Protocol

import numpy as np

BACKENDS = ("jax", "torch", "onnx")


class BackendError(ValueError):
  """A checkpoint the chosen backend cannot serve: the message is one readable line."""


class Backend(Protocol):
  model_name: str
  image_size: int
  class_names: list[str]

  def __call__(self, images: np.ndarray) -> np.ndarray: ...


class JaxBackend:
  """A Flax checkpoint, jitted: each distinct batch size compiles once (the server pads)."""

  def __init__(self, path: str):
    from vit_jax import predict  # pylint: disable=g-import-not-at-top

    try:
      self._predictor = predict.Predictor(path)
    except predict.PredictError as e:
      raise BackendError(str(e)) from None
    self.image_size = self._predictor.image_size
    self.class_names = self._predictor.class_names
    self.model_name = self._predictor.model_name or os.path.basename(path.rstrip("/"))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self._predictor(images)

  @property
  def attention_kind(self) -> str:
    from vit_jax import attention  # pylint: disable=g-import-not-at-top

    return attention.map_kind(self._predictor.model)

  def attention_map(self, image: np.ndarray) -> np.ndarray:
    """[H, W, 3] model input -> [H, W] attention rollout in [0, 1] over it."""
    from vit_jax import attention  # pylint: disable=g-import-not-at-top

    return attention.attention_maps(self._predictor.model, self._predictor.params, image[None])[0]


class TorchBackend:
  """A timm export, run with torch in inference mode."""

  def __init__(self, path: str):
    import torch  # pylint: disable=g-import-not-at-top

    from vit_jax import convert  # pylint: disable=g-import-not-at-top

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise BackendError(
        f"{path}: not a timm export (no config.json); write one with "
        "scripts/convert_to_pytorch.py --format timm"
      )
    try:
      with open(config_path) as f:
        config = json.load(f)
      self._model = convert.load_timm(path)
    except Exception as e:  # pylint: disable=broad-except  # any load failure: one line
      raise BackendError(
        f"{path}: cannot load the timm export ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      ) from None
    if not config.get("num_classes"):
      raise BackendError(f"{path}: a feature extractor without a classification head")
    self._torch = torch
    self.image_size = int(config["pretrained_cfg"]["input_size"][-1])
    self.class_names = list(
      config.get("label_names") or [f"class_{i}" for i in range(config["num_classes"])]
    )
    self.model_name = config.get("vit_jax", {}).get("model_name") or os.path.basename(
      path.rstrip("/")
    )

  def __call__(self, images: np.ndarray) -> np.ndarray:
    x = self._torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32))
    with self._torch.inference_mode():
      return self._torch.softmax(self._model(x), dim=-1).numpy()


class OnnxBackend:
  """An ONNX export run by onnxruntime on the CPU."""

  def __init__(self, path: str):
    import onnxruntime  # pylint: disable=g-import-not-at-top

    from vit_jax import convert  # pylint: disable=g-import-not-at-top

    if os.path.isdir(path):  # the folder convert_to_pytorch.py --format onnx wrote
      path = os.path.join(path, convert.ONNX_FILE)
    if not os.path.isfile(path):
      raise BackendError(f"{path}: no such ONNX file")
    try:
      self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
      meta = self._session.get_modelmeta().custom_metadata_map
      info = json.loads(meta[convert.ONNX_METADATA_KEY])
    except KeyError:
      raise BackendError(
        f"{path}: no {convert.ONNX_METADATA_KEY} metadata (class names, image "
        "size); export with scripts/convert_to_pytorch.py --format onnx"
      ) from None
    except Exception as e:  # pylint: disable=broad-except  # onnxruntime's own exception types
      raise BackendError(
        f"{path}: cannot load the ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      ) from None
    self._input = self._session.get_inputs()[0].name
    self.image_size = int(info["image_size"])
    self.class_names = list(info["class_names"])
    self.model_name = info.get("model_name") or os.path.basename(path)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
    logits = self._session.run(None, {self._input: x})[0]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def load_backend(kind: str, path: str) -> Backend:
  """The backend `kind` (one of BACKENDS) for `path`; raises BackendError if it cannot serve."""
  if not os.path.exists(path):
    raise BackendError(f"{path}: no such checkpoint")
  if kind == "jax":
    return JaxBackend(path)
  if kind == "torch":
    return TorchBackend(path)
  if kind == "onnx":
    return OnnxBackend(path)
  raise BackendError(f"unknown backend {kind!r}; one of {', '.join(BACKENDS)}")
