"""A/B of `models_vit.cotangent_boundary` on our real training step, interleaved in one process.

  .venv/bin/python scripts/benchmark_boundaries.py --model_name ViT-Ti_16 --batch 8 --rounds 4 \
      --steps 4 >> docs/benchmarks/cpu-cotangent-boundaries.jsonl

Each round measures the step without and with the boundaries (`vit_jax.benchmark.benchmark_ours`:
compiled, donated, 1 warm-up call, then `--steps` timed calls), alternating which goes first, so
that other load on a shared machine hits both alike; prints one JSON line with the medians over
all timed steps and the median compile times.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmark as benchmark_script  # pylint: disable=wrong-import-position  (scripts/benchmark.py)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_name", default="ViT-Ti_16")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()
  if min(args.batch, args.image_size, args.rounds, args.steps) < 1:
    parser.error("--batch, --image_size, --rounds and --steps must be positive")
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import benchmark, train  # pylint: disable=g-import-not-at-top
  bench_args = benchmark_script.parse_args(
      ["--model_name", args.model_name, "--batch", str(args.batch), "--image_size",
       str(args.image_size), "--mode", "train"])
  config = benchmark_script.make_config(bench_args)
  model = train.create_model(config, bench_args.num_classes)
  times, compiles = {False: [], True: []}, {False: [], True: []}
  for r in range(args.rounds):
    for on in ((False, True) if r % 2 == 0 else (True, False)):
      out = benchmark.benchmark_ours(config, model.clone(cotangent_boundaries=on), mode="train",
                                     num_classes=bench_args.num_classes, warmup=1,
                                     steps=args.steps)
      times[on] += out["step_times_s"]
      compiles[on].append(out["compile_s"])
      print(f"round {r} boundaries {'on ' if on else 'off'}: steps "
            f"{[round(t, 3) for t in out['step_times_s']]} s, compile {out['compile_s']:.1f} s",
            file=sys.stderr)
  off, on = statistics.median(times[False]), statistics.median(times[True])
  print(json.dumps(dict(
      model_name=args.model_name, batch=args.batch, image_size=args.image_size, rounds=args.rounds, steps=args.steps,
      step_s_off=off, step_s_on=on, speedup=off / on,
      images_per_sec_off=args.batch / off, images_per_sec_on=args.batch / on,
      compile_s_off=statistics.median(compiles[False]),
      compile_s_on=statistics.median(compiles[True]),
      host_cpu=benchmark.host_cpu(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__)))


if __name__ == "__main__":
  main()
