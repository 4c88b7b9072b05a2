"""What XLA compiles our training step into: kernels, memory traffic, memory plan; H100 or here.

  .venv/bin/python scripts/benchmark_hlo.py --target h100 --model_name ViT-B_16 --batch 256 \
      --dtype bfloat16 [--attention cudnn] [--json] [--top 20] [--hlo_out step.hlo]

It compiles (does not run) the step that `scripts/benchmark.py` times, with the same model flags
(everything but --target, --top, --hlo_out and --json goes to that script's parser), and reports
`vit_jax.hlo_traffic`: the kernels, the bytes each reads and writes, grouped by kind (cuBLAS
matmuls, cuDNN attention, fusions) and by JAX op, and XLA's memory plan.

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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmark as benchmark_script  # pylint: disable=wrong-import-position  (scripts/benchmark.py)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
  parser.add_argument("--target", choices=("local", "h100"), default="h100")
  parser.add_argument("--top", type=int, default=20, help="rows of the per-op table")
  parser.add_argument("--hlo_out", default=None, help="write the optimised HLO text here")
  parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
  parser.add_argument("-h", "--help", action="store_true")
  args, rest = parser.parse_known_args(argv)
  if args.help:
    parser.print_help()
    print("\nModel flags (scripts/benchmark.py):")
    benchmark_script.parse_args(["--help"])
  if "--mode" not in rest:
    rest += ["--mode", "train"]
  return args, benchmark_script.parse_args(rest)


def main(argv: list[str] | None = None) -> None:
  args, bench = parse_args(sys.argv[1:] if argv is None else list(argv))
  from vit_jax import hlo_traffic  # pylint: disable=g-import-not-at-top
  if args.target == "h100":  # before jax starts its backends
    os.environ.update(hlo_traffic.DEVICELESS_ENV)
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS", ""), hlo_traffic.DEVICELESS_XLA_FLAGS]))
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import benchmark, models_vit, sharding, train  # pylint: disable=g-import-not-at-top
  if args.target == "h100":
    try:
      mesh = hlo_traffic.deviceless_gpu_mesh(sharding.DATA)
    except RuntimeError as e:  # no CUDA plugin: one line that says what to install
      sys.exit(f"error: {e}")
    bandwidth = hlo_traffic.H100_MEMORY_BANDWIDTH
  else:
    mesh, bandwidth = sharding.make_mesh(), None
  platform = mesh.devices.flat[0].platform  # the compile target's, not jax's default backend
  attention = benchmark.resolve_attention(bench.attention, bench.dtype, platform)
  config = benchmark_script.make_config(bench)
  config.model.attention_impl = attention or ""
  model = train.create_model(config, bench.num_classes)
  model = model.clone(cotangent_boundaries=models_vit.cotangent_boundaries_enabled(
      benchmark_script.cotangent_boundaries(bench), platform))
  step, abstract_args, _, _ = benchmark.jitted_step(config, model, mesh, mode=bench.mode,
                                                    num_classes=bench.num_classes)
  start = time.perf_counter()
  compiled = step.lower(*abstract_args).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  if args.hlo_out:
    pathlib.Path(args.hlo_out).write_text(hlo)
  result = dict(
      target=args.target, device_kind=mesh.devices.flat[0].device_kind,
      num_devices=mesh.size, model_name=bench.model_name, mode=bench.mode, batch=bench.batch,
      image_size=bench.image_size, dtype=bench.dtype, attention=attention or "xla",
      cotangent_boundaries=model.cotangent_boundaries,
      remat=bench.remat, recompute_gelu=bench.recompute_gelu, compile_s=compile_s,
      compiled_memory=benchmark.compiled_memory(compiled), jax_version=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      **hlo_traffic.summarize(hlo_traffic.kernel_traffic(hlo), bandwidth=bandwidth, top=args.top))
  if args.json:
    print(json.dumps(result))
    return
  gb = lambda b: f"{b / 1e9:,.2f} GB"
  print(f"{bench.model_name} {bench.mode}, batch {bench.batch} at {bench.image_size} px, "
        f"{bench.dtype}, attention {result['attention']}, on {result['num_devices']} x "
        f"{result['device_kind']} ({args.target}); compiled in {compile_s:.1f} s")
  at = lambda b: (f" = {1e3 * b / bandwidth:.1f} ms at {bandwidth / 1e12:.2f} TB/s"
                  if bandwidth else "")
  print(f"  {result['kernels']} kernels, {gb(result['traffic_bytes'])} read + written"
        f"{at(result['traffic_bytes'])}; matmuls {gb(result['matmul_bytes'])}, attention "
        f"{gb(result['attention_bytes'])}, the rest {gb(result['other_bytes'])}"
        f"{at(result['other_bytes'])}")
  mem = result["compiled_memory"] or {}
  if mem:
    print(f"  XLA memory plan per device: {gb(mem['total'])} (temporaries {gb(mem['temp'])})")
  print("  by kind:")
  for kind, v in list(result["by_kind"].items())[:12]:
    print(f"    {kind:<48} {v['count']:6d} kernels {gb(v['bytes']):>12}")
  print("  the rest by JAX op (every block summed into encoderblock_N):")
  for op, b in result["top_other_ops"]:
    print(f"    {gb(b):>10}  {op}")


if __name__ == "__main__":
  main()
