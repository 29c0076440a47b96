"""Paired runs as real processes: kill -9 with every variant at one position, then resume. Two
processes keeping every variant of a pair in sync: tests/e2e/test_train_cli.py (one torchrun run
for the pair and the unpaired checks); in-process paired runs: tests/test_train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import paired_configs

from fastvit_reduce import runs
from fastvit_reduce.train import main

REPO = Path(__file__).resolve().parents[2]
RUNNER = """import sys
import fastvit_reduce.data.ffcv_patch  # the fast ffcv import
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)  # why: tests skip ffcv's ~10 s numba JIT per pipeline
from fastvit_reduce.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = paired_configs(tmp_path_factory.mktemp("paired"))
    (d / "runner.py").write_text(RUNNER)
    return d


def final(folder: Path) -> dict:
    return json.loads((folder / "final.json").read_text())


def test_kill9_then_resume_finishes_every_variant_once_with_the_unbroken_weights(env, no_jit):
    """The killed run is a process; its resume and the reference run that is never stopped run
    here (``main``: the same trainer without the ~5 s process start)."""
    argv = [sys.executable, str(env / "runner.py"), "--config", str(env / "baseline.yaml"), "--pair-with",
            str(env / "thin.yaml"), f"--logging.folder={env / 'runs' / 'killed'}", "--training.epochs=3",
            "--checkpoint.every_minutes=0.00001", "--logging.every_steps=1"]
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = env / "runs" / "killed" / "thin" / "train.log"
    p = subprocess.Popen(argv, cwd=REPO, env=envv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "saved last.pt at epoch 1 step 3" not in (log.read_text() if log.is_file() else ""):
        assert p.poll() is None, "trainer ended before it could be killed"
        time.sleep(0.05)
    p.kill()  # SIGKILL, possibly between two variants' saves
    p.wait(timeout=60)
    assert main(argv[2:]) == 0  # the resume (argv[:2]: python runner.py)
    assert main([a.replace("killed", "unbroken") for a in argv[2:]]) == 0
    for name in ("baseline", "thin"):
        folder = env / "runs" / "killed" / name
        assert [r["epoch"] for r in runs.RunFolder(folder).read_rows()] == [0, 1, 2]
        assert not (folder / "prev.pt").exists()
        assert final(folder)["weights_hash"] == final(env / "runs" / "unbroken" / name)["weights_hash"]
