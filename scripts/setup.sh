#!/usr/bin/env bash
# Idempotent, non-interactive setup for a fresh Debian machine (run as root, or with sudo available).
#   1. system packages ffcv 1.0.2 needs to compile (only those missing),
#   2. a virtualenv at <repo>/.venv,
#   3. `pip install -e .[test]`, skipped when pyproject.toml has not changed since the last install.
# A second run takes a few seconds.  The Dockerfile runs `scripts/setup.sh --system-only`.
#   scripts/setup.sh --offline DIR   no apt, no index: install from a wheelhouse made by
#                                    scripts/wheelhouse.sh (GPU nodes without internet)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" = "--offline" ]; then
    WH=${2:?setup: --offline needs the wheelhouse folder}
    [ -d "$WH" ] || { echo "setup: no wheelhouse folder $WH" >&2; exit 2; }
    PY=${PYTHON:-python3}
    [ -x .venv/bin/python ] || $PY -m venv .venv
    # why no apt step: the repaired ffcv wheel carries its OpenCV and turbojpeg libraries
    .venv/bin/python -m pip install -q --no-index --find-links "$WH" "fastvit_reduce[demo]"
    .venv/bin/python -c "import ffcv, timm, fastvit_reduce"
    echo "setup: installed offline from $WH into $ROOT/.venv"
    exit 0
fi

# why: ffcv's setup.py finds OpenCV and libjpeg-turbo through the pkg-config *binary*.
SYSTEM_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev g++)

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "${1:-}" = "--system-only" ] && exit 0

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)"
    $PY -m venv .venv
fi

stamp=.venv/.fastvit_reduce-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
# installed, and ffcv's compiled extension loads with its libraries (dlopen, not `import ffcv`: that
# imports torch, ~7 s on 2 cores, on every scripts/test.sh run)
installed_ok() {
    .venv/bin/python -c "
import ctypes, importlib.metadata as m
m.version('fastvit_reduce')
so = next(f for f in m.files('ffcv') if f.name.startswith('_libffcv') and f.name.endswith('.so'))
ctypes.CDLL(str(so.locate()))" 2>/dev/null
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed_ok; then
    echo "setup: .venv is up to date ($ROOT/.venv)"
    exit 0
fi
echo "setup: installing fastvit_reduce (editable, with test extras) into .venv — first time takes a few minutes"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "setup: done ($ROOT/.venv)"
