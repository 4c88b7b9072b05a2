#!/usr/bin/env bash
# Cloud TPU VM recipes: create a TPU VM or pod slice, install vit_jax on every worker, train on
# all workers at once, copy the workdir to and from a bucket, delete. Run it on your own machine
# from the repository root, with gcloud logged in:
#
#   export TPU_NAME=vit-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 TPU_VERSION=tpu-ubuntu2204-base
#   export BUCKET=gs://my-bucket/vit_jax            # for mount / push / pull
#   bash scripts/tpu_vm.sh preflight --config=configs/shoes.py   # here: fits $ACCELERATOR_TYPE?
#   bash scripts/tpu_vm.sh create                   # the VM (v4-8: 1 host) or pod slice (v4-16: 2)
#   bash scripts/tpu_vm.sh install                  # this checkout + Python 3.11 venv, all workers
#   bash scripts/tpu_vm.sh check                    # every worker sees every chip
#
# One host: workdir and data on the VM's disk (relative paths are under ~/vit_jax there):
#   bash scripts/tpu_vm.sh copy data/shoes vit_jax/data/     # to every worker (scp --recurse)
#   bash scripts/tpu_vm.sh train --config=configs/shoes.py --workdir=workdirs/shoes \
#       --config.dataset=data/shoes
#   bash scripts/tpu_vm.sh push workdirs/shoes      # worker 0: workdir -> $BUCKET/shoes
#   bash scripts/tpu_vm.sh pull workdirs/shoes      # worker 0: $BUCKET/shoes -> workdir (resume)
# Pod slice (several hosts): workdir and data in one directory every worker sees:
#   bash scripts/tpu_vm.sh mount                    # $BUCKET at $SHARED (/mnt/vit_jax), all workers
#   bash scripts/tpu_vm.sh train --config=configs/shoes.py --workdir=/mnt/vit_jax/workdirs/shoes \
#       --config.dataset=/mnt/vit_jax/data/shoes
#
#   bash scripts/tpu_vm.sh delete
#
# `train` runs `python -m vit_jax.main ARGS` on every worker (--worker=all); vit_jax.main calls
# jax.distributed.initialize(), which finds the other workers itself on a Cloud TPU VM. On a pod
# slice the workdir must be one directory that every worker sees (the `mount` of a bucket, or a
# Filestore NFS share): all workers write one orbax checkpoint, process 0 the metrics and export.
# Every worker reads its own slice of the data, so the dataset must be readable on every worker
# too (the same mount, or a tfds dataset with --config.tfds_data_dir=gs://...).
# Spot / pre-emptible slices: SPOT=1 at `create`; a pre-empted run resumes from its latest
# checkpoint when `train` is run again with the same workdir.
set -euo pipefail

TPU_NAME=${TPU_NAME:-vit-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}        # v4-8, v4-16, v5litepod-8, v5litepod-16, v6e-8...
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}    # v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e
PROJECT=${PROJECT:-}                               # empty: gcloud's default project
SPOT=${SPOT:-}                                     # 1: a Spot slice (cheaper, pre-emptible)
BUCKET=${BUCKET:-}                                 # gs://bucket[/path]
REMOTE_DIR=${REMOTE_DIR:-vit_jax}                  # the checkout on each worker, under $HOME
SHARED=${SHARED:-/mnt/vit_jax}                     # where `mount` puts $BUCKET on each worker
JAX_VERSION=0.10.2                                 # as requirements.txt

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with this VM's zone and project
  local sub=$1
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND (a string) over ssh, WORKER = all or 0
  tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

need_bucket() {
  [[ $BUCKET == gs://* ]] || { echo "set BUCKET=gs://bucket[/path]" >&2; exit 2; }
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
}

cmd=${1:-}
[[ -n $cmd ]] || usage
shift

case $cmd in
  preflight)  # on this machine, no TPU: compiles the run for $ACCELERATOR_TYPE, says if it fits
    [[ $# -gt 0 ]] || { echo "usage: $0 preflight --config=... [--config.x=...]" >&2; exit 2; }
    "${PYTHON:-.venv/bin/python}" -m vit_jax.preflight --topology="$ACCELERATOR_TYPE" "$@"
    ;;

  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION" \
      ${SPOT:+--spot}
    tpu describe "$TPU_NAME" --format='value(state,acceleratorType,networkEndpoints[].ipAddress)'
    ;;

  install)
    # Tracked and new (not ignored) files of this checkout: the code you are looking at.
    tarball=$(mktemp --suffix=.tgz)
    trap 'rm -f "$tarball"' EXIT
    git ls-files -z --cached --others --exclude-standard | tar --null -czf "$tarball" -T -
    tpu scp "$tarball" "$TPU_NAME":vit_jax.tgz --worker=all
    # The TPU images are Ubuntu 22.04 (Python 3.10); jax 0.10 needs 3.11: uv brings its own.
    on_workers all "set -e
      mkdir -p ~/$REMOTE_DIR && tar -xzf ~/vit_jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
      command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
      UV=\$(command -v uv || echo ~/.local/bin/uv)
      [ -x .venv/bin/python ] || \$UV venv --python 3.11 .venv
      \$UV pip install --python .venv/bin/python -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'
      \$UV pip install --python .venv/bin/python -q --no-deps -e .
      echo \"\$(hostname): \$(.venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)')\""
    ;;

  mount)
    # Cloud Storage FUSE: no metadata cache, so every worker sees the others' files at once;
    # --rename-dir-limit lets orbax rename its temporary checkpoint folders.
    need_bucket
    bucket_name=${BUCKET#gs://}
    only_dir=${bucket_name#*/}
    bucket_name=${bucket_name%%/*}
    [[ $only_dir == "$bucket_name" ]] && only_dir=""
    on_workers all "set -e
      if ! command -v gcsfuse >/dev/null; then
        echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
      fi
      sudo mkdir -p $SHARED && sudo chown \$(id -u):\$(id -g) $SHARED
      mountpoint -q $SHARED || gcsfuse --implicit-dirs --rename-dir-limit=1000000 \
        --metadata-cache-ttl-secs=0 ${only_dir:+--only-dir=$only_dir} $bucket_name $SHARED
      echo \"\$(hostname): $BUCKET at $SHARED\""
    ;;

  check)
    # All workers at once (they wait for each other in jax.distributed.initialize).
    on_workers all "cd ~/$REMOTE_DIR && .venv/bin/python -c 'import jax
jax.distributed.initialize()
print(f\"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} global devices\")'"
    ;;

  train)
    [[ $# -gt 0 ]] || { echo "usage: $0 train --config=... --workdir=... [--config.x=...]" >&2; exit 2; }
    args=$(printf '%q ' "$@")  # quoted once more for the remote shell
    if [[ -n ${DETACH:-} ]]; then  # survives a closed laptop; `logs` follows worker 0
      on_workers all "cd ~/$REMOTE_DIR && nohup .venv/bin/python -m vit_jax.main $args > ~/vit_jax_train.log 2>&1 < /dev/null &"
    else
      on_workers all "cd ~/$REMOTE_DIR && .venv/bin/python -m vit_jax.main $args"
    fi
    ;;

  logs)
    on_workers 0 "tail -n 50 -f ~/vit_jax_train.log"
    ;;

  stop)  # SIGTERM, as a pre-emption: every worker saves a checkpoint at the same step and exits
    on_workers all "pkill -TERM -f '[-]m vit_jax[.]main' || true"
    ;;

  push|pull)  # gcloud on the VM uses its service account: it needs write access to $BUCKET
    [[ $# -eq 1 ]] || { echo "usage: $0 $cmd WORKDIR (a path on the workers)" >&2; exit 2; }
    need_bucket
    remote="$BUCKET/$(basename "$1")"
    if [[ $cmd == push ]]; then src=$1 dst=$remote; else src=$remote dst=$1; fi
    on_workers 0 "cd ~/$REMOTE_DIR && mkdir -p $(printf '%q' "$1") &&
      gcloud storage rsync --recursive $(printf '%q %q' "$src" "$dst")"
    ;;

  copy)  # copy LOCAL_PATH REMOTE_PATH: to every worker (remote paths relative to $HOME)
    [[ $# -eq 2 ]] || { echo "usage: $0 copy LOCAL_PATH REMOTE_PATH" >&2; exit 2; }
    on_workers all "mkdir -p $(printf '%q' "$2")"
    tpu scp --recurse "$1" "$TPU_NAME:$2" --worker=all
    ;;

  ssh)
    tpu ssh "$TPU_NAME" --worker="${1:-0}"
    ;;

  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;

  *)
    usage
    ;;
esac
