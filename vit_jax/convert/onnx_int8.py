"""int8 ONNX for CPU serving: onnxruntime's quantization of model.onnx into model.int8.onnx,
measured against the float model on the checkpoint's test split before it is written.

* dynamic (the default): int8 weights per output channel, activations quantized per batch at run
  time; the MatMuls run as int8 dot products (VNNI / AVX-512 where the CPU has them).
* static: QDQ int8 MatMuls with activation ranges calibrated on training images.

Dynamic is the default: on the CPUs measured (docs/serving.md) it is the faster of the two for
ViT (static saves the run-time quantization but adds a quantize/dequantize pair around every
MatMul) and needs no calibration pass.

The check runs both models over the split as the evaluation pipeline preprocesses it (the data of
the run's `run.json`, or `dataset=`), and refuses the int8 model when its accuracy drops by more
than `max_accuracy_drop` points. Imports TensorFlow (the input pipeline) when it measures: torch
first (pytorch.check_import_order).
"""

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from vit_jax.convert import onnx_export
from vit_jax.convert.metadata import ConversionError

ONNX_INT8_FILE = "model.int8.onnx"
METHODS = ("dynamic", "static")
DEFAULT_MAX_ACCURACY_DROP = 1.0  # accuracy points
DEFAULT_CALIBRATION_IMAGES = 256
QUANTIZED_OPS = ["MatMul", "Gemm"]  # LayerNorm, softmax and GELU stay float: they carry outliers
CHUNK = 64  # images per onnxruntime call: bounds activation memory on large eval batches


class AccuracyDropError(RuntimeError):
  """The int8 model loses more accuracy than allowed: the message is one line with both."""


@dataclasses.dataclass(frozen=True)
class Int8Options:
  int8_method: str = "dynamic"
  calibration_split: str = "train"
  calibration_images: int = DEFAULT_CALIBRATION_IMAGES
  max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
  dataset: Optional[str] = None  # the data to measure on when the run's run.json does not say
  config_argv: Sequence[str] = ()  # --config.X=Y overrides, as vit_jax.evaluate takes them


def session(path: str, threads: Optional[int] = None) -> Any:
  """An onnxruntime CPU session: `threads` intra-op threads (default: the cores this process may
  use), one inter-op thread (a ViT graph is a chain: parallel branches only contend)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
  options.inter_op_num_threads = 1
  return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class _Calibration:
  """onnxruntime's CalibrationDataReader over NCHW float32 batches; counts what it handed out."""

  def __init__(self, batches: Iterable[np.ndarray], input_name: str):
    self._batches, self._input, self.images = iter(batches), input_name, 0

  def get_next(self) -> Optional[dict[str, np.ndarray]]:
    batch = next(self._batches, None)
    if batch is None:
      return None
    self.images += len(batch)
    return {self._input: batch}


def quantize(
  float_path: str,
  int8_path: str,
  method: str = "dynamic",
  calibration: Optional[Iterable[np.ndarray]] = None,
) -> dict[str, Any]:
  """Writes the int8 model of `float_path` to `int8_path`, with the float file's metadata and
  `precision: int8`; returns what was done. `calibration` (static): NCHW float32 batches."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnxruntime import quantization  # pylint: disable=g-import-not-at-top

  if method not in METHODS:
    raise ConversionError(f"int8 method must be one of {METHODS}, got {method!r}")
  done = dict(method=method, weights="int8 per output channel", ops=QUANTIZED_OPS)
  with tempfile.TemporaryDirectory(prefix=".int8-", dir=os.path.dirname(int8_path)) as tmp:
    prepared = os.path.join(tmp, "prepared.onnx")
    quantization.quant_pre_process(float_path, prepared)  # shapes + graph fusions first
    if method == "dynamic":
      done["activations"] = "uint8, range per batch at run time"
      quantization.quantize_dynamic(
        prepared,
        int8_path,
        weight_type=quantization.QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=QUANTIZED_OPS,
      )
    else:
      if calibration is None:
        raise ConversionError("static int8 quantization needs calibration images")
      reader = _Calibration(calibration, "images")
      quantization.quantize_static(
        prepared,
        int8_path,
        reader,
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
      )
      done["activations"] = "uint8, calibrated min/max"
      done["calibration_images"] = reader.images
  info = read_metadata(float_path)
  proto = onnx.load(int8_path)
  onnx.helper.set_model_props(
    proto, {onnx_export.ONNX_METADATA_KEY: json.dumps({**info, "precision": "int8"})}
  )
  onnx.save(proto, int8_path)
  return done


def _metadata(proto: Any) -> str:
  for prop in proto.metadata_props:
    if prop.key == onnx_export.ONNX_METADATA_KEY:
      return prop.value
  raise ConversionError(f"no {onnx_export.ONNX_METADATA_KEY} metadata in the float ONNX model")


def set_metadata(path: str, **fields: Any) -> None:
  """Adds `fields` to the vit_jax metadata JSON of the ONNX file at `path`."""
  import onnx  # pylint: disable=g-import-not-at-top

  proto = onnx.load(path)
  info = {**json.loads(_metadata(proto)), **fields}
  onnx.helper.set_model_props(proto, {onnx_export.ONNX_METADATA_KEY: json.dumps(info)})
  onnx.save(proto, path)


def read_metadata(path: str) -> dict[str, Any]:
  """The vit_jax metadata JSON of an ONNX file."""
  import onnx  # pylint: disable=g-import-not-at-top

  return json.loads(_metadata(onnx.load(path, load_external_data=False)))


# ---------------------------------------------------------------------------------------------
# The data: the evaluation pipeline's config, images and calibration batches.


def evaluation_data(checkpoint_path: str, meta: dict[str, Any], options: Int8Options) -> Any:
  """(config, DatasetInfo) of the data the checkpoint was trained on, as vit_jax.evaluate reads
  it; a ConversionError (one line) when it is unknown or disagrees with the model."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import pipeline  # pylint: disable=g-import-not-at-top

  try:
    config = pipeline.build_config(
      checkpoint_path, dict(meta), options.config_argv, dataset=options.dataset
    )
    info = input_pipeline.get_dataset_info(config)
    pipeline.check_classes(dict(meta), info, checkpoint_path, config.dataset)
  except ValueError as e:  # EvaluateError, and data_sources' errors naming the data: one line
    raise ConversionError(f"--int8 measures on the test split: {e}") from None
  return config, info


def split_batches(config: Any, info: Any, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(NCHW float32 images, labels) of `split`, preprocessed as for evaluation; no padding."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  ds = input_pipeline.get_eval_dataset(config, info, split=split, process_index=0, process_count=1)
  for batch in ds.as_numpy_iterator():
    real = batch["mask"] == 1
    if real.any():
      images = np.asarray(batch["image"][real], np.float32).transpose(0, 3, 1, 2)
      yield np.ascontiguousarray(images), batch["label"][real]


def calibration_batches(config: Any, info: Any, split: str, count: int) -> Iterator[np.ndarray]:
  """`count` images of `split` (a seeded sample across it where it is indexable), in batches."""
  from vit_jax import data_sources  # pylint: disable=g-import-not-at-top

  n = int(info.num_examples[split])
  if not n:
    raise ConversionError(f"--calibration_split={split}: the split is empty")
  rows = np.sort(np.random.default_rng(0).choice(n, min(count, n), replace=False))
  sampled = data_sources.subset(info, split, rows)
  left = count
  for images, _ in split_batches(config, sampled or info, split):
    if left <= 0:
      return
    yield images[:left]
    left -= len(images)


# ---------------------------------------------------------------------------------------------
# The measurement and the gate.


def _probabilities(sess: Any, images: np.ndarray) -> np.ndarray:
  from vit_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top

  out = [sess.run(None, {"images": images[i : i + CHUNK]})[0] for i in range(0, len(images), CHUNK)]
  return metrics.probabilities(np.concatenate(out))


def compare(
  float_path: str, int8_path: str, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
  """Both models on the same images: the accuracy of each (%), top-1 agreement (%) and the
  largest difference of any class probability."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  fp32, int8 = session(float_path), session(int8_path)
  labels, top_float, top_int8, largest = [], [], [], 0.0
  for images, y in batches:
    p, q = _probabilities(fp32, images), _probabilities(int8, images)
    labels.append(y)
    top_float.append(p.argmax(-1))
    top_int8.append(q.argmax(-1))
    largest = max(largest, float(np.abs(p - q).max()))
  if not labels:
    raise ConversionError("--int8: the test split is empty")
  labels, top_float, top_int8 = map(np.concatenate, (labels, top_float, top_int8))
  return dict(
    count=int(len(labels)),
    float_accuracy=round(100 * metrics.accuracy_score(labels, top_float), 4),
    int8_accuracy=round(100 * metrics.accuracy_score(labels, top_int8), 4),
    top1_agreement=round(100 * float(np.mean(top_float == top_int8)), 4),
    max_probability_difference=round(largest, 6),
  )


def check_drop(measured: dict[str, Any], max_accuracy_drop: float, where: str) -> None:
  """Raises AccuracyDropError when int8 loses more than `max_accuracy_drop` points."""
  drop = measured["float_accuracy"] - measured["int8_accuracy"]
  if drop > max_accuracy_drop:
    raise AccuracyDropError(
      f"{where}: int8 accuracy {measured['int8_accuracy']:.2f} % against float "
      f"{measured['float_accuracy']:.2f} % on {measured['count']} {measured['split']} images "
      f"of {measured['dataset']}: a drop of {drop:.2f} points > --max_accuracy_drop "
      f"{max_accuracy_drop:g}; nothing written"
    )


def export_int8(
  checkpoint_path: str,
  meta: dict[str, Any],
  output_dir: str,
  options: Int8Options,
  calibration: Optional[Iterable[np.ndarray]] = None,
) -> dict[str, Any]:
  """model.int8.onnx beside `output_dir`'s model.onnx, measured on the test split and gated.

  Returns the measurement (also in the file's metadata, under `int8`); raises ConversionError
  for unusable data or options and AccuracyDropError from the gate. `calibration` replaces the
  calibration images of `options` (static).
  """
  if options.max_accuracy_drop < 0:
    raise ConversionError(f"--max_accuracy_drop must be >= 0, got {options.max_accuracy_drop:g}")
  config, info = evaluation_data(checkpoint_path, meta, options)
  if options.int8_method == "static" and calibration is None:
    if options.calibration_split not in info.num_examples:
      raise ConversionError(
        f"--calibration_split={options.calibration_split}: one of {sorted(info.num_examples)}"
      )
    if options.calibration_images <= 0:
      raise ConversionError(f"--calibration_images must be > 0, got {options.calibration_images}")
    calibration = calibration_batches(
      config, info, options.calibration_split, options.calibration_images
    )
  float_path = os.path.join(output_dir, onnx_export.ONNX_FILE)
  int8_path = os.path.join(output_dir, ONNX_INT8_FILE)
  done = quantize(float_path, int8_path, options.int8_method, calibration)
  if options.int8_method == "static":
    done["calibration_split"] = options.calibration_split
  measured = dict(
    split=config.pp.test,
    dataset=config.dataset,
    **compare(float_path, int8_path, split_batches(config, info, "test")),
  )
  try:
    check_drop(measured, options.max_accuracy_drop, checkpoint_path)
  except AccuracyDropError:
    os.remove(int8_path)
    raise
  set_metadata(int8_path, quantization=done, int8=measured)
  return dict(quantization=done, **measured)
