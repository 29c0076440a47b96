"""Paired mode: K variants step in turn on each batch, decoded and augmented once.

A paired variant must be exactly the run it would be alone (same batches, same drop-path stream,
same init), write the same files, survive kill -9 with every variant at one position, and stop
alone when its loss goes non-finite. In-process runs use ffcv without its JIT (``no_jit``).
"""
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
from fastvit_reduce.report import load_run, markdown_table
from fastvit_reduce.train import main

REPO = Path(__file__).resolve().parent.parent
RUNNER = """import sys
import fastvit_reduce.data.ffcv_patch  # the fast ffcv import
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)  # why: tests skip ffcv's ~10 s numba JIT per pipeline
from fastvit_reduce.train import main
sys.exit(main(sys.argv[1:]))
"""
FILES = {"params.json", "log.jsonl", "summary.csv", "final.json", "last.pt", "best.pt", "train.log"}


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


@pytest.mark.usefixtures("no_jit")
def test_a_paired_variant_is_exactly_its_separate_run(env):
    runs_dir = env / "runs"
    assert main(["--config", str(env / "baseline.yaml"), "--pair-with", str(env / "thin.yaml"),
                 str(env / "grouped.yaml"), f"--logging.folder={runs_dir / 'paired'}"]) == 0
    for name in ("baseline", "thin", "grouped"):
        assert main(["--config", str(env / f"{name}.yaml"), f"--logging.folder={runs_dir / 'alone'}"]) == 0
        paired, alone = runs_dir / "paired" / name, runs_dir / "alone" / name
        assert FILES <= {p.name for p in paired.iterdir()}
        fp, fa = final(paired), final(alone)
        # same parameter count, same batches (hash of the first input batch), same weights
        assert (fp["params"], fp["first_batch_hash"], fp["weights_hash"]) == \
               (fa["params"], fa["first_batch_hash"], fa["weights_hash"])
        assert fp["completed"] and fp["paired_with"] and not fa["paired_with"]
    hashes = {final(runs_dir / "paired" / n)["first_batch_hash"] for n in ("baseline", "thin", "grouped")}
    assert len(hashes) == 1  # every variant saw bit-identical input batches
    params = json.loads((runs_dir / "paired" / "thin" / "params.json").read_text())
    assert params["pair"] == {"variants": ["baseline", "thin", "grouped"], "baseline": "baseline"}

    rows = [load_run(runs_dir / "paired" / n) for n in ("baseline", "thin", "grouped")]
    table = markdown_table(rows)
    assert "per-epoch differences vs baseline (same batches" in table and "thin Δtop-1" in table
    assert "grouped Δloss" in table and "1 seed: no interval" in table  # one seed: said, not hidden
    # each variant's own step time: it shares the wall clock, not the compute
    compute = [final(runs_dir / "paired" / n)["compute_s"] for n in ("baseline", "thin", "grouped")]
    assert all(c > 0 for c in compute) and sum(compute) < final(runs_dir / "paired" / "thin")["total_time_s"]
    # re-running a finished paired command is a no-op
    stamp = (runs_dir / "paired" / "thin" / "final.json").stat().st_mtime_ns
    assert main(["--config", str(env / "baseline.yaml"), "--pair-with", str(env / "thin.yaml"),
                 str(env / "grouped.yaml"), f"--logging.folder={runs_dir / 'paired'}"]) == 0
    assert (runs_dir / "paired" / "thin" / "final.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("yaml_text, key", [
    ("training: {seed: 3}", "training.seed"),
    ("augment: {mixup: 0.5}", "augment.mixup"),
    ("data: {rrc_scale: [0.5, 1.0]}", "data.rrc_scale"),
    ("model: {num_classes: 5}", "model.num_classes"),
])
def test_configs_that_shape_the_batches_differently_are_refused(env, tmp_path, capsys, yaml_text, key):
    (tmp_path / "other.yaml").write_text(f"base: {env / 'baseline.yaml'}\nreduction: {{strategy: thin}}\n{yaml_text}\n")
    assert main(["--config", str(env / "baseline.yaml"), "--pair-with", str(tmp_path / "other.yaml"),
                 f"--logging.folder={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be paired" in err and key in err and "other vs baseline" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_jit")
def test_a_nonfinite_variant_stops_alone(env, tmp_path, capsys):
    (tmp_path / "wild.yaml").write_text(f"base: {env / 'baseline.yaml'}\noptim: {{lr: 1.0e30}}\n"
                                        "lr: {warmup_epochs: 0}\n")
    assert main(["--config", str(env / "baseline.yaml"), "--pair-with", str(tmp_path / "wild.yaml"),
                 f"--logging.folder={tmp_path / 'runs'}", "--training.max_nonfinite=2",
                 "--logging.every_steps=1"]) == 0
    wild, base = final(tmp_path / "runs" / "wild"), final(tmp_path / "runs" / "baseline")
    assert base["completed"] and base["epochs_done"] == 2
    assert not wild["completed"] and wild["exit_reason"].startswith("non-finite loss for 2 consecutive")
    assert "wild: non-finite loss" in capsys.readouterr().err


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


@pytest.mark.usefixtures("no_jit")
def test_pair_parts_train_the_pair_between_processes_with_the_same_weights(env, capsys):
    """``--pair-part I/N``: variants I, I+N, ... of the pair, in their own process; each variant
    ends exactly as in the one-process pair (``..._is_exactly_its_separate_run`` made those), and
    every part records the whole pair, so ``report`` still shows one paired group."""
    pair = ["--config", str(env / "baseline.yaml"), "--pair-with", str(env / "thin.yaml"), str(env / "grouped.yaml")]
    parts = env / "runs" / "parts"
    assert main([*pair, "--pair-part", "2/2", f"--logging.folder={parts}"]) == 0
    assert {p.name for p in parts.iterdir()} == {"thin"}  # [baseline, thin, grouped][1::2]
    assert main([*pair, "--pair-part=1/2", f"--logging.folder={parts}"]) == 0
    assert {p.name for p in parts.iterdir()} == {"baseline", "thin", "grouped"}
    one_process = env / "runs" / "paired"
    if not (one_process / "thin" / "final.json").is_file():  # this test alone: make the reference
        assert main([*pair, f"--logging.folder={one_process}"]) == 0
    for name in ("baseline", "thin", "grouped"):
        assert final(parts / name)["weights_hash"] == final(one_process / name)["weights_hash"], name
        params = json.loads((parts / name / "params.json").read_text())
        assert params["pair"] == {"variants": ["baseline", "thin", "grouped"], "baseline": "baseline"}
    assert final(parts / "thin")["paired_with"] == []  # trained alone in its process
    table = markdown_table([load_run(parts / n) for n in ("baseline", "thin", "grouped")])
    assert "per-epoch differences vs baseline" in table and "thin Δtop-1" in table
    capsys.readouterr()
    for bad, message in (("3/2", "1 <= I <= N"), ("1/4", "only 3 variant(s)"), ("x", "I/N")):
        assert main([*pair, "--pair-part", bad, f"--logging.folder={parts}"]) == 2
        assert message in capsys.readouterr().err
