"""fastvit_reduce.sweep: arguments, GPU slots and CPU slots (torchrun replaced by a stand-in), a
signal during a job's start, control characters. Real CPU sweeps (torchrun + the trainer):
tests/e2e/test_sweep_cli.py; Slurm scripts: tests/test_slurm.py."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from fastvit_reduce import sweep

SAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "rn_configs" / "sample"
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

    monkeypatch.setattr(sweep, "launch", launch)
    monkeypatch.setattr(sweep, "torchrun_command", _finish_runs_stand_in)
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
    """torchrun replaced: prints its run folders and trainer arguments, and writes a completed
    final.json per run."""
    code = ("import json, sys, pathlib; print('ARGS', *sys.argv[1:]); "
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


@pytest.mark.parametrize("flag", ["--set", "--sbatch-arg", "--time", "--out"])
def test_sweep_refuses_control_characters_in_flags(tmp_path, capsys, flag):
    (tmp_path / "a.yaml").write_text("{}\n")
    value = {"--set": "training.epochs=1\ntouch X", "--sbatch-arg": "--partition=gpu\ntouch X",
             "--time": "1:00:00\ntouch X", "--out": str(tmp_path / "o\ntouch X")}[flag]
    args = [str(tmp_path / "a.yaml"), "--slurm", flag, value]
    if flag != "--out":
        args += ["--out", str(tmp_path / "o")]
    assert sweep.main(args) == 2
    assert "control character" in capsys.readouterr().err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
