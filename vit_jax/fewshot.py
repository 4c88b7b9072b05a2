r"""Few-shot linear evaluation, the ViT paper's protocol: frozen features, and a closed-form
regularised least-squares classifier fitted on 1, 5, 10 or 25 examples per class.

  python -m vit_jax.fewshot --checkpoint PATH [--dataset NAME] [--shots 1,5,10,25] \
      [--seeds 5] [--from_scratch] [--json] [--config.FIELD=VALUE ...]

PATH is a training workdir, an exported `params.npz` (with its `params.json`), an orbax step
folder, or an original Google `.npz` (ViT-B_16.npz, an ImageNet-21k file, or BiT-M-R50x1.npz,
evaluated at 224 px: the preset is read from the file name or `--config.model_name`). The data is
what the run trained on (its `run.json`), or `--dataset`: a preset of configs/common.py
(`fashion_mnist_shoes`, `cifar10`, ...) or an image folder; `--config.*` flags set any other
field. `--from_scratch` evaluates a random initialisation of the same architecture instead
(`--config.seed`), the baseline.

The protocol (as big_vision's evaluator):
  * features: the model's pre-logits output (the representation layer when there is one, else
    the class token or the pooled tokens, as the model classifies; a BiT ResNet's globally
    average-pooled final feature map), computed at the checkpoint's resolution with the
    evaluation preprocessing, by a jitted forward pass over all devices, for the test split and
    the train examples some seed samples (the whole train split from tfds);
  * for each shot count k and seed s: k training examples per class drawn without replacement
    (the draw depends on s only, so the 1-shot sample is in the 5-shot one);
  * features standardised with the sample's mean and standard deviation, plus a constant feature
    of 100 as bias (almost unregularised); ridge regression onto +-1 one-hot targets in closed
    form (thin SVD); the L2 strength is chosen on the sample itself from the grid 2^-10 ... 2^20
    by leave-one-out: the value with the smallest leave-one-out squared error (computed in closed
    form from the hat matrix, no refitting);
  * accuracy on the whole test split; the table gives mean and standard deviation over seeds.

`config.fewshot` runs the same evaluator during training (`train.train_and_evaluate`).
Exit codes: 0 done; 2 a bad checkpoint, flag or data (one line on stderr, no traceback).
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

SHOTS = (1, 5, 10, 25)
L2_GRID = tuple(2.0**i for i in range(-10, 21))
BIAS_FEATURE = 100.0  # a large constant feature: its weight, the bias, is almost unregularised
# The resolution of the original BiT files' upstream training (BiT-M, BiT-S): their features.
BIT_IMAGE_SIZE = 224


class FewshotError(ValueError):
  """A user error (checkpoint, flags, data): the message is one readable line."""


# ---------------------------------------------------------------------------------------------
# The classifier: numpy, float64.


def sample_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """`shots` indices per class, drawn without replacement; a seed always draws the same ones,
  and a smaller shot count draws a prefix of a larger one's per-class draw."""
  rng = np.random.default_rng(seed)
  picked = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise FewshotError(f"class {c} has {len(members)} training examples, fewer than {shots}")
    picked.append(rng.permutation(members)[:shots])
  return np.concatenate(picked)


def sampled_rows(
  labels: np.ndarray, num_classes: int, shots: Sequence[int], seeds: int
) -> np.ndarray:
  """The sorted train indices that any (shot count, seed) of `evaluate_features` samples."""
  draws = [sample_indices(labels, num_classes, max(shots), seed) for seed in range(seeds)]
  return np.unique(np.concatenate(draws))  # each seed's smaller samples are prefixes of this


def design_matrix(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Standardised features with the constant bias feature appended: [N, D + 1] float64."""
  z = (np.asarray(x, np.float64) - mean) / std
  return np.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)


def ridge(x: np.ndarray, targets: np.ndarray, l2: float) -> np.ndarray:
  """argmin_w |x w - targets|^2 + l2 |w|^2, in closed form: w [D, C] for x [N, D]."""
  return _ridge_from_svd(np.linalg.svd(x, full_matrices=False), targets, l2)


def loo_squared_errors(x: np.ndarray, targets: np.ndarray, grid: Sequence[float]) -> np.ndarray:
  """Leave-one-out mean squared error of ridge for each L2 strength in `grid` (PRESS): with the
  hat matrix H = x (x'x + l2)^-1 x', example i's left-out residual is r_i / (1 - H_ii)."""
  return _loo_from_svd(np.linalg.svd(x, full_matrices=False), targets, grid)


# The two share one thin SVD x = U diag(s) V' in fit_and_score.
def _ridge_from_svd(svd: tuple, targets: np.ndarray, l2: float) -> np.ndarray:
  u, s, vt = svd
  return (vt.T * (s / (s**2 + l2))) @ (u.T @ targets)


def _loo_from_svd(svd: tuple, targets: np.ndarray, grid: Sequence[float]) -> np.ndarray:
  u, s, _ = svd
  proj = u.T @ targets
  errors = []
  for l2 in grid:
    shrink = s**2 / (s**2 + l2)
    residuals = targets - (u * shrink) @ proj
    leverage = np.einsum("ij,j,ij->i", u, shrink, u)
    loo = residuals / np.maximum(1.0 - leverage, 1e-12)[:, None]
    errors.append(float(np.mean(loo**2)))
  return np.array(errors)


def fit_and_score(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  grid: Sequence[float] = L2_GRID,
) -> tuple[float, float]:
  """(test accuracy, chosen L2) of the ridge classifier fitted on (train_x, train_y)."""
  mean = train_x.mean(axis=0, dtype=np.float64)
  std = train_x.std(axis=0, dtype=np.float64) + 1e-5
  x = design_matrix(train_x, mean, std)
  targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
  svd = np.linalg.svd(x, full_matrices=False)
  l2 = float(grid[int(np.argmin(_loo_from_svd(svd, targets, grid)))])
  w = _ridge_from_svd(svd, targets, l2)
  predictions = np.argmax(design_matrix(test_x, mean, std) @ w, axis=1)
  return float(np.mean(predictions == test_y)), l2


def evaluate_features(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  num_classes: int,
  shots: Sequence[int] = SHOTS,
  seeds: int = 5,
) -> dict[str, dict[str, Any]]:
  """{str(k): {mean, std, min, accuracies, l2}} over seeds 0..seeds-1, for each shot count k."""
  out = {}
  for k in shots:
    accuracies, l2s = [], []
    for seed in range(seeds):
      idx = sample_indices(train[1], num_classes, k, seed)
      acc, l2 = fit_and_score(train[0][idx], train[1][idx], test[0], test[1], num_classes)
      accuracies.append(acc)
      l2s.append(l2)
    out[str(k)] = dict(
      mean=float(np.mean(accuracies)),
      std=float(np.std(accuracies)),
      min=float(np.min(accuracies)),
      accuracies=accuracies,
      l2=l2s,
    )
  return out


# ---------------------------------------------------------------------------------------------
# Features: the jitted forward pass over a split.


def dataset_config(config: Any, dataset: str) -> Any:
  """A copy of `config` reading `dataset` (a configs/common.py preset or an image folder) at
  the same resolution."""
  from configs import common  # pylint: disable=g-import-not-at-top

  out = config.copy_and_resolve_references()
  out.unlock()
  return common.with_dataset_or_folder(out, dataset)


@dataclasses.dataclass
class Features:
  """Pre-logits features of a dataset's two splits, and its class names."""

  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  class_names: tuple[str, ...]
  train_computed: int  # train examples run through the model (the other rows of train: zeros)


class FeatureExtractor:
  """The train and test splits of one dataset config, ready to be run through models."""

  def __init__(self, config: Any):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)

    config = config.copy_and_resolve_references()
    config.val_fraction = 0.0  # the shots are drawn from the whole train split; nothing is chosen
    self.config = config
    self.info = input_pipeline.get_dataset_info(config)
    train_config = config.copy_and_resolve_references()
    train_config.pp.test = config.pp.train  # the train split, through the eval preprocessing
    self.train_config = train_config
    self.train_info = input_pipeline.get_dataset_info(train_config)

  def split(
    self, model: Any, params: Any, split: str, rows: Optional[np.ndarray] = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of the 'train' or 'test' split, in split order, or of its
    examples `rows` only, in that order (an indexable source); `model` is built with
    num_classes=None (it returns the pre-logits), `params` may hold a head."""
    from vit_jax import data_sources, forward  # pylint: disable=g-import-not-at-top

    config, info = (
      (self.train_config, self.train_info) if split == "train" else (self.config, self.info)
    )
    if rows is not None:  # the pipelines read the config's test split: here, this split
      info = data_sources.subset(info, "test", rows)
      if info is None:
        raise FewshotError(f"{config.dataset}: a tfds split cannot be read by example index")
    body = {k: v for k, v in params.items() if k != "head"}
    fn = lambda p, images: model.apply({"params": p}, images, train=False)
    result = forward.apply_split(config, info, fn, body)
    return result["outputs"], result["labels"]

  def train_labels(self) -> Optional[np.ndarray]:
    """The train split's labels without running a model; None for a tfds source."""
    from vit_jax import data_sources  # pylint: disable=g-import-not-at-top

    source = self.train_info.source
    if not isinstance(source, data_sources.IndexedSource):
      return None
    return source.splits["test"].labels.astype(np.int64)

  def __call__(
    self, model: Any, params: Any, shots: Sequence[int] = (), seeds: int = 0
  ) -> Features:
    """Both splits' features. Given the `shots` and `seeds` that `evaluate_features` will use,
    only the train examples it samples go through the model when the source is indexable (an
    image folder, Fashion-MNIST): the other rows of `train` stay zero and are never read."""
    labels = self.train_labels()
    if shots and seeds and labels is not None:
      rows = sampled_rows(labels, self.info.num_classes, shots, seeds)
      x, _ = self.split(model, params, "train", rows)
      features = np.zeros((len(labels), x.shape[1]), x.dtype)
      features[rows] = x
      train, computed = (features, labels), len(rows)
    else:
      train = self.split(model, params, "train")
      computed = len(train[1])
    return Features(
      train=train,
      test=self.split(model, params, "test"),
      class_names=self.info.class_names,
      train_computed=computed,
    )


class Evaluator:
  """`config.fewshot` during training: `Evaluator(config)(params) -> {metric: value}`."""

  def __init__(self, config: Any):
    from vit_jax import models  # pylint: disable=g-import-not-at-top

    self.shots = tuple(int(k) for k in config.fewshot.shots)
    self.seeds = int(config.fewshot.seeds)
    self.model = models.get_model(config.model_name, None, **config.model)
    self.extractors = {
      dataset_name(d): FeatureExtractor(dataset_config(config, d)) for d in config.fewshot.datasets
    }

  def __call__(self, params: Any) -> dict[str, float]:
    scalars = {}
    for name, extract in self.extractors.items():
      features = extract(self.model, params, self.shots, self.seeds)
      table = evaluate_features(
        features.train, features.test, len(features.class_names), self.shots, self.seeds
      )
      for k, row in table.items():
        scalars[f"fewshot_{name}_{k}shot"] = row["mean"]
        scalars[f"fewshot_{name}_{k}shot_std"] = row["std"]
    return scalars


def dataset_name(dataset: str) -> str:
  """A metric-friendly name: the preset's, or a folder's base name."""
  return os.path.basename(os.path.normpath(dataset)) or dataset


# ---------------------------------------------------------------------------------------------
# A checkpoint's model: exported (with metadata) or an original Google file.


def checkpoint_model(
  path: str, model_name: Optional[str], params: Mapping[str, Any], meta: Mapping[str, Any]
) -> tuple[Any, int]:
  """(feature model with num_classes=None, image size) for a checkpoint's params and metadata."""
  from vit_jax import models, models_resnet  # pylint: disable=g-import-not-at-top

  if meta.get("architecture"):
    return models.model_from_metadata(dict(meta, num_classes=0)), int(meta["image_size"])
  name = model_name or next(
    (n for n in sorted(models.MODEL_CONFIGS, key=len, reverse=True) if n in os.path.basename(path)),
    None,
  )
  if name is None:
    raise FewshotError(
      f"{path}: no metadata beside it and no preset name in the file name; "
      "give --config.model_name=..."
    )
  representation = params.get("pre_logits", {}).get("kernel")
  model = models.get_model(
    name, None, representation_size=None if representation is None else representation.shape[1]
  )
  if models.is_bit(model):  # a CNN has no position grid to read the resolution from
    return model, BIT_IMAGE_SIZE
  posemb = params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
  if posemb is None:
    raise FewshotError(f"{path}: no Transformer/posembed_input/pos_embedding: not a ViT file")
  grid = int(round((posemb.shape[1] - (model.classifier == "token")) ** 0.5))
  patch = model.patch_size * models_resnet.stem_stride(model.resnet)
  return model, grid * patch


# ---------------------------------------------------------------------------------------------
# Command line.


def run(
  checkpoint_path: str,
  config_argv: Sequence[str] = (),
  *,
  dataset: Optional[str] = None,
  shots: Sequence[int] = SHOTS,
  seeds: int = 5,
  from_scratch: bool = False,
) -> dict[str, Any]:
  """The command line's work: load, configure, extract, fit; returns the result table."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import checkpoint, evaluation  # pylint: disable=g-import-not-at-top

  try:
    params, meta = checkpoint.load_for_inference(checkpoint_path)
  except checkpoint.CheckpointError as e:
    raise FewshotError(str(e).splitlines()[0]) from None
  model_flag = next(
    (a.split("=", 1)[1] for a in config_argv if a.startswith("--config.model_name=")), None
  )
  model, image_size = checkpoint_model(checkpoint_path, model_flag, params, meta)
  config = evaluation.build_config(
    checkpoint_path, dict(meta, image_size=image_size), config_argv, dataset=dataset
  )
  if from_scratch:
    variables = jax.jit(model.init)(
      jax.random.PRNGKey(config.seed), np.zeros((1, image_size, image_size, 3), np.float32)
    )
    params = jax.device_get(variables["params"])
  features = FeatureExtractor(config)(model, params, shots, seeds)
  table = evaluate_features(features.train, features.test, len(features.class_names), shots, seeds)
  return dict(
    checkpoint=checkpoint_path,
    start="random initialisation" if from_scratch else "checkpoint",
    model_name=model.model_name,
    image_size=image_size,
    dataset=config.dataset,
    class_names=list(features.class_names),
    feature_dim=int(features.train[0].shape[1]),
    train_examples=int(len(features.train[1])),
    train_examples_featurized=features.train_computed,
    test_examples=int(len(features.test[1])),
    seeds=seeds,
    shots=table,
  )


def format_table(result: Mapping[str, Any]) -> str:
  lines = [
    f"{result['model_name']} ({result['start']}), {result['feature_dim']}-d features at "
    f"{result['image_size']} px; {result['dataset']} {result['class_names']}: "
    f"{result['test_examples']} test images, {result['seeds']} seeds",
    "shots per class   accuracy (mean +- std over seeds)   min",
  ]
  for k, row in result["shots"].items():
    lines.append(f"{k:>15}   {row['mean']:.4f} +- {row['std']:.4f}{'':>17}{row['min']:.4f}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vit_jax.fewshot", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="training workdir, exported .npz, orbax step folder, or an original Google .npz",
  )
  parser.add_argument(
    "--dataset", default=None, help="a configs/common.py preset or an image folder"
  )
  parser.add_argument("--shots", default="1,5,10,25", help="comma-separated shots per class")
  parser.add_argument("--seeds", type=int, default=5, help="samples per shot count")
  parser.add_argument(
    "--from_scratch", action="store_true", help="a random initialisation of the same model"
  )
  parser.add_argument("--json", action="store_true", help="print the result as JSON")
  args, config_flags = parser.parse_known_args(argv)
  unknown = [a for a in config_flags if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)} (data fields are --config.X=Y)")
  try:
    shots = tuple(int(k) for k in args.shots.split(","))
  except ValueError:
    parser.error(f"--shots={args.shots!r}: expected comma-separated positive integers")
  if min(shots) < 1 or args.seeds < 1:
    parser.error("--shots and --seeds must be positive")
  if not os.path.exists(args.checkpoint):  # before TensorFlow and JAX load: a typo fails at once
    print(f"error: {args.checkpoint}: no such checkpoint", file=sys.stderr)
    return 2
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    result = run(
      args.checkpoint,
      config_flags,
      dataset=args.dataset,
      shots=shots,
      seeds=args.seeds,
      from_scratch=args.from_scratch,
    )
  except ValueError as e:  # FewshotError, EvaluateError, the data sources' errors
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2) if args.json else format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
