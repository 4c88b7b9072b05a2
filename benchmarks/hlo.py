r"""What XLA compiles our training step into: kernels, memory traffic, memory plan; H100 or here.

  python -m benchmarks hlo --target h100 --model_name ViT-B_16 --batch 256 --dtype bfloat16 \
      [--attention cudnn] [--json] [--top 20] [--hlo_out step.hlo]

It compiles (does not run) the step that `python -m benchmarks speed` times, with the same model
flags, and reports `benchmarks.hlo_traffic`: the kernels, the bytes each reads and writes,
grouped by kind (cuBLAS matmuls, cuDNN attention, fusions) and by JAX op, and XLA's memory plan.

--target h100 compiles for an H100 80GB HBM3 that is not here (deviceless ahead-of-time
compilation through jax's CUDA plugin: `pip install 'jax-cuda13-plugin[with-cuda]==0.10.2'
'jax-cuda13-pjrt==0.10.2'`; no GPU or driver needed), with Triton GEMMs and autotuning off (they
need a device), so matmuls are cuBLAS calls; the fusion of everything else is XLA:GPU's own.
--target local compiles for this machine's devices.
"""

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax

from benchmarks import harness, hlo_traffic
from vit_jax import sharding


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks hlo", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--target", choices=("local", "h100"), default="h100")
  parser.add_argument("--top", type=int, default=20, help="rows of the per-op table")
  parser.add_argument("--hlo_out", default=None, help="write the optimised HLO text here")
  parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
  harness.add_model_flags(parser)
  args = parser.parse_args(argv)
  harness.check_model_args(parser, args)
  return args


def print_summary(r: dict[str, Any]) -> None:
  gb = lambda b: f"{b / 1e9:,.2f} GB"
  bandwidth = r.get("bandwidth_bytes_per_s")
  at = lambda b: (
    f" = {1e3 * b / bandwidth:.1f} ms at {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
  )
  print(
    f"{r['model_name']} {r['mode']}, batch {r['batch']} at {r['image_size']} px, "
    f"{r['dtype']}, attention {r['attention']}, on {r['num_devices']} x "
    f"{r['device_kind']} ({r['target']}); compiled in {r['compile_s']:.1f} s"
  )
  print(
    f"  {r['kernels']} kernels, {gb(r['traffic_bytes'])} read + written"
    f"{at(r['traffic_bytes'])}; matmuls {gb(r['matmul_bytes'])}, attention "
    f"{gb(r['attention_bytes'])}, the rest {gb(r['other_bytes'])}{at(r['other_bytes'])}"
  )
  mem = r["compiled_memory"] or {}
  if mem:
    print(f"  XLA memory plan per device: {gb(mem['total'])} (temporaries {gb(mem['temp'])})")
  print("  by kind:")
  for kind, v in list(r["by_kind"].items())[:12]:
    print(f"    {kind:<48} {v['count']:6d} kernels {gb(v['bytes']):>12}")
  print("  the rest by JAX op (every block summed into encoderblock_N):")
  for op, b in r["top_other_ops"]:
    print(f"    {gb(b):>10}  {op}")


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  if args.target == "h100":  # before jax starts its backends (at their first use, below)
    os.environ.update(hlo_traffic.DEVICELESS_ENV)
    os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS", ""), hlo_traffic.DEVICELESS_XLA_FLAGS])
    )
  if args.target == "h100":
    try:
      mesh = hlo_traffic.deviceless_gpu_mesh(sharding.DATA)
    except RuntimeError as e:  # no CUDA plugin: one line that says what to install
      sys.exit(f"error: {e}")
    bandwidth = hlo_traffic.H100_MEMORY_BANDWIDTH
  else:
    mesh, bandwidth = sharding.make_mesh(), None
  # The compile target's platform, not jax's default backend, decides the 'auto' flags.
  config = harness.make_config(args, platform=mesh.devices.flat[0].platform)
  model = harness.get_model(config, args.num_classes)
  step, abstract_args, _, _ = harness.jitted_step(
    config, model, mesh, mode=args.mode, num_classes=args.num_classes
  )
  start = time.perf_counter()
  compiled = step.lower(*abstract_args).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  if args.hlo_out:
    pathlib.Path(args.hlo_out).write_text(hlo)
  result = dict(
    target=args.target,
    device_kind=mesh.devices.flat[0].device_kind,
    num_devices=mesh.size,
    model_name=args.model_name,
    mode=args.mode,
    batch=args.batch,
    image_size=args.image_size,
    dtype=args.dtype,
    attention=model.attention_impl or "xla",
    cotangent_boundaries=bool(model.cotangent_boundaries),
    remat=args.remat,
    recompute_gelu=args.recompute_gelu,
    compile_s=compile_s,
    compiled_memory=harness.compiled_memory(compiled),
    jax_version=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    **hlo_traffic.summarize(hlo_traffic.kernel_traffic(hlo), bandwidth=bandwidth, top=args.top),
  )
  if args.json:
    print(json.dumps(result))
  else:
    print_summary(result)
