#!/usr/bin/env bash
# The test suite: 8 fake CPU devices, tiny models. Usage: bash scripts/test.sh [pytest args]
# On a fresh machine it first runs scripts/setup.sh (creates .venv with everything pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests "$@"
