"""`python -m benchmarks SUBCOMMAND [FLAGS]`, from the repository root; `SUBCOMMAND --help` lists
each one's flags. Method, results and the commands behind them: docs/benchmarks.md."""

import importlib
import sys
from typing import Optional

# subcommand -> (module of this package, what it does). Modules are imported on use: `table`
# needs no jax, and `hlo` sets XLA's environment before jax starts its backends.
SUBCOMMANDS = {
  "speed": ("speed", "training/inference images/s and MFU of our real step; timm beside it"),
  "ab": ("ab", "interleaved A/B of the cotangent boundaries on the training step"),
  "hlo": (
    "hlo",
    "compile the training step (for an absent H100, or here): kernels, bytes, memory plan",
  ),
  "tpu": ("tpu", "TPU slice sizing (docs/tpu.md): the preflight over models and slices"),
  "input": ("input", "input-pipeline throughput (JPEG folder or Fashion-MNIST)"),
  "evaluate": ("evaluate", "evaluation throughput of vit_jax.evaluation.predict_split"),
  "serve": ("serve", "latency and throughput of the recognizer server (vit_jax.serve)"),
  "vit_vs_cnn": (
    "vit_vs_cnn",
    "R+ViT-tiny_8 against BiT-tiny on Fashion-MNIST: accuracy, few-shot, size, FLOPs, speed",
  ),
  "table": ("table", "markdown table from the JSON lines of `speed --json`"),
  "all": (
    "suite",
    "the cpu or gpu suite: benchmarks/results/*.jsonl and the tables of docs/benchmarks.md",
  ),
}


def usage() -> str:
  lines = [
    "usage: python -m benchmarks SUBCOMMAND [FLAGS]   (SUBCOMMAND --help for its flags)",
    "",
    "subcommands:",
  ]
  lines += [f"  {name:<8} {what}" for name, (_, what) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in ("-h", "--help"):
    print(usage())
    return
  if not argv:
    sys.exit(usage())
  if argv[0] not in SUBCOMMANDS:
    sys.exit(f"{usage()}\n\nerror: unknown subcommand {argv[0]!r}")
  module = importlib.import_module(f"benchmarks.{SUBCOMMANDS[argv[0]][0]}")
  module.main(argv[1:])


if __name__ == "__main__":
  main()
