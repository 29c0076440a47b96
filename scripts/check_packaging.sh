#!/usr/bin/env bash
# The offline install path, checked end to end (a CI step after scripts/test.sh; ~2 min: it
# compiles ffcv once and builds a venv, which is why it is not part of the pytest suite):
#   1. scripts/wheelhouse.sh --no-torch builds a wheelhouse into a temp folder: the repaired ffcv
#      wheel must carry its OpenCV and libjpeg-turbo copies (ffcv.libs/), no torch family wheel;
#   2. pip --no-index installs ffcv (and this project) from it into a fresh venv;
#   3. `import ffcv` and `import fastvit_reduce` work there, and the compiled extension loads the
#      bundled libraries (ldd resolves into ffcv.libs/), not the system's.
# torch is not in this wheelhouse (--no-torch, as for GPU nodes that bring their own); pip may take
# it from the local wheel folders of pip's own configuration, the only place besides the wheelhouse
# it looks, so torch's own pure-Python dependencies are added to this wheelhouse.
#   scripts/check_packaging.sh [KEEP_DIR]   KEEP_DIR: build there and keep it (default: a temp folder)
# Exit code 0 when every check passes; the failing check's message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
for tool in python3 ldd; do
    command -v "$tool" >/dev/null || { echo "check_packaging: needs $tool" >&2; exit 2; }
done
bash scripts/setup.sh >/dev/null  # .venv: the interpreter the wheels are built for (as the suite's)
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [ -n "${1:-}" ]; then
    WORK=$(mkdir -p "$1" && cd "$1" && pwd)
else
    WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
fi
WH=$WORK/wheelhouse
LOG=$WORK/wheelhouse.log
TORCH_DEPS="filelock typing-extensions setuptools sympy networkx jinja2 fsspec"  # torch's Requires-Dist
fail() { echo "check_packaging: FAILED: $*" >&2; exit 1; }

echo "check_packaging: 1/3 wheelhouse (--no-torch) -> $WH"
# why pillow: ffcv.fields imports PIL without declaring it
if ! bash scripts/wheelhouse.sh --no-torch --only "ffcv==1.0.2 pillow $TORCH_DEPS" "$PY" "$WH" >"$LOG" 2>&1; then
    tail -c 3000 "$LOG" >&2
    fail "scripts/wheelhouse.sh exited non-zero (log above)"
fi
# the project itself (its wheel: setuptools' deprecation chatter goes to the log); the in-tree
# build leaves build/ and *.egg-info: removed again unless they were there before
leftovers=()
for d in build fastvit_reduce.egg-info; do [ -e "$d" ] || leftovers+=("$ROOT/$d"); done
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WH" "$ROOT" >>"$LOG" 2>&1 ||
    { tail -c 3000 "$LOG" >&2; fail "pip wheel of the project (log above)"; }
rm -rf ${leftovers[@]+"${leftovers[@]}"}
"$PY" - "$WH" "$LOG" <<'PYEOF'
import sys, zipfile
from pathlib import Path
out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
wheels = sorted(w.name for w in out.glob("*.whl"))
ffcv = [w for w in wheels if w.startswith("ffcv-1.0.2-") and "manylinux" in w]
assert len(ffcv) == 1, f"expected one repaired ffcv-1.0.2 manylinux wheel, found {ffcv}: {wheels}"
torch_family = [w for w in wheels if w.startswith(("torch-", "torchvision-", "nvidia"))]
assert not torch_family, f"--no-torch, yet the wheelhouse holds {torch_family}"
for dep in ("numba", "numpy", "opencv_python", "fastargs", "pytorch_pfn_extras", "pillow"):
    assert any(w.startswith(dep + "-") for w in wheels), f"no {dep} wheel: {wheels}"
names = zipfile.ZipFile(out / ffcv[0]).namelist()
assert any("ffcv.libs/libopencv_imgproc" in n for n in names), f"{ffcv[0]} lacks ffcv.libs/libopencv_imgproc"
assert any("ffcv.libs/libturbojpeg" in n for n in names), f"{ffcv[0]} lacks ffcv.libs/libturbojpeg"
assert "wheelhouse: ffcv-1.0.2-" in log and "with its OpenCV/turbojpeg libs" in log, \
    "wheelhouse.sh did not report the repaired ffcv wheel and its libs:\n" + log[-2000:]
print(f"check_packaging: {len(wheels)} wheels; {ffcv[0]} carries its OpenCV/turbojpeg libs; no torch")
PYEOF

echo "check_packaging: 2/3 pip --no-index into a fresh venv"
VENV=$WORK/venv
"$PY" -m venv "$VENV"
V=$VENV/bin/python
"$V" -m pip install -q --no-index --find-links "$WH" "ffcv==1.0.2" pillow || fail "pip --no-index install of ffcv"
"$V" -m pip install -q --no-index --no-deps --find-links "$WH" fastvit_reduce || fail "pip --no-index install of fastvit_reduce"

echo "check_packaging: 3/3 imports and the libraries the extension loads"
SO=$("$V" -c "import ffcv, ffcv.fields, ffcv._libffcv as m; print(m.__file__)" | tail -1) || fail "import ffcv in the fresh venv"
# the package import is light (no torch, which this venv lacks): it must work without it
"$V" -c "import fastvit_reduce, sys; assert 'torch' not in sys.modules" || fail "import fastvit_reduce in the fresh venv"
LDD=$(ldd "$SO")
for lib in libopencv_imgproc libopencv_core libturbojpeg; do
    line=$(grep -m1 "$lib" <<<"$LDD") || fail "ldd $SO: no $lib at all"
    [[ "$line" == *ffcv.libs/* && "$line" != *"not found"* ]] || fail "ldd $SO: $line (expected ffcv.libs/)"
done
echo "check_packaging: ok (ffcv's extension loads libopencv_imgproc, libopencv_core and libturbojpeg from ffcv.libs/)"
