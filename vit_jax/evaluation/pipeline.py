"""Evaluation of a checkpoint on a whole split: its config, predictions on all devices, and the
report files (predictions.npz, report.json, figures, report.html). `vit_jax.evaluate` is its
command line; `train.train_and_evaluate` calls `write_report` when `config.report` is set.

The data is what the run trained on (the config in its `run.json`: defaults of configs/common.py,
then run.json, then `--config.X=Y` flags), so one command evaluates on image folders, tfds
datasets and Fashion-MNIST. Every example of the split is counted once: a jitted forward pass over
all devices on the evaluation pipeline's batches (masked padding), logits kept for the real
examples in split order.
"""

import json
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from configs import common
from vit_jax import (
  attention,
  checkpoint,
  data_sources,
  forward,
  input_pipeline,
  models,
  predict,
  preprocess,
)
from vit_jax import metrics as run_metrics
from vit_jax.evaluation import figures as eval_figures
from vit_jax.evaluation import html_report
from vit_jax.evaluation import metrics as eval_metrics

NUM_ATTENTION_IMAGES = 4
NUM_MISTAKES = 12


class EvaluateError(ValueError):
  """A user error (checkpoint, flags, data): the message is one readable line."""


# ---------------------------------------------------------------------------------------------
# Checkpoint and config.


def run_dir(checkpoint_path: str) -> str:
  """The training workdir a checkpoint path belongs to (where run.json and metrics.jsonl are):
  the folder of an .npz, WORKDIR for WORKDIR/checkpoints/STEP, else the path itself."""
  path = os.path.normpath(checkpoint_path)
  if os.path.isfile(path):
    return os.path.dirname(path)
  if os.path.basename(path).isdigit():
    return os.path.dirname(os.path.dirname(path))
  return path


def load_checkpoint(path: str) -> tuple[Any, dict[str, Any]]:
  """(params, metadata) of a classifier checkpoint (`predict.load_classifier`), or an
  EvaluateError."""
  try:
    return predict.load_classifier(path)
  except predict.PredictError as e:
    raise EvaluateError(str(e)) from None


def _merge(config: ml_collections.ConfigDict, values: dict[str, Any], where: str) -> None:
  """run.json's values over the defaults; fields this version does not know are skipped."""
  for key, value in values.items():
    if key not in config:
      logging.warning("%s.%s (from run.json) is no config field here; ignored", where, key)
    elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(config[key], value, f"{where}.{key}")
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def build_config(
  checkpoint_path: str,
  meta: dict[str, Any],
  config_argv: Sequence[str],
  split: Optional[str] = None,
  dataset: Optional[str] = None,
) -> ml_collections.ConfigDict:
  """configs/common.py's defaults, then the run's config (run.json), then `dataset` (a preset
  of configs/common.py or an image folder), then `--config.X=Y`."""
  config = common.get_config()
  run_json = os.path.join(run_dir(checkpoint_path), "run.json")
  if os.path.isfile(run_json):
    with open(run_json) as f:
      _merge(config, json.load(f).get("config", {}), "config")
  if dataset:
    common.with_dataset_or_folder(config, dataset)
  config.pp.crop = int(meta["image_size"])
  flag_values = flags.FlagValues()  # a fresh set per call: overrides of one run only
  argv = ["evaluate", *config_argv]
  try:  # an unknown field fails in the definition already (it reads argv for the overrides)
    holder = config_flags.DEFINE_config_dict(
      "config", config, flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections' KeyError text arrives repr-escaped: unescape it onto one line.
    reason = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
    raise EvaluateError(f"bad --config flag: {reason}") from None
  config = holder.value
  if split:
    config.pp.test = split
  if not config.dataset:
    raise EvaluateError(
      f"{checkpoint_path}: no run.json at {run_json} to say what data the "
      "model was trained on: give --config.dataset= (an image folder, "
      "fashion_mnist or a tfds name)"
    )
  if config.pp.crop != int(meta["image_size"]):
    raise EvaluateError(
      f"--config.pp.crop={config.pp.crop}, but {checkpoint_path} was trained "
      f"at {meta['image_size']} px"
    )
  n = jax.device_count()
  if config.batch_eval % n:
    raise EvaluateError(
      f"config.batch_eval={config.batch_eval} is not divisible by the {n} "
      "devices (--config.batch_eval=...)"
    )
  return config


def check_classes(
  meta: dict[str, Any], info: data_sources.DatasetInfo, checkpoint_path: str, dataset: str
) -> list[str]:
  """The class names; an EvaluateError naming both sides if model and data disagree."""
  data_names = list(info.class_names)
  model_names = meta.get("class_names")
  if model_names is not None and list(model_names) != data_names:
    raise EvaluateError(
      f"{checkpoint_path} was trained on {len(model_names)} classes "
      f"{list(model_names)}, but {dataset} has {len(data_names)} classes "
      f"{data_names}"
    )
  if int(meta["num_classes"]) != len(data_names):
    raise EvaluateError(
      f"{checkpoint_path} has {meta['num_classes']} outputs, but {dataset} "
      f"has {len(data_names)} classes {data_names}"
    )
  return data_names


# ---------------------------------------------------------------------------------------------
# Predictions: all devices, every example once, split order.


def predict_split(
  config: ml_collections.ConfigDict, info: data_sources.DatasetInfo, model: Any, params: Any
) -> dict[str, np.ndarray]:
  """{'logits' [N, C] float32, 'labels' [N], 'indices' [N]} of the eval split, in split order.

  Collective: every process calls it (each feeds its slice); every process gets all N rows.
  """
  out = forward.apply_split(
    config, info, lambda p, images: model.apply({"params": p}, images, train=False), params
  )
  return dict(logits=out["outputs"], labels=out["labels"], indices=out["indices"])


def example_ids(info: data_sources.DatasetInfo, indices: np.ndarray) -> np.ndarray:
  """Per example: its file path for an image folder, else its index in the split."""
  source = info.source
  if isinstance(source, data_sources.IndexedSource) and source.is_files:
    return np.asarray(source.splits["test"].data)[indices].astype(str)
  return np.asarray(indices, np.int64)


def example_images(info: data_sources.DatasetInfo, indices: Sequence[int]) -> list[np.ndarray]:
  """The split's images at `indices`, decoded as they are stored ([H, W, 3] uint8)."""
  source = info.source
  if isinstance(source, data_sources.IndexedSource):
    data = source.splits["test"].data
    if source.is_files:
      return [predict.load_rgb(str(data[i])) for i in indices]
    return [np.repeat(data[i][..., None], 3, axis=-1) for i in indices]
  wanted, found = set(int(i) for i in indices), {}
  if not wanted:
    return []
  records = data_sources.tfds_records(source, source.split_names["test"], seed=None)
  for i, (encoded, _) in records.take(max(wanted) + 1).enumerate().as_numpy_iterator():
    if int(i) in wanted:
      found[int(i)] = preprocess.decode(encoded).numpy()
  return [found[int(i)] for i in indices]


# ---------------------------------------------------------------------------------------------
# The report.


def _figures(
  out: str,
  report: dict[str, Any],
  arrays: dict[str, np.ndarray],
  info: Any,
  model: Any,
  params: Any,
  config: ml_collections.ConfigDict,
  image_size: int,
  workdir: Optional[str],
) -> dict[str, Optional[str]]:
  names, labels = report["class_names"], arrays["labels"]
  probs = eval_metrics.probabilities(arrays["logits"])
  png = lambda key: os.path.join(out, f"{key}.png")
  figures = dict(
    confusion_matrix=eval_figures.confusion_matrix(
      np.array(report["confusion_matrix"]), names, report["top_confusions"], png("confusion_matrix")
    ),
    roc_curves=eval_figures.roc_curves(
      labels, probs, names, report["roc_auc_ovr_per_class"], png("roc_curves")
    ),
    reliability_diagram=eval_figures.reliability_diagram(
      eval_metrics.calibration_bins(probs, labels), report["ece"], png("reliability_diagram")
    ),
  )
  rows = run_metrics.read_metrics(workdir) if workdir else []
  figures["training_curves"] = eval_figures.training_curves(rows, png("training_curves"))

  predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
  wrong = np.flatnonzero(predicted != labels)
  worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:NUM_MISTAKES]
  figures["mistakes"] = eval_figures.mistakes_gallery(
    example_images(info, arrays["indices"][worst]),
    [names[labels[i]] for i in worst],
    [names[predicted[i]] for i in worst],
    confidence[worst].tolist(),
    png("mistakes"),
  )

  first = np.arange(min(NUM_ATTENTION_IMAGES, len(labels)))
  inputs = np.stack(
    [
      predict.preprocess(image, image_size, config.pp.eval_resize)
      for image in example_images(info, arrays["indices"][first])
    ]
  )
  maps = attention.attention_maps(model, params, inputs)
  captions = [f"{names[labels[i]]} (predicted {names[predicted[i]]})" for i in first]
  figures["attention"] = eval_figures.attention_overlays(
    list((inputs + 1) / 2), maps, captions, attention.map_kind(model), png("attention")
  )
  for key, path in figures.items():  # a figure not drawn this time: no stale file of an earlier
    if path is None and os.path.exists(png(key)):
      os.remove(png(key))
  return figures


def write_report(
  output_dir: str,
  *,
  config: ml_collections.ConfigDict,
  info: data_sources.DatasetInfo,
  params: Any,
  meta: dict[str, Any],
  workdir: Optional[str] = None,
  source: Optional[dict[str, Any]] = None,
) -> Optional[dict[str, Any]]:
  """Evaluates `params` (host arrays of the model in `meta`) on config's eval split and writes
  predictions.npz, report.json, the figures and report.html into `output_dir`.

  Collective (every process calls it); only process 0 writes, and gets the report back.
  `workdir`: a training run's folder, for its metrics.jsonl (training curves).
  """
  model = models.model_from_metadata(meta)
  arrays = predict_split(config, info, model, params)
  if jax.process_index() != 0:
    return None
  os.makedirs(output_dir, exist_ok=True)
  class_names = list(info.class_names)
  np.savez(
    os.path.join(output_dir, "predictions.npz"),
    logits=arrays["logits"],
    labels=arrays["labels"],
    class_names=np.array(class_names),
    ids=example_ids(info, arrays["indices"]),
  )
  report = eval_metrics.report_from_predictions(dict(arrays, class_names=class_names))
  source = dict(
    source or {},
    dataset=config.dataset,
    split=config.pp.test,
    model_name=meta.get("model_name"),
    image_size=int(meta["image_size"]),
  )
  with open(os.path.join(output_dir, "report.json"), "w") as f:
    json.dump(dict(report, source=source), f, indent=2)
  figures = _figures(
    output_dir, report, arrays, info, model, params, config, int(meta["image_size"]), workdir
  )
  with open(os.path.join(output_dir, "report.html"), "w") as f:
    f.write(html_report.render(report, figures, source))
  logging.info(
    "evaluation of %d examples: accuracy %.4f; report in %s",
    report["count"],
    report["accuracy"],
    output_dir,
  )
  return report


def evaluate(
  checkpoint_path: str,
  output_dir: str,
  config_argv: Sequence[str] = (),
  split: Optional[str] = None,
) -> dict[str, Any]:
  """The command line's work: load, configure, check the classes, write the report."""
  params, meta = load_checkpoint(checkpoint_path)
  config = build_config(checkpoint_path, meta, config_argv, split)
  info = input_pipeline.get_dataset_info(config)
  check_classes(meta, info, checkpoint_path, config.dataset)
  workdir = run_dir(checkpoint_path)
  source = dict(checkpoint=checkpoint_path)
  if chosen_by := checkpoint.chosen_by(meta):  # best_params.npz: say what chose it
    source["chosen_by"] = chosen_by
  return write_report(
    output_dir, config=config, info=info, params=params, meta=meta, workdir=workdir, source=source
  )
