#!/usr/bin/env bash
# The test suite: 8 fake CPU devices, tiny models. Usage: bash scripts/test.sh [pytest args]
# On a fresh machine it first runs scripts/setup.sh (creates .venv with everything pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" TF_CPP_MIN_LOG_LEVEL=2
# One persistent compilation cache for the session: both workers and every process a test starts
# (the CLI, the demo, the server) reuse what another already compiled. Removed at the end.
cache="$(mktemp -d "${TMPDIR:-/tmp}/vit_jax_test_jax_cache.XXXXXX")"
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache}"
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests "$@"
