r"""Training / inference images/s, compile time, memory and MFU of a model preset; timm beside it.

  python -m benchmarks speed --model_name ViT-B_16 --batch 32 --mode train \
      [--image_size 224] [--dtype bfloat16] [--compare timm] [--json]

Times our real jitted, donated training step (`steps.make_train_step` with the default optimizer:
SGD momentum 0.9, clipping 1.0, bf16 momentum) over all devices, or the inference forward pass, on
a synthetic batch resident on the devices: warm-up, then the median of --steps timed steps. MFU is
FLOPs/image x images/s / the FLOP/s of a large matmul timed on the same devices in the same run.
--compare timm runs the same architecture with the same weights in timm, in a child process just
before ours (torch.compile when it works and is faster, channels-last, bf16 autocast for --dtype
bfloat16), and reports ours/timm. Method: `benchmarks.harness`.

With --json, stdout is one JSON object and everything else goes to stderr.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional

from absl import logging

from benchmarks import harness

_REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks speed", description=__doc__.splitlines()[0]
  )
  harness.add_model_flags(parser)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  parser.add_argument("--compare", choices=("timm",), default=None)
  parser.add_argument(
    "--timm_compile",
    choices=("auto", "on", "off"),
    default="auto",
    help="auto: time torch.compile and eager, report the faster",
  )
  parser.add_argument(
    "--peak_size",
    type=int,
    default=None,
    help="matmul side for the peak (default 2048 on CPU, 8192 on GPU/TPU)",
  )
  parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
  args = parser.parse_args(argv)
  harness.check_model_args(parser, args)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be positive, --warmup >= 0")
  return args


def print_summary(r: dict[str, Any]) -> None:
  """A few human-readable lines of the result (the JSON has everything)."""
  g = lambda x: f"{x / 1e9:.4g}" if x else "-"
  print(
    f"{r['model_name']} {r['mode']}, batch {r['batch']} at {r['image_size']} px, {r['dtype']},"
    f" {r['num_devices']} x {r['device_kind']} ({r['platform']}), attention {r['attention']}"
    f"{', remat ' + r['remat_policy'] if r['remat'] else ''}"
    f"{', cotangent boundaries' if r['cotangent_boundaries'] else ''}"
  )
  print(
    f"  ours: {r['images_per_sec']:.2f} images/s (step {r['step_time_s']:.4f} s, median of "
    f"{r['steps']}), compile {r['compile_s']:.1f} s"
  )
  print(
    f"  FLOPs/image: {g(r['flops_per_image'])} G ({r['flops_source']}; XLA "
    f"{g(r['flops_per_image_xla'])} G, analytic {g(r['flops_per_image_analytic'])} G)"
  )
  print(
    f"  peak: {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_matmul_dtype']} matmul "
    f"{r['peak_matmul_size']}^2); achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s; "
    f"MFU {100 * r['mfu']:.1f} %"
  )
  mib = lambda b: "not reported" if b is None else f"{b / 2**20:,.1f} MiB"
  print(
    f"  memory: device peak {mib(r['peak_memory_bytes'])}, XLA plan per device "
    f"{mib((r.get('compiled_memory') or {}).get('total'))}"
  )
  if r.get("attention_error"):
    print(f"  cuDNN attention failed, XLA's used: {r['attention_error']}")
  if "timm_error" in r:
    print(f"  timm: failed ({r['timm_error']})")
  if "timm_images_per_sec" in r:
    by = ", ".join(f"{k} {v:.2f}" for k, v in r["timm_images_per_sec_by_execution"].items())
    where = r["timm_device"] + (f", {r['timm_threads']} threads" if r["timm_threads"] else "")
    print(
      f"  timm: {r['timm_images_per_sec']:.2f} images/s ({r['timm_execution']}; {by}; "
      f"{where}), MFU {100 * r['timm_mfu']:.1f} %"
    )
    print(f"  ours / timm: {r['ratio_vs_timm']:.2f}")


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
  """Our measurement; with --attention auto, a cuDNN attention failure falls back to XLA's."""
  config = harness.make_config(args)

  def measure() -> dict[str, Any]:
    return harness.measure_ours(
      config,
      harness.get_model(config, args.num_classes),
      mode=args.mode,
      num_classes=args.num_classes,
      warmup=args.warmup,
      steps=args.steps,
      peak_size=args.peak_size,
    )

  if config.model.attention_impl != "cudnn" or args.attention == "cudnn":
    return measure()
  try:
    return measure()
  except Exception as e:  # pylint: disable=broad-except
    # auto picked cuDNN attention; shapes or versions it does not support fall back to XLA's.
    logging.warning("cuDNN attention failed (%s): measuring with XLA attention", e)
    config.model.attention_impl = ""
    return dict(measure(), attention_error=f"{type(e).__name__}: {e}"[:500])


def run_timm_child(argv: list[str]) -> dict[str, Any]:
  """Runs `benchmarks.timm_twin` in a child process (JAX on the CPU there); returns its JSON.

  A failure (e.g. timm running out of accelerator memory at a batch that fits ours) is recorded
  as `timm_error` rather than lost with our numbers.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child's JAX only initialises the weights
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.timm_twin", *argv],
    stdout=subprocess.PIPE,
    env=env,
    cwd=_REPO,
    check=False,
  )
  if proc.returncode != 0:
    return {"timm_error": f"timm child exited with {proc.returncode} (its stderr is above)"}
  return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  stdout = harness.reserve_stdout() if args.json else None
  logging.set_verbosity(logging.INFO)
  # timm first, before this process initialises an accelerator (JAX preallocates its memory).
  timm_result = run_timm_child(argv) if args.compare == "timm" else None
  result = run_ours(args)
  if timm_result is not None:
    result = harness.add_timm(result, timm_result)
  if stdout is not None:
    harness.write_json(stdout, result)
  else:
    print_summary(result)
