r"""A/B of the cotangent boundaries on our real training step, interleaved in one process.

  python -m benchmarks ab --model_name ViT-Ti_16 --batch 8 --rounds 4 --steps 4 \
      >> benchmarks/results/ab-cpu.jsonl

Each round measures the step without and with `config.model.cotangent_boundaries`
(`harness.time_step`: compiled, donated, 1 warm-up call, then `--steps` timed calls), alternating
which goes first, so that other load on the machine hits both alike; prints one JSON line with the
medians over all timed steps and the median compile times. The model flags are those of
`python -m benchmarks speed` (but the boundaries and the mode, which the A/B sets).
"""

import argparse
import os
import statistics
import sys
from typing import Optional

import jax

from benchmarks import harness


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks ab", description=__doc__.splitlines()[0]
  )
  harness.add_model_flags(parser, skip=("mode", "cotangent_boundaries"))
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per round and variant")
  parser.set_defaults(model_name="ViT-Ti_16", batch=8, mode="train", cotangent_boundaries="auto")
  args = parser.parse_args(argv)
  harness.check_model_args(parser, args)
  if min(args.rounds, args.steps) < 1:
    parser.error("--rounds and --steps must be positive")
  return args


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  config = harness.make_config(args)
  times, compiles = {False: [], True: []}, {False: [], True: []}
  for r in range(args.rounds):
    for on in (False, True) if r % 2 == 0 else (True, False):
      config.model.cotangent_boundaries = on
      out = harness.time_step(
        config,
        harness.get_model(config, args.num_classes),
        mode="train",
        num_classes=args.num_classes,
        warmup=1,
        steps=args.steps,
      )
      times[on] += out["step_times_s"]
      compiles[on].append(out["compile_s"])
      print(
        f"round {r} boundaries {'on ' if on else 'off'}: steps "
        f"{[round(t, 3) for t in out['step_times_s']]} s, compile {out['compile_s']:.1f} s",
        file=sys.stderr,
      )
  off, on = statistics.median(times[False]), statistics.median(times[True])
  harness.write_json(
    sys.stdout,
    dict(
      model_name=args.model_name,
      batch=args.batch,
      image_size=args.image_size,
      dtype=args.dtype,
      rounds=args.rounds,
      steps=args.steps,
      step_s_off=off,
      step_s_on=on,
      speedup=off / on,
      images_per_sec_off=args.batch / off,
      images_per_sec_on=args.batch / on,
      compile_s_off=statistics.median(compiles[False]),
      compile_s_on=statistics.median(compiles[True]),
      platform=jax.devices()[0].platform,
      num_devices=jax.device_count(),
      host_cpu=harness.host_cpu(),
      cpu_count=os.cpu_count(),
      jax_version=jax.__version__,
    ),
  )
