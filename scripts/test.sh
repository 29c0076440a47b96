#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra arguments go to pytest.
# Exits non-zero on any failure, and also when no test ran (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
rc=$?
set -e
echo "test.sh: pytest exit code $rc after $(( $(date +%s) - start )) s"
exit $rc
