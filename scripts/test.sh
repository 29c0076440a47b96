#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra arguments go to pytest.
#   scripts/test.sh                        the whole suite (tests/), slowest tests listed at the end
#   scripts/test.sh --quick                the inner loop: all but tests/e2e/ (the real-process
#                                          tests) and tests marked slow
#   scripts/test.sh [--quick] tests/test_recipe.py -k lr ...   those paths / pytest options only
# Exits non-zero on any failure, and also when no test ran (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# why: the suite runs tiny models, often two processes at once on 2 cores; passive waiting measured
# 0.92x the default step on the demo's test_vit (docs/results/speed.md). Training itself
# leaves the policy unset: PASSIVE slowed ViT-Ti/ViT-S steps 1.09-1.12x.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
quick=()
args=()
for a in "$@"; do
    if [ "$a" = "--quick" ]; then
        quick=(-m "not e2e and not slow")  # e2e: everything under tests/e2e/ (tests/conftest.py)
    else
        args+=("$a")
    fi
done
[ ${#args[@]} -gt 0 ] || args=(tests)   # default: the whole suite; otherwise the files/flags given
# pytest-xdist workers, one per core (at most 6; TEST_WORKERS=N to choose, 0: one process). A
# module's tests stay on one worker (--dist loadscope), so its module fixtures (built .beton files,
# trained runs) are made once; the modules go out in the order tests/conftest.py gives (the long,
# process-starting ones first), not xdist's default (most tests first), which left the longest
# modules for last. The suite is then CPU-bound: on 2 cores (2026-12-03) 331 s with 2 workers,
# 346 s with 3 (a third worker's imports and collection cost ~45 CPU-s).
cores=$(nproc)
workers=${TEST_WORKERS:-$(( cores < 6 ? cores : 6 ))}
xdist=()
[ "$workers" = 0 ] || xdist=(-n "$workers" --dist loadscope --no-loadscope-reorder)
start=$(date +%s)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 ${xdist[@]+"${xdist[@]}"} \
    ${quick[@]+"${quick[@]}"} "${args[@]}"
rc=$?
set -e
echo "test.sh: pytest exit code $rc after $(( $(date +%s) - start )) s"
exit $rc
