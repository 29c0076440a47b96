#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra arguments go to pytest.
# Exits non-zero on any failure, and also when no test ran (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# why: the suite runs tiny models, often two processes at once on 2 cores; passive waiting measured
# 0.92x the default step on the demo's test_vit (docs/results/speed.md). Training itself
# leaves the policy unset: PASSIVE slowed ViT-Ti/ViT-S steps 1.09-1.12x.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ $# -gt 0 ] || set -- tests   # default: the whole suite; otherwise the files/flags given
start=$(date +%s)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
echo "test.sh: pytest exit code $rc after $(( $(date +%s) - start )) s"
exit $rc
