r"""A grid of training runs, chosen on validation, reported once on test.

  python -m vit_jax.sweep --config=configs/shoes.py --workdir=DIR \
      --sweep=base_lr=0.001,0.003,0.01,0.03 [--sweep=FIELD=v1,v2 ...] [--config.FIELD=VALUE ...]

Every point of the grid trains in its own workdir (`DIR/base_lr=0.01/`) with the same flags as
`vit_jax.main`; a killed sweep resumes where it stopped and skips the finished points. The
chosen point has the best `config.best_metric` (default `val_accuracy`) on the validation split;
a point that diverged is shown as failed and never chosen. The test split is read once, for the
chosen point's best checkpoint: DIR/report/ (the evaluation report) and DIR/best_params.npz.
DIR/sweep.json, DIR/sweep.md and DIR/sweep.png hold every point, its validation curve and the
choice. Multi-host: every process runs the same sequence.
"""

import itertools
import json
import os
import shutil
import sys
from typing import Any, Optional, Sequence

import ml_collections
from absl import app, flags, logging

from vit_jax import main as main_lib  # defines --config, --workdir and the cluster flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("sweep", [], "FIELD=v1,v2,...: a grid axis (repeat for more axes).")

POINT_FILE = "sweep_point.json"
DEFAULT_METRIC = "val_accuracy"


class SweepError(ValueError):
  """A grid that cannot run (unknown field, a value of the wrong type); one line says why."""


def _parse_value(field: str, text: str, kind: type) -> Any:
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if kind in (int, float, str):
      return kind(text)
  except ValueError:
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise SweepError(f"--sweep={field}=...: {text!r} is not {article} {kind.__name__}") from None
  raise SweepError(f"--sweep={field}=...: a {kind.__name__} field cannot be swept")


def parse_grid(specs: Sequence[str], config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The grid's points ({field: value}, in flag order) for `--sweep` specs over `config`."""
  if not specs:
    raise SweepError("no --sweep=FIELD=v1,v2 given: nothing to sweep")
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    if not sep or not field or not values:
      raise SweepError(f"--sweep={spec!r}: expected FIELD=v1,v2,...")
    node = config
    *path, leaf = field.split(".")
    try:
      for p in path:
        node = node[p]
      kind = node.get_type(leaf)
    except (KeyError, AttributeError):
      raise SweepError(f"--sweep={spec}: config has no field {field!r}") from None
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise SweepError(f"--sweep={spec}: {field!r} is a group of fields, not a value")
    parsed = [_parse_value(field, v.strip(), kind) for v in values.split(",")]
    if any(f == field for f, _ in axes):
      raise SweepError(f"--sweep={spec}: {field!r} is swept twice")
    axes.append((field, parsed))
  return [
    dict(zip([f for f, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])
  ]


def point_name(point: dict[str, Any]) -> str:
  return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def _curve(workdir: str, metric: str) -> list[tuple[int, float]]:
  from vit_jax import metrics  # pylint: disable=g-import-not-at-top  (jax: after the grid check)

  return [(r["step"], r[metric]) for r in metrics.read_metrics(workdir) if metric in r]


def _maximise(metric: str) -> bool:
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top

  return config_checks.BEST_MODES[metric] == "max"


def run_point(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains one point (resuming its workdir) and returns its record; a diverged point is
  'failed' with the reason. Nothing here reads the test split."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import train  # pylint: disable=g-import-not-at-top

  try:
    summary = train.train_and_evaluate(config, workdir, final_test=False)
  except train.TrainingDiverged as e:
    record = dict(status="failed", reason=str(e).split(". ")[0])
  else:
    if summary.get("preempted"):
      return dict(status="preempted")
    record = dict(
      status="done",
      best_step=summary.get("best_step"),
      best_value=_best_value(workdir, config.best_metric, summary.get("best_step")),
      final_val_accuracy=summary.get("val_accuracy"),
      final_val_loss=summary.get("val_loss"),
      steps=summary["step"],
      early_stop=summary.get("early_stop"),
    )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, POINT_FILE), "w") as f:
      json.dump(record, f, indent=2)
  return record


def _best_value(workdir: str, metric: str, step: Optional[int]) -> Optional[float]:
  return next((v for s, v in _curve(workdir, metric) if s == step), None)


def choose(records: list[dict[str, Any]], metric: str) -> Optional[int]:
  """Index of the finished point with the best `metric`; the first on a tie; None if none."""
  sign = 1 if _maximise(metric) else -1
  done = [i for i, r in enumerate(records) if r["status"] == "done" and r["best_value"] is not None]
  return max(done, key=lambda i: (sign * records[i]["best_value"], -i)) if done else None


def write_table(path: str, records: list[dict[str, Any]], metric: str, chosen: Optional[int]):
  rows = [
    f"| point | status | best {metric} | at step | final val_accuracy | final val_loss |",
    "|---|---|---|---|---|---|",
  ]
  for i, r in enumerate(records):
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    name = f"**{r['name']}** (chosen)" if i == chosen else r["name"]
    status = r["status"] if r["status"] != "failed" else f"failed: {r.get('reason', '')}"
    rows.append(
      f"| {name} | {status} | {fmt(r.get('best_value'))} | {r.get('best_step') or ''} | "
      f"{fmt(r.get('final_val_accuracy'))} | {fmt(r.get('final_val_loss'))} |"
    )
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")


def write_plot(path: str, records: list[dict[str, Any]], metric: str, chosen: Optional[int]):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(7, 4.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, r in enumerate(records):
    curve = _curve(r["workdir"], metric)
    if not curve:
      continue
    steps, values = zip(*curve)
    label = r["name"] + (
      " (chosen)" if i == chosen else " (failed)" if r["status"] == "failed" else ""
    )
    ax.plot(
      steps,
      values,
      label=label,
      linewidth=2.8 if i == chosen else 1.2,
      linestyle="--" if r["status"] == "failed" else "-",
      marker="o",
      markersize=3,
    )
  ax.set_xlabel("step")
  ax.set_ylabel(f"{metric} (validation split)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def sweep(config: ml_collections.ConfigDict, workdir: str, specs: Sequence[str]) -> dict[str, Any]:
  """Runs the grid `specs` over `config` in `workdir`; returns what sweep.json holds."""
  import jax  # pylint: disable=g-import-not-at-top

  from configs import common  # pylint: disable=g-import-not-at-top
  from vit_jax import config_checks, evaluation  # pylint: disable=g-import-not-at-top

  metric = config.best_metric or DEFAULT_METRIC
  base = common.with_overrides(config, {"best_metric": metric})
  points = parse_grid(specs, base)
  configs = []
  for point in points:  # every point checked before any trains
    cfg = common.with_overrides(base, point)
    try:
      config_checks.validate_config(cfg)
    except config_checks.ConfigError as e:
      raise SweepError(f"point {point_name(point)}: {e}") from None
    configs.append(cfg)
  os.makedirs(workdir, exist_ok=True)
  records = []
  for point, cfg in zip(points, configs):
    name = point_name(point)
    point_dir = os.path.join(workdir, name)
    done = os.path.join(point_dir, POINT_FILE)
    if os.path.isfile(done):
      with open(done) as f:
        record = json.load(f)
      logging.info("sweep: %s finished before (%s); skipped", name, record["status"])
    else:
      logging.info("sweep: training %s in %s", name, point_dir)
      record = run_point(cfg, point_dir)
      if record["status"] == "preempted":
        logging.warning("sweep: pre-empted in %s; rerun the same command to resume", name)
        return dict(status="preempted", point=name)
    records.append(dict(name=name, overrides=point, workdir=point_dir, **record))

  chosen = choose(records, metric)
  result: dict[str, Any] = dict(metric=metric, split="val", points=records, chosen=None)
  if chosen is not None:
    best = records[chosen]
    result["chosen"] = best["name"]
    source = os.path.join(best["workdir"], "best_params.npz")
    report = evaluation.evaluate(source, os.path.join(workdir, "report"), (), "test")
    result["test"] = {k: report[k] for k in ("accuracy", "log_loss", "macro_f1", "count")}
    if jax.process_index() == 0:
      for ext in (".npz", ".json"):
        shutil.copyfile(source[: -len(".npz")] + ext, os.path.join(workdir, "best_params" + ext))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      json.dump(result, f, indent=2)
    write_table(os.path.join(workdir, "sweep.md"), records, metric, chosen)
    write_plot(os.path.join(workdir, "sweep.png"), records, metric, chosen)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    dist = main_lib.distributed_args(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, os.environ
    )
    parse_grid(FLAGS.sweep, FLAGS.config)  # a bad grid fails before TensorFlow or a device
  except ValueError as e:
    main_lib.fail(e)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top

  try:
    main_lib.start_distributed(dist)
  except main_lib.DistributedSetupError as e:
    main_lib.fail(e)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  try:
    result = sweep(FLAGS.config, FLAGS.workdir, FLAGS.sweep)
  except ValueError as e:
    main_lib.fail(e)
  if result.get("chosen"):
    print(
      f"chosen: {result['chosen']} ({result['metric']} on the val split); test accuracy "
      f"{result['test']['accuracy']:.4f} on {result['test']['count']} images",
      flush=True,
    )
  elif result.get("status") != "preempted":
    print("error: no point of the sweep finished without diverging", file=sys.stderr)
    sys.exit(1)
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
