"""Paired runs as real processes: kill -9 with every variant at one position, then resume; two
processes keep every variant in sync. In-process paired runs: tests/test_train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_config
from fastvit_reduce import runs

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
    d = tmp_path_factory.mktemp("paired")
    base = write_tiny_config(d, "baseline.yaml")
    (d / "thin.yaml").write_text(f"base: {base}\nreduction: {{strategy: thin, mlp_ratio: 2.0}}\n")
    (d / "grouped.yaml").write_text(f"base: {base}\nreduction: {{strategy: grouped}}\nema: {{decay: 0.5}}\n")
    (d / "runner.py").write_text(RUNNER)
    return d


def final(folder: Path) -> dict:
    return json.loads((folder / "final.json").read_text())


def test_kill9_then_resume_finishes_every_variant_once_with_the_unbroken_weights(env):
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
    done = subprocess.run(argv, cwd=REPO, env=envv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    unbroken = subprocess.run([a.replace("killed", "unbroken") for a in argv], cwd=REPO, env=envv,
                              capture_output=True, text=True, timeout=300)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    for name in ("baseline", "thin"):
        folder = env / "runs" / "killed" / name
        assert [r["epoch"] for r in runs.RunFolder(folder).read_rows()] == [0, 1, 2]
        assert not (folder / "prev.pt").exists()
        assert final(folder)["weights_hash"] == final(env / "runs" / "unbroken" / name)["weights_hash"]


def test_two_processes_keep_every_variant_in_sync(env):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(env / "runner.py"), "--config", str(env / "baseline.yaml"), "--pair-with",
                             str(env / "grouped.yaml"), f"--logging.folder={env / 'runs' / 'ddp'}",
                             "--training.epochs=1", "--training.global_batch=32"],
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("baseline", "grouped"):
        fin = final(env / "runs" / "ddp" / name)
        assert fin["completed"] and fin["world_size"] == 2 and fin["ranks_in_sync"] is True
        assert (fin["global_batch"], fin["accum"]) == (32, 2)
