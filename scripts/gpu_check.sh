#!/usr/bin/env bash
# The GPU check, on the GPU box: install the bundle, check the environment, run the check.
#   scripts/gpu_check.sh [--rehearse] [--env-only] DIR OUT
#     DIR   the folder scripts/gpu_bundle.sh made (wheels + manifest.json)
#     OUT   results: OUT/gpu_check.jsonl (one JSON object per section) and OUT/gpu_check.log
#     --rehearse  here, on a machine without a GPU: the Python 3.12 venv that mimics the box
#                 ($GPU_REHEARSE_PYTHON, default /work/gpu_prep/py312/bin/python), device cpu
#     --env-only  install and check the environment; skip fastvit_reduce.bench.gpu_check
# Exit status: 0 when every section is ok, 1 when one is not, 2 on bad arguments.
#
# On the device machine (docs/gpu.md), with the bundle built into an ignored folder of the repo:
#   echo /.gpu_bundle/ >> .git/info/exclude; scripts/gpu_bundle.sh .gpu_bundle
#   run(command="scripts/gpu_check.sh .gpu_bundle $OUT", carry=[".gpu_bundle"], timeout_s=600)
#
# How: every wheel in DIR goes into a temporary folder T with pip --target (no venv: it would hide
# the box's CUDA torch), and T goes first on PYTHONPATH, so the carried timm wins over the box's.
# numba's threading layer is pinned to omp (override: GPU_CHECK_NUMBA_LAYER): numba's default
# falls back to workqueue when neither TBB nor libgomp loads, and workqueue aborts the process when
# two threads (two ffcv loaders) launch parallel kernels at once; tbb has been seen to hang at exit.
# The environment section records the layer that actually ran.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

REHEARSE=0; ENV_ONLY=0; pos=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) REHEARSE=1 ;;
        --env-only) ENV_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
        *) pos+=("$1") ;;
    esac
    shift
done
[ ${#pos[@]} -eq 2 ] || { usage >&2; exit 2; }
[ -f "${pos[0]}/manifest.json" ] \
    || { echo "gpu_check: ${pos[0]} has no manifest.json (made by scripts/gpu_bundle.sh DIR)" >&2; exit 2; }
DIR=$(cd "${pos[0]}" && pwd)
mkdir -p "${pos[1]}"; OUT=$(cd "${pos[1]}" && pwd)

if [ "$REHEARSE" = 1 ]; then
    PY=${GPU_REHEARSE_PYTHON:-/work/gpu_prep/py312/bin/python}; DEVICE=cpu
else
    PY=python3; DEVICE=cuda
fi
command -v "$PY" >/dev/null || { echo "gpu_check: no interpreter $PY" >&2; exit 2; }

JSONL="$OUT/gpu_check.jsonl"; LOG="$OUT/gpu_check.log"
: > "$JSONL"; : > "$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }
section_fail() {  # a section that could not even start: name, error
    "$PY" -c 'import json,sys; print(json.dumps({"section": sys.argv[1], "ok": False, "error": sys.argv[2]}))' \
        "$1" "$2" >> "$JSONL"
    say "FAILED $1: $2"
}

T=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); trap 'rm -rf "$T"' EXIT
export PYTHONPATH="$T${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$T/bin:$PATH"
export NUMBA_THREADING_LAYER=${GPU_CHECK_NUMBA_LAYER:-omp}
export PYTHONUNBUFFERED=1
say "python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')), device $DEVICE," \
    "NUMBA_THREADING_LAYER=$NUMBA_THREADING_LAYER, site $T"

# --- install (PIP_CONFIG_FILE=/dev/null: no machine-wide index, find-links or constraints apply)
if ! PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --disable-pip-version-check --target "$T" "$DIR"/*.whl >>"$LOG" 2>&1; then
    section_fail install "pip install --target failed (see gpu_check.log)"
    exit 1
fi

# --- the environment (always), then the check itself
rc=0
"$PY" "$ROOT/scripts/gpu_env_probe.py" --bundle "$DIR" --site "$T" --device "$DEVICE" --out "$JSONL" \
    2>>"$LOG" | tee -a "$LOG" || rc=1
grep -q '"section": "environment"' "$JSONL" \
    || { section_fail environment "the probe wrote no JSON line (see gpu_check.log)"; rc=1; }

if [ "$ENV_ONLY" = 0 ]; then
    if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("fastvit_reduce.bench.gpu_check") is None)' \
            2>>"$LOG"; then
        section_fail gpu_check "fastvit_reduce.bench.gpu_check is not in the bundle's fastvit_reduce"
        rc=1
    else
        args=(--out "$OUT"); [ "$DEVICE" = cpu ] && args+=(--device cpu)
        say "running python -m fastvit_reduce.bench.gpu_check ${args[*]}"
        code=0
        timeout --kill-after=20 "${GPU_CHECK_TIMEOUT:-540}" "$PY" -m fastvit_reduce.bench.gpu_check "${args[@]}" \
            2>&1 | tee -a "$LOG" || code=${PIPESTATUS[0]}
        if [ "$code" != 0 ]; then
            [ "$code" = 124 ] && code="124 (timeout, GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-540} s)"
            section_fail gpu_check "python -m fastvit_reduce.bench.gpu_check exited $code"
            rc=1
        fi
    fi
fi

# --- any section not ok fails the whole check
"$PY" - "$JSONL" <<'PYEOF' | tee -a "$LOG" || rc=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bad = [r.get("section", "?") for r in rows if not r.get("ok")]
print(f"gpu_check: {len(rows)} sections, {'all ok' if rows and not bad else 'FAILED: ' + ', '.join(bad)}")
sys.exit(1 if bad or not rows else 0)
PYEOF
exit $rc
