"""fastvit_reduce.data.ffcv_patch: the fast ffcv import, checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # a fresh interpreter that imports ffcv (and torch)
def test_ffcv_import_uses_a_plain_dict_for_image_modes_and_restores_numba():
    code = ("import time; t = time.perf_counter(); import fastvit_reduce.data.ffcv_patch;"
            "from ffcv.fields.rgb_image import IMAGE_MODES; import numba.typed as t2;"
            "print(type(IMAGE_MODES).__name__, sorted(IMAGE_MODES.items()), t2.Dict.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[0] == "dict"
    assert "[('jpg', 0), ('raw', 1)]" in out.stdout  # ffcv 1.0.2's entries
    assert out.stdout.strip().endswith("numba.typed.typeddict")


def test_every_module_that_imports_ffcv_imports_the_patch():
    """A module that imports ffcv without the patch pays the 4-5 s in every process where it is the
    first to import ffcv (a spawned worker is), and on Python 3.12 fails on ffcv's
    ``distutils.log`` import. (write.py's lazy ffcv imports run after its ``write_split`` imported
    the patch, in forked workers.)"""
    import re
    from pathlib import Path

    import fastvit_reduce
    package = Path(fastvit_reduce.__file__).parent
    late = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "ffcv_patch.py":
            continue
        lines = path.read_text().splitlines()
        ffcv = [i for i, line in enumerate(lines) if re.match(r"\s*(from ffcv[ .]|import ffcv)", line)]
        patch = [i for i, line in enumerate(lines) if re.match(r"\s*import fastvit_reduce\.data\.ffcv_patch", line)]
        if ffcv and not patch:
            late.append(path.relative_to(package).as_posix())
    assert late == []
