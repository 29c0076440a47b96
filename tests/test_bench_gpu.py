"""fastvit_reduce.bench.gpu (``fastvit-reduce bench gpu``): bad arguments. The command's CPU run
(``--device cpu --quick``): tests/e2e/test_bench.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bad_arguments_exit_2():
    p = subprocess.run([sys.executable, "-m", "fastvit_reduce.cli", "bench", "gpu", "--sections", "9"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--sections" in p.stderr
