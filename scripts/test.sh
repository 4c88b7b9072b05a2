#!/usr/bin/env bash
# The test suite: 8 fake CPU devices, tiny models. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" TF_CPP_MIN_LOG_LEVEL=2
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
