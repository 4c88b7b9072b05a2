r"""The measured tables of docs/benchmarks.md: JSON lines under benchmarks/results/, then the table.

  python -m benchmarks all cpu   # ViT-Ti/16 and ViT-B/16, batch 8 and 32, 224 px, fp32, train and
                                 # inference: benchmarks/results/cpu-MODEL.jsonl (30-40 min on 2
                                 # quiet cores, ViT-B/16 most of it)
  python -m benchmarks all gpu   # ViT-B/16 bf16 training, batch 64, 128, ... until it no longer
                                 # fits, then inference at the largest: benchmarks/results/gpu.jsonl

Each row is one `python -m benchmarks speed --json --compare timm` process (ours and timm).
--models ViT-B_16 runs (and replaces the file of) only those models of the cpu suite;
--timm_compile on times timm with torch.compile only (auto: torch.compile and eager are both
timed, the faster reported). Run it on a quiet machine: other processes on the same cores make
both frameworks 1.5-5x slower, and not equally.
"""

import argparse
import datetime
import os
import pathlib
import subprocess
import sys
from typing import Optional

from benchmarks import table

_REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = _REPO / "benchmarks" / "results"
DOC = _REPO / "docs" / "benchmarks.md"
GPU_BATCHES = (64, 128, 256, 512, 1024, 2048)


def bench(file: pathlib.Path, timm_compile: str, *args: str) -> bool:
  """Appends one JSON line of `benchmarks speed` to `file`; whether the run succeeded."""
  command = [
    sys.executable,
    "-m",
    "benchmarks",
    "speed",
    "--json",
    "--compare",
    "timm",
    "--timm_compile",
    timm_compile,
    *args,
  ]
  print(f"== {datetime.datetime.now():%H:%M:%S} {' '.join(command[1:])}", file=sys.stderr)
  with open(file, "a") as out:
    return subprocess.run(command, stdout=out, cwd=_REPO, check=False).returncode == 0


def run_cpu(models: list[str], timm_compile: str) -> list[pathlib.Path]:
  for model in models:
    # A ViT-B/16 step takes seconds (inference, batch 8) to about a minute (training, batch 32)
    # on 2 cores: 1 warm-up and 3 timed steps.
    steps = (
      ["--steps", "3", "--warmup", "1"]
      if model == "ViT-B_16"
      else ["--steps", "10", "--warmup", "2"]
    )
    part = RESULTS / f"cpu-{model}.jsonl.partial"
    part.write_text("")
    for batch in (8, 32):
      for mode in ("train", "inference"):
        if not bench(
          part, timm_compile, "--model_name", model, "--batch", str(batch), "--mode", mode, *steps
        ):
          sys.exit(f"{model} batch {batch} {mode} failed; the partial results are in {part}")
    os.replace(part, RESULTS / f"cpu-{model}.jsonl")
  return sorted(RESULTS.glob("cpu-*.jsonl"))


def run_gpu(timm_compile: str) -> list[pathlib.Path]:
  part = RESULTS / "gpu.jsonl.partial"
  part.write_text("")
  steps = ["--dtype", "bfloat16", "--steps", "10", "--warmup", "3"]
  largest = None
  for batch in GPU_BATCHES:
    if not bench(
      part,
      timm_compile,
      "--model_name",
      "ViT-B_16",
      "--batch",
      str(batch),
      "--mode",
      "train",
      *steps,
    ):
      print(f"batch {batch} does not fit (or failed): the sweep stops", file=sys.stderr)
      break
    largest = batch
  if largest is None:
    sys.exit("no batch ran")
  bench(
    part,
    timm_compile,
    "--model_name",
    "ViT-B_16",
    "--batch",
    str(largest),
    "--mode",
    "inference",
    *steps,
  )
  os.replace(part, RESULTS / "gpu.jsonl")
  return [RESULTS / "gpu.jsonl"]


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks all", description=__doc__.splitlines()[0]
  )
  parser.add_argument("suite", choices=("cpu", "gpu"), nargs="?", default="cpu")
  parser.add_argument(
    "--models", nargs="+", default=["ViT-Ti_16", "ViT-B_16"], help="the cpu suite's models"
  )
  parser.add_argument("--timm_compile", choices=("auto", "on", "off"), default="auto")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  RESULTS.mkdir(parents=True, exist_ok=True)
  if args.suite == "cpu":
    files = run_cpu(args.models, args.timm_compile)
  else:
    files = run_gpu(args.timm_compile)
  table.main([*map(str, files), "--update", str(DOC), "--section", args.suite])
