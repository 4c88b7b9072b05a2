r"""A small ViT against a BiT ResNet of its size on the demo's data (docs/vit_vs_cnn.md).

  python -m benchmarks vit_vs_cnn [--workdir workdirs/vit_vs_cnn] [--quick] \
      [--fashion_mnist_dir PATH] [--json]

For each of R+ViT-tiny_8 (the demo's ViT) and BiT-tiny (a BiT ResNetV2 of similar size), in
process, with `train.train_and_evaluate`:
  1. pretrain from scratch on the 7 non-footwear Fashion-MNIST classes with
     configs/pretrain_fmnist.py's recipe, but at 24 px (for BiT without the representation layer,
     which a ResNet does not have);
  2. fine-tune that checkpoint on the 3 footwear classes at 32 px with configs/shoes.py:demo's
     recipe;
  3. few-shot linear evaluation (`vit_jax.fewshot`) on the footwear classes of the pretrained
     checkpoint's features and of a random initialisation of the same model.
Then, measured afresh on every run: parameters at 3 classes, FLOPs per image of the forward pass
at 32 px (XLA's cost analysis of the jitted forward, a multiply-add counted as 2), and training
images/s of the real fine-tuning step (`benchmarks.harness.jitted_step`: forward, backward, AdamW
update, batch 128 at 32 px on synthetic data already on the devices), both models' steps timed in
alternating rounds so that other load on the machine hits both alike. The fine-tuning run's own
images/s (the median progress row after the first, input pipeline included) is reported beside.

Prints a markdown table (with --json: one JSON line on stdout, the table inside it) and, for a
full run, appends the JSON line to benchmarks/results/vit_vs_cnn.jsonl. A finished stage in the
workdir (its stage.json) is reused, so a rerun only re-measures the speed. Without XLA_FLAGS, JAX
gets one CPU device per core (a power of two, at most 8), as scripts/demo.sh sets it.
--quick: a few steps per stage on tests/data/fashion_mnist_slice.npz (a smoke test).
"""

import argparse
import json
import logging as std_logging
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from benchmarks import harness
from configs import pretrain_fmnist, shoes
from vit_jax import models, sharding

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("R+ViT-tiny_8", "BiT-tiny")
SHOTS = (1, 5, 10, 25)
RESULTS = REPO / "benchmarks" / "results" / "vit_vs_cnn.jsonl"
QUICK_SLICE = REPO / "tests" / "data" / "fashion_mnist_slice.npz"
# Divisible by 1, 2, 4 and 8 devices (the configs' 500 is not by 8): only the eval batching.
BATCH_EVAL = 512
# The quick mode's schedule, as scripts/demo.sh's DEMO_QUICK=1.
QUICK_TRAIN = dict(
  total_steps=8,
  warmup_steps=2,
  eval_every=8,
  checkpoint_every=8,
  progress_every=4,
  batch=32,
  batch_eval=256,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks vit_vs_cnn", description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="stages go to WORKDIR/MODEL/{pretrain,finetune,fewshot_*.json} (default "
    "workdirs/vit_vs_cnn, with --quick workdirs/vit_vs_cnn_quick)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="a few steps per stage on the test slice; no results line"
  )
  parser.add_argument(
    "--fashion_mnist_dir",
    default=None,
    help="Fashion-MNIST folder or .npz slice (default: Debian's location; --quick: the test slice)",
  )
  parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
  parser.add_argument(
    "--rounds", type=int, default=None, help="alternating timing rounds (default 5, --quick 1)"
  )
  parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5)")
  args = parser.parse_args(argv)
  if args.rounds is not None and args.rounds < 1 or args.steps is not None and args.steps < 1:
    parser.error("--rounds and --steps must be positive")
  if args.fashion_mnist_dir is not None and not os.path.exists(args.fashion_mnist_dir):
    parser.error(f"--fashion_mnist_dir {args.fashion_mnist_dir}: no such file or folder")
  if args.fashion_mnist_dir is None and args.quick:
    args.fashion_mnist_dir = str(QUICK_SLICE)
  if args.workdir is None:
    args.workdir = "workdirs/vit_vs_cnn_quick" if args.quick else "workdirs/vit_vs_cnn"
  args.rounds = args.rounds or (1 if args.quick else 5)
  args.steps = args.steps or (2 if args.quick else 5)
  return args


def set_cpu_devices() -> None:
  """One JAX CPU device per core, unless XLA_FLAGS says otherwise: before jax starts a backend."""
  if os.environ.get("XLA_FLAGS"):
    return
  cores, devices = os.cpu_count() or 1, 1
  while devices * 2 <= min(cores, 8):
    devices *= 2
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"


# ---------------------------------------------------------------------------------------------
# The configs: the demo's recipes, one model or the other.


def pretrain_config(model_name: str, args: argparse.Namespace) -> Any:
  """configs/pretrain_fmnist.py for `model_name` (24 px, 7 non-footwear classes, AdamW)."""
  config = pretrain_fmnist.get_config()
  config.unlock()
  config.model_name = model_name
  config.pp.crop = 24  # the resolution of the recorded comparison (docs/vit_vs_cnn.md)
  if model_name in models.BIT_CONFIGS:
    config.model.representation_size = None  # a ResNet has no representation layer
  return _common(config, args)


def finetune_config(model_name: str, pretrained: str, args: argparse.Namespace) -> Any:
  """configs/shoes.py:demo for `model_name`, from `pretrained` (32 px, 3 footwear classes)."""
  config = shoes.get_config("demo")
  config.unlock()
  config.model_name = model_name
  config.pretrained_path = pretrained
  # The comparison reports each model's final parameters on test; nothing is selected, so the
  # whole train split trains, as in the recorded table.
  config.val_fraction, config.best_metric = 0.0, ""
  return _common(config, args)


def _common(config: Any, args: argparse.Namespace) -> Any:
  config.batch_eval = BATCH_EVAL
  if args.fashion_mnist_dir:
    config.fashion_mnist_dir = args.fashion_mnist_dir
  if args.quick:
    config.update(QUICK_TRAIN)
  config.lock()
  return config


# ---------------------------------------------------------------------------------------------
# Stages: run once, recorded in WORKDIR/MODEL/STAGE/stage.json.


def train_stage(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) unless stage.json says it finished with this schedule; its record."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top  (TensorFlow)

  marker = workdir / "stage.json"
  if marker.exists():
    record = json.loads(marker.read_text())
    if record["total_steps"] != config.total_steps:
      raise SystemExit(
        f"error: {workdir} finished {record['total_steps']} steps, this run wants "
        f"{config.total_steps}: give another --workdir"
      )
    logging.info("%s: finished before (%s), reused", workdir, marker)
    return record
  logging.info("%s: training %s for %d steps", workdir, config.model_name, config.total_steps)
  summary = train.train_and_evaluate(config, str(workdir))
  if summary["step"] != config.total_steps:
    raise SystemExit(f"error: {workdir} stopped at step {summary['step']} (pre-empted?): rerun")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [r["img_sec_device"] for r in rows if "img_sec_device" in r][1:]
  record = dict(
    model_name=config.model_name,
    total_steps=config.total_steps,
    test_accuracy=summary["test_accuracy"],
    test_count=summary["test_count"],
    seconds=round(summary["seconds"], 1),
    num_devices=jax.device_count(),
    # The run's own rate (input pipeline included); the progress rows after the first.
    run_images_per_sec=(round(statistics.median(rates) * jax.device_count(), 1) if rates else None),
  )
  marker.write_text(json.dumps(record, indent=2) + "\n")
  return record


def fewshot_stage(
  checkpoint: pathlib.Path, out: pathlib.Path, args: argparse.Namespace, from_scratch: bool
) -> dict[str, Any]:
  """`vit_jax.fewshot.run` on the footwear classes, or its saved result."""
  from vit_jax import fewshot  # pylint: disable=g-import-not-at-top  (TensorFlow)

  if out.exists():
    return json.loads(out.read_text())
  argv = [f"--config.batch_eval={QUICK_TRAIN['batch_eval'] if args.quick else BATCH_EVAL}"]
  if args.fashion_mnist_dir:
    argv.append(f"--config.fashion_mnist_dir={args.fashion_mnist_dir}")
  result = fewshot.run(
    str(checkpoint),
    argv,
    dataset="fashion_mnist_shoes",
    shots=SHOTS,
    seeds=2 if args.quick else 5,
    from_scratch=from_scratch,
  )
  out.write_text(json.dumps(result, indent=2) + "\n")
  return result


# ---------------------------------------------------------------------------------------------
# Measured on every run: size, FLOPs, training speed.


def size_and_flops(model_name: str, config: Any, num_classes: int) -> dict[str, Any]:
  """Parameters at `num_classes` and XLA's FLOPs of one image's forward pass at config.pp.crop."""
  model = models.get_model(model_name, num_classes, **config.model)
  size = config.pp.crop
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  flops = harness.xla_flops(forward.lower(params, image).compile())
  return dict(
    num_params=int(sum(x.size for x in jax.tree.leaves(params))),
    flops_per_image_xla=flops,
    flops_image_size=size,
  )


def train_stepper(config: Any, num_classes: int) -> Callable[[], Any]:
  """The fine-tuning step of `config`, compiled as training jits it, on a synthetic batch that
  is already on the devices: each call is one donated update."""
  model = harness.get_model(config, num_classes)
  mesh = sharding.make_mesh()
  step, _, init, shardings = harness.jitted_step(
    config, model, mesh, mode="train", num_classes=num_classes
  )
  rng = np.random.default_rng(0)
  size = config.pp.crop
  batch = jax.device_put(
    dict(
      image=rng.uniform(-1, 1, (config.batch, size, size, 3)).astype(np.float32),
      label=rng.integers(0, num_classes, config.batch).astype(np.int32),
    ),
    sharding.batch_sharding(mesh),
  )
  carry = {"state": jax.jit(init, out_shardings=shardings)()}
  compiled = step.lower(carry["state"], batch).compile()

  def call() -> Any:
    carry["state"], metrics = compiled(carry["state"], batch)
    return metrics

  jax.block_until_ready(call())  # the first call allocates: never timed
  return call


def time_training(
  configs: dict[str, Any], num_classes: int, rounds: int, steps: int
) -> dict[str, dict[str, Any]]:
  """images/s of each config's training step, timed in alternating rounds of `steps` steps."""
  calls = {name: train_stepper(config, num_classes) for name, config in configs.items()}
  times: dict[str, list[float]] = {name: [] for name in configs}
  for _ in range(rounds):
    for name, call in calls.items():
      times[name] += harness.time_calls(call, warmup=1, steps=steps)
  return {
    name: dict(
      train_images_per_sec=round(configs[name].batch / statistics.median(t), 1),
      # Other processes only slow steps down: the fastest is the least disturbed.
      train_images_per_sec_best=round(configs[name].batch / min(t), 1),
      step_times_s=[round(s, 4) for s in t],
    )
    for name, t in times.items()
  }


# ---------------------------------------------------------------------------------------------
# The comparison and its table.


def compare(args: argparse.Namespace) -> dict[str, Any]:
  t0 = time.time()
  root = pathlib.Path(args.workdir)
  load_start = harness.load_average()
  rows: dict[str, dict[str, Any]] = {}
  finetune_configs = {}
  for name in MODELS:
    base = root / name
    pretrain = train_stage(pretrain_config(name, args), base / "pretrain")
    checkpoint = base / "pretrain" / "params.npz"
    finetune_configs[name] = finetune_config(name, str(checkpoint), args)
    finetune = train_stage(finetune_configs[name], base / "finetune")
    fewshot = {
      start: fewshot_stage(checkpoint, base / f"fewshot_{start}.json", args, start == "random")
      for start in ("pretrained", "random")
    }
    rows[name] = dict(
      family="bit" if name in models.BIT_CONFIGS else "vit",
      pretrain_test_accuracy=pretrain["test_accuracy"],
      pretrain_test_count=pretrain["test_count"],
      pretrain_seconds=pretrain["seconds"],
      finetune_test_accuracy=finetune["test_accuracy"],
      finetune_test_count=finetune["test_count"],
      finetune_seconds=finetune["seconds"],
      run_images_per_sec=finetune["run_images_per_sec"],
      run_num_devices=finetune["num_devices"],
      fewshot={
        start: {k: dict(mean=v["mean"], std=v["std"]) for k, v in r["shots"].items()}
        for start, r in fewshot.items()
      },
      fewshot_seeds=fewshot["pretrained"]["seeds"],
      fewshot_image_size=fewshot["pretrained"]["image_size"],
      fewshot_feature_dim=fewshot["pretrained"]["feature_dim"],
    )
    rows[name].update(size_and_flops(name, finetune_configs[name], num_classes=3))
  load_timing = harness.load_average()
  speed = time_training(finetune_configs, 3, args.rounds, args.steps)
  for name in MODELS:
    rows[name].update(speed[name])
  config = finetune_configs[MODELS[0]]
  result = dict(
    benchmark="vit_vs_cnn",
    quick=args.quick,
    models=rows,
    train_batch=config.batch,
    train_image_size=config.pp.crop,
    pretrain_steps=pretrain_config(MODELS[0], args).total_steps,
    finetune_steps=config.total_steps,
    timing_rounds=args.rounds,
    timing_steps=args.steps,
    platform=jax.devices()[0].platform,
    num_devices=jax.device_count(),
    host_cpu=harness.host_cpu(),
    cpu_count=os.cpu_count(),
    jax_version=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    load_average_start=load_start,
    load_average_timing=load_timing,
    load_average_end=harness.load_average(),
    wall_s=round(time.time() - t0, 1),
    time=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  result["table"] = format_table(result)
  return result


def format_table(r: dict[str, Any]) -> str:
  pct = lambda x: f"{100 * x:.1f} %"
  shot = lambda row, k: f"{pct(row[str(k)]['mean'])} ± {100 * row[str(k)]['std']:.1f}"
  head = (
    f"{r['host_cpu']}, {r['cpu_count']} cores, {r['num_devices']} JAX {r['platform']} "
    f"device(s); load average {r['load_average_start']} at the start, "
    f"{r['load_average_timing']} when timing{' (QUICK: not a result)' if r['quick'] else ''}"
  )
  lines = [
    head,
    "",
    "| model | parameters | forward MFLOPs/image at 32 px (XLA) | train img/s (step) "
    "| img/s in the fine-tuning run | pretrain acc. (7 classes) | fine-tuned acc. (3 classes) "
    "| 10-shot pretrained | 10-shot random init |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for name, m in r["models"].items():
    run_rate = f"{m['run_images_per_sec']:,.0f}" if m["run_images_per_sec"] else "–"
    lines.append(
      f"| {name} | {m['num_params']:,} | {m['flops_per_image_xla'] / 1e6:.1f} "
      f"| {m['train_images_per_sec']:,.0f} | {run_rate} | {pct(m['pretrain_test_accuracy'])} "
      f"| {pct(m['finetune_test_accuracy'])} | {shot(m['fewshot']['pretrained'], 10)} "
      f"| {shot(m['fewshot']['random'], 10)} |"
    )
  lines += [
    "",
    f"Few-shot linear evaluation on the footwear classes (mean ± std over "
    f"{next(iter(r['models'].values()))['fewshot_seeds']} seeds):",
    "",
    "| model | features | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |",
    "|---|---|" + "--:|" * len(SHOTS),
  ]
  for name, m in r["models"].items():
    for start, label in (("pretrained", "pretrained"), ("random", "random init")):
      cells = " | ".join(shot(m["fewshot"][start], k) for k in SHOTS)
      lines.append(f"| {name} | {label} | {cells} |")
  return "\n".join(lines)


class _OwnLines(std_logging.Filter):
  """Keeps the log lines of vit_jax and the benchmarks (progress, accuracy), and warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= std_logging.WARNING or "/vit_jax/" in path or "/benchmarks/" in path


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  set_cpu_devices()  # before jax starts its backends (at their first use)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # As scripts/demo.sh: JAX's persistent compilation cache. Within one run the random-init
  # few-shot features reuse the pretrained ones' program; a rerun compiles (almost) nothing.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnLines())
  stdout = harness.reserve_stdout()
  result = compare(args)
  if not args.quick:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
      f.write(json.dumps(harness.json_safe(result)) + "\n")
    logging.info("appended to %s", RESULTS)
  if args.json:
    harness.write_json(stdout, result)
  else:
    stdout.write(result["table"] + "\n")
    stdout.flush()


if __name__ == "__main__":
  main()
