r"""Training / inference images/s, compile time, memory and MFU of a model preset; timm beside it.

  .venv/bin/python scripts/benchmark.py --model_name ViT-B_16 --batch 32 --mode train \
      [--image_size 224] [--dtype bfloat16] [--compare timm] [--json]

Times our real jitted, donated training step (vit_jax.train.make_train_step with the default
optimizer: SGD momentum 0.9, clipping 1.0, bf16 momentum) over all devices, or the inference
forward pass, on a synthetic batch resident on the devices: warm-up, then the median of --steps
timed steps. MFU is FLOPs/image x images/s / the FLOP/s of a large matmul timed on the same devices
in the same run. --compare timm runs the same architecture with the same weights in timm in the
same run, in a child process just before ours (torch.compile when it works and is faster,
channels-last, bf16 autocast for --dtype bfloat16), and reports ours/timm. Details:
vit_jax/benchmark.py, docs/BENCHMARKS.md.

With --json, stdout is one JSON object and everything else goes to stderr.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed

from absl import logging  # pylint: disable=wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_name", default="ViT-B_16", help="a vit_jax.models preset")
  parser.add_argument("--batch", type=int, default=32, help="global batch over all devices")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--mode", choices=("train", "inference"), default="train")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (parameters stay float32)")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
  parser.add_argument("--remat", action="store_true", help="rematerialise each encoder block")
  parser.add_argument("--remat_policy", default=None,
                      help="with --remat: nothing_saveable (default), "
                           "dots_with_no_batch_dims_saveable, dots_saveable, everything_saveable")
  parser.add_argument("--recompute_gelu", action="store_true",
                      help="keep only GELU's input for the backward pass "
                           "(config.model.recompute_gelu)")
  parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                      help="auto: cuDNN fused attention on NVIDIA GPUs with bfloat16, else XLA")
  parser.add_argument("--cotangent_boundaries", choices=("auto", "on", "off"), default="auto",
                      help="models_vit.cotangent_boundary before each block (auto: on for CPU)")
  parser.add_argument("--fsdp", action="store_true", help="shard params and optimizer state")
  parser.add_argument("--compare", choices=("timm",), default=None)
  parser.add_argument("--timm_compile", choices=("auto", "on", "off"), default="auto",
                      help="auto: time torch.compile and eager, report the faster")
  parser.add_argument("--peak_size", type=int, default=None,
                      help="matmul side for the peak (default 2048 on CPU, 8192 on GPU/TPU)")
  parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
  parser.add_argument("--timm_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.remat_policy and not args.remat:
    parser.error("--remat_policy needs --remat")
  if min(args.steps, args.batch, args.image_size) < 1 or args.warmup < 0:
    parser.error("--steps, --batch and --image_size must be positive, --warmup >= 0")
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if models.MODEL_CONFIGS.get(args.model_name, {}).get("resnet") is not None:
    parser.error(f"--model_name {args.model_name}: a ResNet+ViT hybrid; the analytic FLOP count "
                 "(for the MFU) and the timm twin cover plain ViTs only")
  return args


def make_config(args: argparse.Namespace):
  """The default training config (configs/common.py) with the benchmark's model and shapes."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config.model_name = args.model_name
  config.batch = args.batch
  config.pp.crop = args.image_size
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.recompute_gelu = args.recompute_gelu
  if args.remat_policy:
    config.model.remat_policy = args.remat_policy
  config.optimizer = args.optimizer
  config.fsdp = args.fsdp
  config.from_scratch = True
  config.lock()
  return config


def cotangent_boundaries(args: argparse.Namespace) -> Optional[bool]:
  """--cotangent_boundaries as the model field: None (auto: the platform decides), True, False."""
  return None if args.cotangent_boundaries == "auto" else args.cotangent_boundaries == "on"


def print_summary(r: dict[str, Any]) -> None:
  """A few human-readable lines of the result (the JSON has everything)."""
  g = lambda x: f"{x / 1e9:.4g}" if x else "-"
  print(f"{r['model_name']} {r['mode']}, batch {r['batch']} at {r['image_size']} px, {r['dtype']},"
        f" {r['num_devices']} x {r['device_kind']} ({r['platform']}), attention {r['attention']}"
        f"{', remat ' + r['remat_policy'] if r['remat'] else ''}"
        f"{', cotangent boundaries' if r['cotangent_boundaries'] else ''}")
  print(f"  ours: {r['images_per_sec']:.2f} images/s (step {r['step_time_s']:.4f} s, median of "
        f"{r['steps']}), compile {r['compile_s']:.1f} s")
  print(f"  FLOPs/image: {g(r['flops_per_image'])} G ({r['flops_source']}; XLA "
        f"{g(r['flops_per_image_xla'])} G, analytic {g(r['flops_per_image_analytic'])} G)")
  print(f"  peak: {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_matmul_dtype']} matmul "
        f"{r['peak_matmul_size']}^2); achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s; "
        f"MFU {100 * r['mfu']:.1f} %")
  mib = lambda b: "not reported" if b is None else f"{b / 2 ** 20:,.1f} MiB"
  print(f"  memory: device peak {mib(r['peak_memory_bytes'])}, XLA plan per device "
        f"{mib((r.get('compiled_memory') or {}).get('total'))}")
  if r.get("attention_error"):
    print(f"  cuDNN attention failed, XLA's used: {r['attention_error']}")
  if "timm_error" in r:
    print(f"  timm: failed ({r['timm_error']})")
  if "timm_images_per_sec" in r:
    by = ", ".join(f"{k} {v:.2f}" for k, v in r["timm_images_per_sec_by_execution"].items())
    where = r["timm_device"] + (f", {r['timm_threads']} threads" if r["timm_threads"] else "")
    print(f"  timm: {r['timm_images_per_sec']:.2f} images/s ({r['timm_execution']}; {by}; "
          f"{where}), MFU {100 * r['timm_mfu']:.1f} %")
    print(f"  ours / timm: {r['ratio_vs_timm']:.2f}")


def _clean(value: Any) -> Any:
  """JSON-safe: non-finite floats become null (json.dumps would write NaN)."""
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
  """Our measurement; with --attention auto, a cuDNN attention failure falls back to XLA's."""
  from vit_jax import benchmark, train  # pylint: disable=g-import-not-at-top
  config = make_config(args)
  attention = benchmark.resolve_attention(args.attention, args.dtype)

  def measure(attention_impl):
    config.model.attention_impl = attention_impl or ""
    model = train.create_model(config, args.num_classes).clone(
        cotangent_boundaries=cotangent_boundaries(args))
    return benchmark.run_ours(config, model, mode=args.mode, num_classes=args.num_classes,
                              warmup=args.warmup, steps=args.steps, peak_size=args.peak_size)

  if attention != "cudnn" or args.attention == "cudnn":
    return measure(attention)
  try:
    return measure(attention)
  except Exception as e:  # pylint: disable=broad-except
    # auto picked cuDNN attention; shapes or versions it does not support fall back to XLA's.
    logging.warning("cuDNN attention failed (%s): measuring with XLA attention", e)
    return dict(measure(None), attention_error=f"{type(e).__name__}: {e}"[:500])


def run_timm_child(argv: list[str]) -> dict[str, Any]:
  """Runs the timm half in a child process (JAX on the CPU there) and returns its JSON.

  A failure (e.g. timm running out of accelerator memory at a batch that fits ours) is recorded
  as `timm_error` rather than lost with our numbers.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child's JAX only initialises the weights
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--timm_child"],
                        stdout=subprocess.PIPE, env=env, check=False)
  if proc.returncode != 0:
    return {"timm_error": f"timm child exited with {proc.returncode} (its stderr is above)"}
  return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def timm_child(args: argparse.Namespace) -> dict[str, Any]:
  # torch and timm before anything imports TensorFlow: TF then triton segfaults
  # (environment.md §4).
  import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from vit_jax import benchmark, train  # pylint: disable=g-import-not-at-top
  config = make_config(args)
  model = train.create_model(config, args.num_classes)
  return benchmark.benchmark_timm(
      model, benchmark.initial_params(config, model), config, mode=args.mode, dtype=args.dtype,
      num_classes=args.num_classes, warmup=args.warmup, steps=args.steps,
      compile_mode=args.timm_compile)


def main(argv: Optional[list[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  stdout = None
  if args.json or args.timm_child:
    # Keep stdout for the JSON alone: libraries print to fd 1 from C++ too.
    sys.stdout.flush()
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
  logging.set_verbosity(logging.INFO)
  if args.timm_child:
    result = timm_child(args)
  else:
    # timm first, before this process initialises an accelerator (JAX preallocates its memory).
    timm_result = run_timm_child(argv) if args.compare == "timm" else None
    result = run_ours(args)
    if timm_result is not None:
      from vit_jax import benchmark  # pylint: disable=g-import-not-at-top
      result = benchmark.add_timm(result, timm_result)
  if stdout is not None:
    stdout.write(json.dumps(_clean(result)) + "\n")
    stdout.flush()
  else:
    print_summary(result)


if __name__ == "__main__":
  main()
