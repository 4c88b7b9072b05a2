#!/usr/bin/env bash
# The benchmark tables of docs/BENCHMARKS.md: runs scripts/benchmark.py (ours and timm in one run
# each), writes JSON lines under docs/benchmarks/ and regenerates the table in docs/BENCHMARKS.md.
#
#   bash scripts/benchmark_all.sh cpu   # ViT-Ti/16 and ViT-B/16, batch 8 and 32, 224 px, fp32,
#                                       # train and inference: docs/benchmarks/cpu-MODEL.jsonl
#                                       # (30-40 min on 2 quiet cores, ViT-B/16 most of it)
#   bash scripts/benchmark_all.sh gpu   # ViT-B/16 bf16 training, batch 64, 128, ... until it no
#                                       # longer fits, then inference at the largest batch:
#                                       # docs/benchmarks/gpu.jsonl
#
# Environment: MODELS="ViT-B_16" runs (and replaces the file of) only those models of the cpu
# suite; TIMM_COMPILE=on times timm with torch.compile only (default auto: torch.compile and eager
# are both timed and the faster is reported). Run it on a quiet machine: other processes on the
# same cores make both frameworks 1.5-5x slower, and not equally (docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE="${1:-cpu}"
PY=.venv/bin/python
mkdir -p docs/benchmarks

bench() {  # bench FILE ARGS...: appends one JSON line to FILE; returns the script's exit status
  local file=$1
  shift
  echo "== $(date +%T) scripts/benchmark.py $*" >&2
  "$PY" scripts/benchmark.py --json --compare timm --timm_compile "${TIMM_COMPILE:-auto}" "$@" >> "$file"
}

case "$SUITE" in
  cpu)
    for model in ${MODELS:-ViT-Ti_16 ViT-B_16}; do
      # A ViT-B/16 step takes seconds (inference, batch 8) to about a minute (training, batch 32)
      # on 2 cores: 1 warm-up and 3 timed steps (4 calls per framework and execution mode).
      if [ "$model" = ViT-B_16 ]; then steps=(--steps 3 --warmup 1); else steps=(--steps 10 --warmup 2); fi
      part="docs/benchmarks/cpu-$model.jsonl.partial"
      : > "$part"
      for batch in 8 32; do
        for mode in train inference; do
          bench "$part" --model_name "$model" --batch "$batch" --mode "$mode" "${steps[@]}"
        done
      done
      mv "$part" "docs/benchmarks/cpu-$model.jsonl"
    done
    files=(docs/benchmarks/cpu-*.jsonl)
    ;;
  gpu)
    part=docs/benchmarks/gpu.jsonl.partial
    : > "$part"
    largest=""
    for batch in 64 128 256 512 1024 2048; do
      if bench "$part" --model_name ViT-B_16 --batch "$batch" --mode train --dtype bfloat16 --steps 10 --warmup 3; then
        largest=$batch
      else
        echo "batch $batch does not fit (or failed): the sweep stops" >&2
        break
      fi
    done
    [ -n "$largest" ] || { echo "no batch ran" >&2; exit 1; }
    bench "$part" --model_name ViT-B_16 --batch "$largest" --mode inference --dtype bfloat16 --steps 10 --warmup 3
    mv "$part" docs/benchmarks/gpu.jsonl
    files=(docs/benchmarks/gpu.jsonl)
    ;;
  *)
    echo "usage: $0 [cpu|gpu]" >&2
    exit 2
    ;;
esac

"$PY" scripts/benchmark_table.py "${files[@]}" --update docs/BENCHMARKS.md --section "$SUITE"
