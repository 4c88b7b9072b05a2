"""The models `vit_jax.serve` can run: one interface over JAX, a timm export and an ONNX file.

Each backend loads once and exposes `model_name`, `image_size`, `class_names` and
`__call__(images) -> probabilities`: NHWC float32 images in [-1, 1] (predict.preprocess) in,
[N, classes] float32 out. A checkpoint that cannot be served raises BackendError (one line).

* jax: a training workdir, params.npz (+ params.json) or an orbax step (predict.Predictor).
* torch: a folder written by `scripts/convert_to_pytorch.py --format timm` (convert.load_timm).
* onnx: the folder (or one .onnx file) `scripts/convert_to_pytorch.py --format onnx` wrote; the
  file's metadata (convert.ONNX_METADATA_KEY) holds the model name, image size and class names.
  A folder with model.int8.onnx (`--int8`) serves it unless `precision="fp32"`.

Each backend says its `precision` ("fp32" or "int8"). The onnx and torch backends run `threads`
intra-op threads (default: the cores this process may use, os.sched_getaffinity) and one inter-op
thread; JAX's CPU client sizes its own thread pool.

Nothing here imports TensorFlow, so torch may be imported in the same process.
"""

import json
import os
from typing import Optional, Protocol

import numpy as np

BACKENDS = ("jax", "torch", "onnx")
PRECISIONS = ("fp32", "int8")


def default_threads() -> int:
  """The cores this process may run on (its CPU affinity, which containers and taskset set)."""
  return len(os.sched_getaffinity(0))


class BackendError(ValueError):
  """A checkpoint the chosen backend cannot serve: the message is one readable line."""


class Backend(Protocol):
  model_name: str
  image_size: int
  class_names: list[str]
  precision: str

  def __call__(self, images: np.ndarray) -> np.ndarray: ...


class JaxBackend:
  """A Flax checkpoint, jitted: each distinct batch size compiles once (the server pads)."""

  precision = "fp32"

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

  precision = "fp32"

  def __init__(self, path: str, threads: Optional[int] = None):
    import torch  # pylint: disable=g-import-not-at-top

    from vit_jax import convert  # pylint: disable=g-import-not-at-top

    self.threads = threads or default_threads()
    torch.set_num_threads(self.threads)
    try:  # settable once per process, before torch's first parallel work
      torch.set_num_interop_threads(1)
    except RuntimeError:
      pass

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
  """An ONNX export run by onnxruntime on the CPU: the int8 model of a folder when it has one."""

  def __init__(self, path: str, precision: Optional[str] = None, threads: Optional[int] = None):
    from vit_jax import convert  # pylint: disable=g-import-not-at-top

    path = self._file(path, precision)
    try:
      self._session = convert.onnx_session(path, threads)
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
    self.precision = info.get("precision", "fp32")
    if precision and self.precision != precision:
      raise BackendError(f"{path}: a {self.precision} model, not {precision}")
    self.threads = self._session.get_session_options().intra_op_num_threads
    self.image_size = int(info["image_size"])
    self.class_names = list(info["class_names"])
    self.model_name = info.get("model_name") or os.path.basename(path)

  @staticmethod
  def _file(path: str, precision: Optional[str]) -> str:
    """The .onnx file to serve: a file as given; in a folder, int8 if present (or asked)."""
    from vit_jax import convert  # pylint: disable=g-import-not-at-top

    if os.path.isdir(path):  # the folder convert_to_pytorch.py --format onnx wrote
      int8 = os.path.join(path, convert.ONNX_INT8_FILE)
      if precision == "int8" and not os.path.isfile(int8):
        raise BackendError(
          f"{path}: no {convert.ONNX_INT8_FILE}; write it with scripts/convert_to_pytorch.py "
          "--format onnx --int8"
        )
      use_int8 = precision == "int8" or (precision is None and os.path.isfile(int8))
      path = int8 if use_int8 else os.path.join(path, convert.ONNX_FILE)
    if not os.path.isfile(path):
      raise BackendError(f"{path}: no such ONNX file")
    return path

  def __call__(self, images: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
    logits = self._session.run(None, {self._input: x})[0]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def load_backend(
  kind: str, path: str, precision: Optional[str] = None, threads: Optional[int] = None
) -> Backend:
  """The backend `kind` (one of BACKENDS) for `path`; raises BackendError if it cannot serve.

  `precision` (PRECISIONS; default: the onnx folder's int8 model if present, else fp32) and
  `threads` (onnx and torch) as the module docstring says."""
  if kind not in BACKENDS:
    raise BackendError(f"unknown backend {kind!r}; one of {', '.join(BACKENDS)}")
  if precision not in (None, *PRECISIONS):
    raise BackendError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
  if precision == "int8" and kind != "onnx":
    raise BackendError(f"the {kind} backend serves fp32; int8 is the onnx backend's (--int8)")
  if threads is not None and kind == "jax":
    raise BackendError("--threads sets the onnx and torch backends; JAX sizes its own threads")
  if threads is not None and threads <= 0:
    raise BackendError(f"threads must be > 0, got {threads}")
  if not os.path.exists(path):
    raise BackendError(f"{path}: no such checkpoint")
  if kind == "jax":
    return JaxBackend(path)
  if kind == "torch":
    return TorchBackend(path, threads)
  return OnnxBackend(path, precision, threads)
