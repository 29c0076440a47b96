"""Sweep runner: real 2-config CPU sweep through torchrun + the trainer, failure, skip, Slurm scripts."""
from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys

import pytest

from fastvit_reduce import sweep
from tests.conftest import TINY_VIT


def test_slurm_scripts_are_written_and_submitted(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "thin.yaml"
    cfg.write_text("reduction:\n  strategy: thin\n")
    done = tmp_path / "out" / "baseline"
    done.mkdir(parents=True)
    (done / "final.json").write_text(json.dumps({"completed": True}))
    (tmp_path / "baseline.yaml").write_text("reduction:\n  strategy: baseline\n")
    # a fake sbatch on PATH records what it was asked to submit
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/submitted\necho "Submitted batch job 42"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    rc = sweep.main([str(tmp_path / "baseline.yaml"), str(cfg), "--slurm", "--out", str(tmp_path / "out"),
                     "--nodes", "2", "--gpus-per-run", "4", "--time", "12:00:00",
                     "--sbatch-arg=--partition=gpu", "--set", "training.epochs=3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skip baseline: already complete" in printed and "Submitted batch job 42" in printed
    script = tmp_path / "out" / "slurm" / "thin.sbatch"
    assert not (tmp_path / "out" / "slurm" / "baseline.sbatch").exists()
    assert (tmp_path / "submitted").read_text().split() == [str(script)]
    text = script.read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@180", 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in [t.strip() for t in text.splitlines()], line
    assert f"srun --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run" in text
    assert '--nnodes="$SLURM_NNODES" --nproc_per_node=4' in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in text
    assert (f"-m fastvit_reduce.cli train --config {cfg} --logging.folder={tmp_path / 'out'} "
            f"--logging.experiment=thin --training.epochs=3") in text
    assert "SIGUSR1" in text  # torchrun is told to pass SIGUSR1 on to the trainer
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell syntax


def test_slurm_without_sbatch_prints_the_scripts(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.yaml").write_text("{}\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert sweep.main([str(tmp_path / "a.yaml"), "--slurm", "--out", str(tmp_path / "o")]) == 0
    assert f"sbatch {tmp_path / 'o' / 'slurm' / 'a.sbatch'}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "config file not found"),
    (["{a}", "--gpus", "0,0"], "twice"),
    (["{a}", "--gpus", "0,1", "--gpus-per-run", "3"], "does not fit"),
    (["{a}", "--set", "epochs"], "section.key=value"),
    (["{a}", "--set", "logging.folder=x"], "chosen by the sweep"),
    (["{a}", "{b}"], "share the run folder"),
])
def test_bad_arguments_stop_before_any_run(tmp_path, capsys, args, message):
    (tmp_path / "a.yaml").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("{}\n")
    subst = {"{a}": str(tmp_path / "a.yaml"), "{b}": str(tmp_path / "sub" / "a.yaml")}
    rc = sweep.main([subst.get(a, a) for a in args] + ["--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "out").exists()
