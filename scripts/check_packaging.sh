#!/usr/bin/env bash
# The offline install path, checked end to end (a CI step after scripts/test.sh; ~2 min: it
# compiles ffcv once and builds a venv, which is why it is not part of the pytest suite):
#   1. scripts/wheelhouse.sh --no-torch builds a wheelhouse into a temp folder: the repaired ffcv
#      wheel must carry its OpenCV and libjpeg-turbo copies (ffcv.libs/), no torch family wheel;
#   2. pip --no-index installs ffcv (and this project) from it into a fresh venv;
#   3. `import ffcv` and `import fastvit_reduce` work there, and the compiled extension loads the
#      bundled libraries (ldd resolves into ffcv.libs/), not the system's;
#   4. scripts/gpu_bundle.sh builds the GPU box's folder (ffcv for CPython 3.12, timm, fastargs, the
#      project) under 64 MiB with a manifest whose hashes match, and its cp312 ffcv extension,
#      unpacked, loads its bundled libraries with a Python 3.12 (no torch needed for that).
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

echo "check_packaging: 1/4 wheelhouse (--no-torch) -> $WH"
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

echo "check_packaging: 2/4 pip --no-index into a fresh venv"
VENV=$WORK/venv
"$PY" -m venv "$VENV"
V=$VENV/bin/python
"$V" -m pip install -q --no-index --find-links "$WH" "ffcv==1.0.2" pillow || fail "pip --no-index install of ffcv"
"$V" -m pip install -q --no-index --no-deps --find-links "$WH" fastvit_reduce || fail "pip --no-index install of fastvit_reduce"

echo "check_packaging: 3/4 imports and the libraries the extension loads"
SO=$("$V" -c "import ffcv, ffcv.fields, ffcv._libffcv as m; print(m.__file__)" | tail -1) || fail "import ffcv in the fresh venv"
# the package import is light (no torch, which this venv lacks): it must work without it
"$V" -c "import fastvit_reduce, sys; assert 'torch' not in sys.modules" || fail "import fastvit_reduce in the fresh venv"
LDD=$(ldd "$SO")
for lib in libopencv_imgproc libopencv_core libturbojpeg; do
    line=$(grep -m1 "$lib" <<<"$LDD") || fail "ldd $SO: no $lib at all"
    [[ "$line" == *ffcv.libs/* && "$line" != *"not found"* ]] || fail "ldd $SO: $line (expected ffcv.libs/)"
done
echo "check_packaging: ok (ffcv's extension loads libopencv_imgproc, libopencv_core and libturbojpeg from ffcv.libs/)"

echo "check_packaging: 4/4 the GPU box's folder (scripts/gpu_bundle.sh)"
BUNDLE=$WORK/gpu_bundle
bash scripts/gpu_bundle.sh "$BUNDLE" >"$WORK/gpu_bundle.log" 2>&1 || { tail -c 3000 "$WORK/gpu_bundle.log" >&2; fail "scripts/gpu_bundle.sh"; }
PY312=""  # the Python 3.12 gpu_bundle.sh found (the same search)
for c in ${GPU_BUNDLE_PYTHON:-} $(command -v python3.12 || true) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY312=$c; break; fi
done
"$PY" - "$BUNDLE" <<'PYEOF'
import hashlib, json, sys, zipfile
from pathlib import Path
out = Path(sys.argv[1])
manifest = json.loads((out / "manifest.json").read_text())
wheels = {w.name: w for w in out.glob("*.whl")}
total = sum(w.stat().st_size for w in wheels.values())
assert total <= 64 * 2**20, f"the bundle is {total / 2**20:.1f} MiB, over the 64 MiB one device call carries"
names = {e["name"] for e in manifest["wheels"]}
assert {"ffcv", "fastargs", "terminaltables", "timm", "fastvit_reduce"} <= names, names
for e in manifest["wheels"]:
    assert hashlib.sha256(wheels[e["file"]].read_bytes()).hexdigest() == e["sha256"], e["file"]
[ffcv] = [n for n in wheels if n.startswith("ffcv-1.0.2-cp312-cp312-manylinux")]
zipfile.ZipFile(wheels[ffcv]).extractall(out / "unpacked")
print(f"check_packaging: GPU bundle {total / 2**20:.1f} MiB, hashes match, {ffcv}")
PYEOF
[ $? -eq 0 ] || fail "the GPU bundle's contents"
SO312=$(ls "$BUNDLE"/unpacked/ffcv/_libffcv*.so | head -1)
LDD=$(ldd "$SO312")
for lib in libopencv_imgproc libopencv_core libturbojpeg; do
    line=$(grep -m1 "$lib" <<<"$LDD") || fail "ldd $SO312: no $lib at all"
    [[ "$line" == *ffcv.libs/* && "$line" != *"not found"* ]] || fail "ldd $SO312: $line (expected ffcv.libs/)"
done
if [ -n "$PY312" ]; then  # dlopen under 3.12 (PyModule_Create2 and all)
    "$PY312" -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$SO312" || fail "the cp312 ffcv extension does not load with $PY312"
fi
echo "check_packaging: ok (the GPU bundle builds; its cp312 ffcv extension loads its bundled libraries)"
