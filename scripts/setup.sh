#!/usr/bin/env bash
# Creates .venv with vit_jax and everything the tests and the demo need (idempotent).
# Also installs Debian's Fashion-MNIST (the demo's real data) when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# torch first, from its pinned file: timm would otherwise pull another build (a second torch
# build that does not import together with TensorFlow).
.venv/bin/pip install -q -r requirements-torch.txt
.venv/bin/pip install -q -r requirements.txt -r requirements-test.txt
.venv/bin/pip install -q --no-deps -e .
# libtpu, for `python -m vit_jax.preflight` (compiles for TPU slices on this machine): into a
# folder of its own, not site-packages, so that no other command probes for a TPU at start-up.
if [ ! -f .venv/libtpu/libtpu/libtpu.so ]; then
  .venv/bin/pip install -q --no-deps --target .venv/libtpu -r requirements-tpu.txt
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist) \
    >/dev/null 2>&1 || echo "note: could not install dataset-fashion-mnist (the demo needs it)"
fi
# Debian's headless Chromium and its driver: tests/test_evaluate.py opens report.html in them.
if [ ! -x /usr/bin/chromedriver ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) \
    >/dev/null 2>&1 || echo "note: could not install chromium (the report's browser test skips)"
fi
echo "setup done: $(.venv/bin/python -c 'import jax, flax, torch, timm; print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "timm", timm.__version__)')"
