"""``fastvit-reduce bench gpu --device cpu --quick --json``: every section runs and reports sane
numbers (structure and invariants only; no timing thresholds), so the GPU check cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "fastvit_reduce.cli", "bench", "gpu", "--device", "cpu",
                        "--quick", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_loader_sections(result):
    assert result["device"] == "cpu" and result["quick"] is True
    assert result["loader"]["cpu_img_s"] > 0
    b = result["bit_exact"]
    assert b["batches"] == 4 and b["equal_batches"] == 4 and b["bit_exact"] is True


def test_augment_and_ema_sections(result):
    a = result["augment"]
    assert a["randaugment_ms"] > 0 and a["full_ms"] > 0
    assert a["randaugment_host_syncs"] is None and a["full_host_syncs"] is None  # n/a on CPU
    assert result["ema"] == dict(shared=True, moved_fraction=0.5, once=True)


def test_step_section(result):
    rows = result["steps"]
    assert [(r["strategy"], r["mode"]) for r in rows] == [
        (s, m) for s in ("baseline", "thin", "shallow", "grouped") for m in ("eager", "compile")]
    for r in rows:
        assert r["step_ms"] > 0 and r["img_s"] == pytest.approx(8 / r["step_ms"] * 1e3, rel=1e-2)
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no bf16 peak / CUDA memory on CPU
    assert all(r["vs_baseline"] == 1.0 for r in rows if r["strategy"] == "baseline")


def test_sigterm_then_resume_section(result):
    t = result["train"]
    assert (t["first_exit"], t["second_exit"], t["completed"], t["ok"]) == (124, 0, True, True)
    assert 0 <= t["data_wait_frac"] <= 1


def test_bad_arguments_exit_2():
    p = subprocess.run([sys.executable, "-m", "fastvit_reduce.cli", "bench", "gpu", "--sections", "9"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--sections" in p.stderr
