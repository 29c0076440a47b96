"""scripts/wheelhouse.sh + setup.sh --offline: a wheelhouse built here installs ffcv into a fresh
venv with ``pip --no-index``, ``import ffcv`` works there, and the compiled extension loads the
OpenCV and libjpeg-turbo copies bundled inside the repaired wheel (ffcv.libs/), not the system's.

Slow (~1-3 min: compiles ffcv once, builds a venv); part of the suite so that CI (``bash .ci/run``
on a fresh root machine with apt and PyPI) checks the offline path. torch is not in this
wheelhouse (--no-torch, as for GPU nodes that bring their own); pip may take it from the local
wheel folders of pip's own configuration, the only place besides the wheelhouse it looks, so
torch's own pure-Python dependencies are added to this wheelhouse.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_DEPS = "filelock typing-extensions setuptools sympy networkx jinja2 fsspec"  # torch's Requires-Dist
pytestmark = pytest.mark.skipif(shutil.which("python3") is None or shutil.which("ldd") is None,
                                reason="needs python3 and ldd")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheelhouse")
    reqs = "ffcv==1.0.2 pillow " + TORCH_DEPS  # why pillow: ffcv.fields imports PIL undeclared
    p = subprocess.run(["bash", "scripts/wheelhouse.sh", "--no-torch", "--only", reqs,
                        sys.executable, str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, p.stdout


def test_repaired_ffcv_wheel_carries_its_libraries(wheelhouse):
    out, log = wheelhouse
    wheels = sorted(w.name for w in out.glob("*.whl"))
    ffcv = [w for w in wheels if w.startswith("ffcv-1.0.2-") and "manylinux" in w]
    assert len(ffcv) == 1, wheels
    assert not any(w.startswith(("torch-", "torchvision-", "nvidia")) for w in wheels)  # --no-torch
    for dep in ("numba", "numpy", "opencv_python", "fastargs", "pytorch_pfn_extras", "pillow"):
        assert any(w.startswith(dep + "-") for w in wheels), (dep, wheels)
    import zipfile
    names = zipfile.ZipFile(out / ffcv[0]).namelist()
    assert any("ffcv.libs/libopencv_imgproc" in n for n in names)
    assert any("ffcv.libs/libturbojpeg" in n for n in names)
    assert "wheelhouse: ffcv-1.0.2-" in log and "with its OpenCV/turbojpeg libs" in log


def test_no_index_install_into_a_fresh_venv(wheelhouse, tmp_path):
    out, _ = wheelhouse
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(out),
                        "ffcv==1.0.2", "pillow"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([str(py), "-c", "import ffcv, ffcv.fields, ffcv._libffcv as m; print(m.__file__)"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    so = p.stdout.strip().splitlines()[-1]
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    for lib in ("libopencv_imgproc", "libopencv_core", "libturbojpeg"):
        line = next(l for l in ldd.splitlines() if lib in l)
        assert "ffcv.libs/" in line and "not found" not in line, line
