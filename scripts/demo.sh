#!/usr/bin/env bash
# The offline demo, from a fresh checkout: bash scripts/demo.sh [WORKDIR]   (default workdirs/demo)
#
# Real data, no download: Fashion-MNIST from Debian's dataset-fashion-mnist. The story of the
# ViT paper in miniature, on 2 CPU cores in under 15 minutes:
#   1. pretrain  a small ViT from scratch on the 7 non-footwear classes (configs/pretrain_fmnist.py),
#                exported in the ImageNet-21k .npz layout (pre_logits included) to checkpoints/;
#   2. finetune  it on the 3 footwear classes (configs/shoes.py:demo): the same load_pretrained
#                path as ViT-B_16.npz (pre_logits dropped, head reset);
#   3. scratch   the same fine-tuning from random weights, same budget (--config.from_scratch=True);
#      fewshot   linear few-shot evaluation (python -m vit_jax.fewshot) on the footwear classes of
#                the frozen pretrained features and of a random initialisation of the same model;
#   4. predict   on 6 held-out test images written as PNG files (python -m vit_jax.predict);
#   5. convert   the fine-tuned model to timm (PyTorch; scripts/convert_to_pytorch.py). The demo's
#                model has a ResNet stem, which Hugging Face transformers 5 cannot hold.
# Writes WORKDIR/summary.json. Restartable: a finished stage is skipped, an interrupted training
# resumes from its last checkpoint in WORKDIR.
#
# Environment (for tests and experiments):
#   DEMO_QUICK=1           a few training steps per stage (a smoke test of the whole story)
#   DEMO_FMNIST_DIR=PATH   Fashion-MNIST folder or .npz slice (default: Debian's, then .cache/)
#   DEMO_PRETRAINED=PATH   where the pretrained .npz is copied (default
#                          checkpoints/R+ViT-tiny_8-fmnist.npz; with DEMO_QUICK, inside WORKDIR)
#   DEMO_SKIP_SETUP=1      never run scripts/setup.sh
#   PYTHON=PATH            the interpreter to run everything with (then setup.sh never runs);
#                          default .venv/bin/python, made by scripts/setup.sh when it is missing
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-workdirs/demo}"
QUICK="${DEMO_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  PRETRAINED="${DEMO_PRETRAINED:-$WORKDIR/checkpoints/R+ViT-tiny_8-fmnist.npz}"
else
  PRETRAINED="${DEMO_PRETRAINED:-checkpoints/R+ViT-tiny_8-fmnist.npz}"
fi
PY="${PYTHON:-.venv/bin/python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# One JAX CPU device per core (a power of two, at most 8, so that the batches divide): data
# parallel over the cores trains this small model ~1.5x faster than one device with XLA's
# intra-op threads (measured on 2 cores). Ignored where JAX has a GPU or TPU.
if [ -z "${XLA_FLAGS:-}" ]; then
  CORES=$(nproc 2>/dev/null || echo 1) DEVICES=1
  while [ $((DEVICES * 2)) -le "$CORES" ] && [ "$DEVICES" -lt 8 ]; do DEVICES=$((DEVICES * 2)); done
  export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
fi
# JAX's persistent compilation cache: the scratch run reuses the fine-tuning's compiled step, and
# a rerun compiles nothing.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"
T0=$(date +%s.%N)

# --- 0. Environment and data -----------------------------------------------------------------------
if [ -z "${PYTHON:-}" ] && [ "${DEMO_SKIP_SETUP:-0}" != 1 ] && ! { [ -x "$PY" ] &&
    "$PY" -c "import vit_jax, jax, flax, optax, orbax.checkpoint, tensorflow, torch, transformers" \
      2>/dev/null; }; then
  echo "== setup: bash scripts/setup.sh"
  bash scripts/setup.sh
fi
FMNIST_ARGS=()
if [ -n "${DEMO_FMNIST_DIR:-}" ]; then
  FMNIST_ARGS=("--config.fashion_mnist_dir=$DEMO_FMNIST_DIR")
elif [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] &&
     [ ! -f .cache/fashion-mnist/train-images-idx3-ubyte.gz ] &&
     [ ! -f .cache/fmnist/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  # Not root (setup.sh installs it as root): unpack the Debian package into .cache/ instead.
  echo "== data: apt-get download dataset-fashion-mnist, unpacked to .cache/fmnist"
  if ! (mkdir -p .cache && cd .cache && apt-get download dataset-fashion-mnist >/dev/null &&
        dpkg-deb -x dataset-fashion-mnist_*.deb fmnist); then
    echo "error: Fashion-MNIST not found. Install it: sudo apt-get install dataset-fashion-mnist" \
         "(Debian/Ubuntu), or set DEMO_FMNIST_DIR to a folder with its 4 IDX .gz files" >&2
    exit 2
  fi
fi
QUICK_ARGS=() QUICK_FEWSHOT=()
if [ "$QUICK" = 1 ]; then
  QUICK_ARGS=(--config.total_steps=8 --config.warmup_steps=2 --config.eval_every=8
              --config.checkpoint_every=8 --config.progress_every=4 --config.batch=32
              --config.batch_eval=256)
  QUICK_FEWSHOT=(--seeds 2 --config.batch_eval=256)
fi
mkdir -p "$WORKDIR"

# stage NAME FUNCTION: runs FUNCTION unless WORKDIR/NAME/stage.json says that it finished; records
# there its wall-clock seconds, its commands and (a training stage) its test accuracy, read once at
# the end, and the step and split that chose its best checkpoint.
stage() {
  local name=$1 marker="$WORKDIR/$1/stage.json" t0
  if [ -f "$marker" ]; then
    echo "== $name: finished before ($marker), skipped"
    return
  fi
  echo "== $name"
  mkdir -p "$WORKDIR/$name"
  STAGE=$name CMDS="$WORKDIR/$name/commands.txt"
  : > "$CMDS"
  t0=$(date +%s.%N)
  "$2"
  "$PY" scripts/demo_tools.py stage "$WORKDIR/$name" "$t0"
}

# run COMMAND...: shows and records COMMAND, then runs it. Its whole stderr goes to
# WORKDIR/STAGE/log.txt; the console keeps vit_jax's own log lines (progress, accuracy,
# load_pretrained) and drops the info lines of the libraries (orbax, XLA).
run() {
  echo "\$ $*" >&2  # stderr: a command's stdout may be redirected to a file
  echo "$*" >> "$CMDS"
  local log="$WORKDIR/$STAGE/log.txt" rc=0
  "$@" 2> >(tee -a "$log" | awk '
      /^[IW][0-9][0-9][0-9][0-9] [0-9:.]+ +[0-9]+ [^ ]+[.](py|cc):[0-9]+[]]/ {
        if ($4 !~ /^(train|metrics|main|input_pipeline|convert)[.]py:/ &&
            $0 !~ /load_pretrained: /) next }
      /^WARNING: All log messages before absl::InitializeLog/ { next }
      { print; fflush() }' >&2) || rc=$?
  if [ "$rc" != 0 ]; then
    echo "error: stage $STAGE failed (exit $rc); its full log: $log" >&2
    exit "$rc"
  fi
}

# --- 1. Pretrain on the 7 non-footwear classes, export in the in21k layout ---------------------------
pretrain() {
  run "$PY" -m vit_jax.main --config=configs/pretrain_fmnist.py --workdir="$WORKDIR/pretrain" \
      ${FMNIST_ARGS[@]+"${FMNIST_ARGS[@]}"} ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"}
}
stage pretrain pretrain
mkdir -p "$(dirname "$PRETRAINED")"
cp "$WORKDIR/pretrain/params.npz" "$PRETRAINED"
cp "$WORKDIR/pretrain/params.json" "${PRETRAINED%.npz}.json"
echo "== pretrained checkpoint: $PRETRAINED"

# --- 2. Fine-tune on the 3 footwear classes; 3. the same from random weights -----------------------
finetune() {
  run "$PY" -m vit_jax.main --config=configs/shoes.py:demo --workdir="$WORKDIR/finetune" \
      --config.pretrained_path="$PRETRAINED" --config.report=True \
      ${FMNIST_ARGS[@]+"${FMNIST_ARGS[@]}"} ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"}
  echo "== evaluation report: $WORKDIR/finetune/report/report.html"
}
scratch() {
  run "$PY" -m vit_jax.main --config=configs/shoes.py:demo --workdir="$WORKDIR/scratch" \
      --config.from_scratch=True \
      ${FMNIST_ARGS[@]+"${FMNIST_ARGS[@]}"} ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"}
}
fewshot() {
  local start flag
  for start in pretrained random; do
    flag=$([ "$start" = random ] && echo --from_scratch || true)
    run "$PY" -m vit_jax.fewshot --checkpoint "$PRETRAINED" --dataset fashion_mnist_shoes $flag \
        --json ${FMNIST_ARGS[@]+"${FMNIST_ARGS[@]}"} ${QUICK_FEWSHOT[@]+"${QUICK_FEWSHOT[@]}"} \
        > "$WORKDIR/fewshot/$start.json"
  done
  "$PY" scripts/demo_tools.py fewshot "$WORKDIR/fewshot" | tee "$WORKDIR/fewshot/table.txt"
}
stage finetune finetune
stage scratch scratch
stage fewshot fewshot

# --- 4. Predict on held-out test images, written as PNG files ---------------------------------------
predict() {
  run "$PY" scripts/demo_tools.py samples "$WORKDIR/samples" ${DEMO_FMNIST_DIR:+"$DEMO_FMNIST_DIR"}
  run "$PY" -m vit_jax.predict --checkpoint "$WORKDIR/finetune/best_params.npz" \
      --json "$WORKDIR/samples" \
      > "$WORKDIR/predict/predictions.json"
  "$PY" scripts/demo_tools.py show "$WORKDIR/predict/predictions.json" |
      tee "$WORKDIR/predict/predictions.txt"
}
stage predict predict

# --- 5. Convert to PyTorch (timm) ------------------------------------------------------------------
convert() {
  run "$PY" scripts/convert_to_pytorch.py --checkpoint "$WORKDIR/finetune/best_params.npz" \
      --format timm --output "$WORKDIR/convert/timm"
}
stage convert convert

# --- Summary ---------------------------------------------------------------------------------------
"$PY" scripts/demo_tools.py summary "$WORKDIR" "$PRETRAINED" "$T0" "$QUICK"
echo "== try it: $PY -m vit_jax.serve --checkpoint $WORKDIR/finetune/best_params.npz --examples $WORKDIR/samples   (then open http://127.0.0.1:8000/)"
