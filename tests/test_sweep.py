"""Sweep runner: real CPU sweeps through torchrun + the trainer (failure, skip, stop + resume), GPU slots, Slurm."""
from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fastvit_reduce import sweep

SAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "rn_configs" / "sample"
# the demo's configs shrunk to a 1-epoch, 32 px, 4-class run on the tiny_beton fixture's data
TINY = ["model.img_size=32", "model.num_classes=4", "training.epochs=1", "training.batch_size=16",
        "validation.batch_size=16", "data.num_workers=1", "data.rrc_scale=0.35,1", "resolution.min_res=32",
        "resolution.max_res=32"]


def test_cpu_sweep_reports_every_run_survives_a_bad_config_and_skips_finished(tmp_path, tiny_beton, capsys):
    train = tiny_beton("train.beton", n=64, num_classes=4, size=48)
    val = tiny_beton("val.beton", n=16, num_classes=4, size=48, seed=1)
    (tmp_path / "broken.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'baseline.yaml'}\n"
                                          "training:\n  epochz: 1\n")  # misspelled key
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\n")
    out = tmp_path / "runs"
    args = ["--out", str(out), "--set", f"data.train_dataset={train}", "--set", f"data.val_dataset={val}"]
    args += [a for kv in TINY for a in ("--set", kv)]

    rc = sweep.main([str(tmp_path / "broken.yaml"), str(tmp_path / "thin.yaml")] + args)
    printed = capsys.readouterr().out
    assert rc == 1, printed
    rows = list(csv.DictReader(open(out / "sweep_summary.csv")))
    assert [r["experiment"] for r in rows] == ["broken", "thin"]  # config order, failed run kept
    broken, thin = rows
    assert broken["status"].startswith("failed") and "epochz" in broken["status"]
    assert "epochz" in Path(broken["log"]).read_text()
    assert thin["status"] == "done" and thin["strategy"] == "thin" and thin["knobs"] == "mlp_ratio=1.5"
    assert thin["epochs"] == "1" and 0 <= float(thin["best_top_1"]) <= 100 and int(thin["params"]) > 0
    assert (out / "thin" / "final.json").is_file() and (out / "logs" / "thin.log").is_file()
    md = (out / "sweep_summary.md").read_text()
    assert md in printed and str(out / "logs" / "broken.log") in md
    assert "- broken: failed (exit 2): error: configuration error: unknown key" in md
    assert (out / "sweep_summary.png").is_file()

    stamp = (out / "thin" / "final.json").stat().st_mtime_ns
    assert sweep.main([str(tmp_path / "thin.yaml")] + args) == 0  # finished run: skipped, no job
    assert "skip thin: already complete" in capsys.readouterr().out
    assert (out / "thin" / "final.json").stat().st_mtime_ns == stamp
    assert "| thin " in (out / "sweep_summary.md").read_text()
    # a changed config or --set is not skipped (the trainer then names what changed)
    job = sweep.make_jobs([str(tmp_path / "thin.yaml")], out)[0]
    overrides = args[3::2]
    assert sweep.can_skip(job, out, overrides) and not sweep.can_skip(job, out, overrides + ["training.seed=1"])
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\nreduction:\n  mlp_ratio: 1.0\n")
    assert not sweep.can_skip(job, out, overrides)


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


def test_gpu_slots_get_their_own_devices_and_ports(tmp_path, monkeypatch, capsys):
    """4 GPUs, 2 per run, 3 configs: two jobs at a time, each on its own GPUs and rendezvous port.
    torchrun is replaced by a stand-in that records its environment and finishes the run."""
    def fake_torchrun(job, out, overrides, nproc, port):
        code = ("import json, os, sys, pathlib; run = pathlib.Path(sys.argv[1]); run.mkdir(); "
                "print('GPUS', os.environ['CUDA_VISIBLE_DEVICES'], 'PORT', sys.argv[2], 'NPROC', sys.argv[3]); "
                "(run / 'final.json').write_text(json.dumps({'completed': True}))")
        return [sys.executable, "-c", code, str(job.run_dir), str(port), str(nproc)]

    monkeypatch.setattr(sweep, "torchrun_command", fake_torchrun)
    configs = []
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yaml").write_text("{}\n")
        configs.append(str(tmp_path / f"{name}.yaml"))
    out = tmp_path / "out"
    assert sweep.main(configs + ["--gpus", "0,1,2,3", "--gpus-per-run", "2", "--out", str(out)]) == 0
    seen = {n: (out / "logs" / f"{n}.log").read_text().split("GPUS ")[1].split() for n in "abc"}
    assert seen["a"][0] == "0,1" and seen["b"][0] == "2,3" and seen["c"][0] in ("0,1", "2,3")
    assert all(s[4] == "2" for s in seen.values())  # 2 processes per run
    assert seen["a"][2] != seen["b"][2]  # a and b run together: distinct rendezvous ports
    assert "GPU 0,1" in capsys.readouterr().out


def test_cpu_slots_pin_jobs_to_their_cores_and_split_a_pair(tmp_path, monkeypatch, capsys):
    """--cpu-slots 2 on 2 cores: two jobs at a time, each pinned to its own core; with --paired
    the pair becomes --pair-part 1/2 and 2/2 of one command. torchrun is replaced by a stand-in
    that records its CPU affinity and arguments and finishes the runs."""
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {0, 1} if pid == 0 else os.sched_getaffinity(pid))
    pinned = []
    real_launch = sweep.launch

    def launch(cmd, cpus=None, **kw):
        pinned.append(cpus)
        return real_launch(cmd, **kw)  # pinning itself is the kernel's: not asserted on a test box

    def fake_torchrun(job, out, overrides, nproc, port):
        code = ("import json, sys, pathlib; print('ARGS', *sys.argv[1:]); "
                "[(pathlib.Path(d).mkdir(), (pathlib.Path(d) / 'final.json').write_text("
                "json.dumps({'completed': True}))) for d in sys.argv[1].split(',')]")
        dirs = ",".join(str(d) for d in sweep.run_dirs(job))
        return [sys.executable, "-c", code, dirs, *sweep.train_args(job, out, overrides)]

    monkeypatch.setattr(sweep, "launch", launch)
    monkeypatch.setattr(sweep, "torchrun_command", fake_torchrun)
    configs = [str(SAMPLE_CONFIGS / f"{n}.yaml") for n in ("baseline", "thin", "shallow", "grouped")]
    out = tmp_path / "paired"
    assert sweep.main(configs + ["--paired", "--cpu-slots", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on CPU cores 0" in printed and "on CPU cores 1" in printed
    assert sorted(pinned) == [[0], [1]]
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert len(logs) == 2
    part1 = next(t for n, t in logs.items() if "part1of2" in n)
    assert "--pair-part=1/2" in part1 and all(f"{out}/{n}" in part1 for n in ("baseline", "shallow"))
    assert {d.name for d in out.iterdir() if (d / "final.json").is_file()} == {"baseline", "thin", "shallow", "grouped"}
    pinned.clear()
    assert sweep.main(configs[:3] + ["--cpu-slots", "2", "--out", str(tmp_path / "single")]) == 0
    assert sorted(map(tuple, pinned)) == [(0,), (0,), (1,)] or sorted(map(tuple, pinned)) == [(0,), (1,), (1,)]
    for args, message in ((["--cpu-slots", "3"], "only 2 core(s)"), (["--cpu-slots", "2", "--gpus", "0"], "CPU sweeps"),
                          (["--cpu-slots", "0"], ">= 1"), (["--cpu-slots", "2", "--slurm"], "--slurm")):
        assert sweep.main(configs + args + ["--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_interrupted_sweep_stops_its_job_and_the_rerun_resumes_it(tmp_path, tiny_beton):
    """SIGINT to the sweep reaches the trainer as SIGTERM (last.pt, exit 124); re-running resumes."""
    train = tiny_beton("train.beton", n=64, num_classes=4, size=48)
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\n")
    out = tmp_path / "runs"
    overrides = [kv for kv in TINY if not kv.startswith(("training.epochs", "validation."))]
    overrides += ["training.epochs=20", f"data.train_dataset={train}", "data.val_dataset="]
    cmd = [sys.executable, "-m", "fastvit_reduce.cli", "sweep", str(tmp_path / "thin.yaml"), "--out", str(out)]
    cmd += [a for kv in overrides for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the first epoch is logged, then interrupt
        if "epoch 0: loss" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 124, rest
    assert "stopped by signal 15" in rest and "thin: stopped — re-run the sweep to resume" in rest
    assert (out / "thin" / "last.pt").is_file() and not sweep.is_complete(out / "thin")

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "start thin (resuming from last.pt)" in again.stdout
    assert sweep.is_complete(out / "thin")
    epochs = [json.loads(line)["epoch"] for line in open(out / "thin" / "log.jsonl")]
    assert epochs == list(range(20))  # no epoch trained twice, none missing


def test_a_signal_during_job_start_still_stops_that_job(tmp_path, monkeypatch):
    """SIGINT arriving between the slot check and Popen: the new job must get SIGTERM too."""
    monkeypatch.setattr(sweep, "torchrun_command",
                        lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "a.yaml").write_text("{}\n")
    [job] = sweep.make_jobs([str(tmp_path / "a.yaml")], tmp_path / "out")
    runner = sweep.Runner([job], tmp_path / "out", [], gpus=[], gpus_per_run=1)
    runner.stream = False
    runner.stopping = True  # as if stop() ran while _start was building the command
    runner._start(job, ([], []), set())  # a slot: (GPUs, cores)
    assert job.proc.wait(timeout=30) == -signal.SIGTERM
    job.logf.close()


def _finish_runs_stand_in(job, out, overrides, nproc, port):
    """torchrun replaced: prints its trainer arguments and writes a completed final.json per run."""
    code = ("import json, sys, pathlib; print('ARGS', *sys.argv[2:]); "
            "[(pathlib.Path(d).mkdir(parents=True), (pathlib.Path(d) / 'final.json').write_text("
            "json.dumps({'completed': True}))) for d in sys.argv[1].split(',')]")
    dirs = ",".join(str(d) for d in sweep.run_dirs(job))
    return [sys.executable, "-c", code, dirs, *sweep.train_args(job, out, overrides)]


def test_seeds_run_each_paired_group_once_per_seed_in_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "torchrun_command", _finish_runs_stand_in)
    configs = [str(SAMPLE_CONFIGS / f"{n}.yaml") for n in ("baseline", "thin")]
    out = tmp_path / "seeds"
    assert sweep.main(configs + ["--paired", "--seeds", "1,2,3", "--out", str(out)]) == 0
    for seed in (1, 2, 3):
        log = (out / "logs" / f"paired_baseline_thin_seed{seed}.log").read_text()
        assert f"--training.seed={seed}" in log and f"--logging.folder={out.resolve()}/seed_{seed}" in log
        assert {d.name for d in (out / f"seed_{seed}").iterdir()} == {"baseline", "thin"}
    capsys.readouterr()
    # unpaired: one job per config and seed, each run named after its config, in its seed's folder
    assert sweep.main(configs + ["--seeds", "0,1", "--out", str(tmp_path / "single")]) == 0
    log = (tmp_path / "single" / "logs" / "thin_seed1.log").read_text()
    assert "--logging.experiment=thin" in log and "--training.seed=1" in log
    assert (tmp_path / "single" / "seed_0" / "baseline" / "final.json").is_file()
    job = sweep.make_jobs(configs, tmp_path / "single", seeds=[0, 1])[3]  # the skip judge sees the seed
    assert job.name == "thin_seed1" and sweep.resolved_configs(job, tmp_path, [])[0]["training.seed"] == 1
    capsys.readouterr()
    for bad, message in ((["--seeds", "1,1"], "distinct"), (["--seeds", "a"], "integers"),
                         (["--seeds", "1", "--set", "training.seed=3"], "drop --set training.seed")):
        assert sweep.main(configs + bad + ["--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_cpu_slots_refuse_too_many_decode_threads_before_launching_anything(tmp_path, monkeypatch, capsys):
    """--paired --cpu-slots 2 on 2 cores with data.num_workers: 2 would fail every part after its
    start-up (numba allows one thread per 1-core part): refused up front, naming the key and the
    value that works; with data.num_workers: 0 each part is sized to its core, and says so."""
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {0, 1} if pid == 0 else os.sched_getaffinity(pid))
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    launched = []
    real_launch = sweep.launch
    monkeypatch.setattr(sweep, "launch", lambda cmd, cpus=None, **kw: launched.append(cpus) or real_launch(cmd, **kw))
    monkeypatch.setattr(sweep, "torchrun_command", _finish_runs_stand_in)
    configs = []
    for name in ("baseline", "thin", "shallow"):
        (tmp_path / f"{name}.yaml").write_text(f"base: {SAMPLE_CONFIGS / name}.yaml\ndata:\n  num_workers: 2\n")
        configs.append(str(tmp_path / f"{name}.yaml"))
    out = tmp_path / "out"
    assert sweep.main(configs + ["--paired", "--cpu-slots", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.num_workers=2") and "--cpu-slots 2 gives each job 1 core(s)" in err
    assert "--set data.num_workers=1" in err and launched == [] and not (out / "logs").exists()
    assert sweep.main(configs + ["--paired", "--cpu-slots", "2", "--set", "data.num_workers=0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("1 decode thread(s)") == 2 and sorted(launched) == [[0], [1]]
