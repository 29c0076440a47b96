"""fastvit_reduce.slurm (``sweep --slurm``): sbatch scripts written and submitted, finished runs
skipped, and config names that would inject a command refused or kept as data."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

from fastvit_reduce import sweep


def test_slurm_scripts_are_written_and_submitted(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "thin.yaml"
    cfg.write_text("reduction:\n  strategy: thin\n")
    done = tmp_path / "out" / "baseline"
    done.mkdir(parents=True)
    (done / "final.json").write_text(json.dumps({"completed": True}))
    (tmp_path / "baseline.yaml").write_text("reduction:\n  strategy: baseline\n")
    job = sweep.make_jobs([str(tmp_path / "baseline.yaml")], tmp_path / "out")[0]
    # as if an earlier sweep had finished it with the same settings (the trainer's params.json)
    [cfg_then] = sweep.resolved_configs(job, tmp_path / "out", ["training.epochs=3"])
    (done / "params.json").write_text(json.dumps({"config": cfg_then}))
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
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text  # torchrun passes SIGTERM on to the trainer
    # two jobs sharing a node (1 GPU each) must not both host their rendezvous on one port
    [port_line] = [t for t in text.splitlines() if t.startswith("export MASTER_PORT=")]
    ports = {subprocess.run(["bash", "-c", f"{port_line}; echo $MASTER_PORT"], text=True, capture_output=True,
                            env={"SLURM_JOB_ID": job_id}).stdout.strip() for job_id in ("41", "42")}
    assert len(ports) == 2 and all(10000 <= int(p) < 30000 for p in ports), ports
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell syntax


def test_slurm_without_sbatch_prints_the_scripts(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.yaml").write_text("{}\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert sweep.main([str(tmp_path / "a.yaml"), "--slurm", "--out", str(tmp_path / "o")]) == 0
    assert f"sbatch {tmp_path / 'o' / 'slurm' / 'a.sbatch'}" in capsys.readouterr().out


def test_slurm_refuses_a_config_name_that_would_inject_a_command(tmp_path, monkeypatch, capsys):
    """A newline in a config's file name used to end the script's comment line and run the rest."""
    evil = tmp_path / "x\n: ; touch PWNED #.yaml"
    evil.write_text("{}\n")
    bin_dir = tmp_path / "bin"  # a fake Slurm that really runs what it is given
    bin_dir.mkdir()
    for tool, body in {"sbatch": 'bash "$1" >/dev/null 2>&1; echo submitted', "srun": "true",
                       "scontrol": "echo node0", "scancel": "true"}.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)

    rc = sweep.main([str(evil), "--slurm", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: config path contains a control character") and err.count("\n") == 1
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_slurm_script_quotes_names_with_spaces_and_quotes(tmp_path, monkeypatch):
    """Spaces, quotes and $ in a config name stay data in the generated script."""
    odd = tmp_path / "it's $(touch PWNED) a.yaml"
    odd.write_text("{}\n")
    bash = shutil.which("bash")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: scripts are only written
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(odd), "--slurm", "--out", str(tmp_path / "out")]) == 0
    [script] = (tmp_path / "out" / "slurm").iterdir()
    subprocess.run([bash, "-n", str(script)], check=True)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for tool in ("srun", "scontrol", "scancel"):
        (fake / tool).write_text("#!/bin/sh\ntrue\n")
        (fake / tool).chmod(0o755)
    subprocess.run([bash, str(script)], env={"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "1",
                                                "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n0"},
                   capture_output=True, cwd=tmp_path, timeout=30)
    assert not (tmp_path / "PWNED").exists()
