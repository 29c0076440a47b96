"""The trainer as real processes on CPU: ``python runner.py`` (what ``python train.py`` does) or
``torchrun``: two processes in step through a two-node rendezvous, SIGTERM and kill -9 then resume.

Runs are on tiny .beton files (64 train / 24 val images, 4 classes) with timm's ``test_vit`` (embed
64, depth 6) at 32 px, 2 epochs of 8 steps, on the recipe of ``rn_configs/base.yaml``. ``runner.py``
first turns ffcv's numba compiler off: the JIT costs ~10 s per pipeline and process, pure-Python
ops on 32 px images take milliseconds (ffcv's Compiler switch); the compiled pipelines are tested in
tests/test_loaders.py and tests/e2e/test_jit_processes.py. A process costs ~5 s of imports before any work, so what needs no signal, no
second process and no fresh interpreter runs in this process (``main``, ``no_jit``): the reference
runs here, and the one-process run and the non-finite stop in tests/test_train.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SEED_AUGMENT, write_tiny_config

from fastvit_reduce.train import main

REPO = Path(__file__).resolve().parents[2]
RUNNER = """import sys
import fastvit_reduce.data.ffcv_patch  # the fast ffcv import
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)  # why: tests skip ffcv's ~10 s numba JIT per pipeline
from fastvit_reduce.train import main
sys.exit(main(sys.argv[1:]))
"""
HEAVY = SEED_AUGMENT


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    runner = d / "runner.py"
    runner.write_text(RUNNER)
    cfg = write_tiny_config(d)  # tests/conftest.py TINY_TRAIN_YAML: runs go to d / "runs"
    (d / "thin.yaml").write_text(f"base: {cfg}\nreduction: {{strategy: thin, mlp_ratio: 2.0}}\n")
    (d / "grouped.yaml").write_text(f"base: {cfg}\nreduction: {{strategy: grouped}}\nema: {{decay: 0.5}}\n")
    return SimpleNamespace(dir=d, runner=str(runner), cfg=cfg, runs=d / "runs")


def proc_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(env, *args):
    return subprocess.Popen([sys.executable, env.runner, "--config", env.cfg, *args], cwd=REPO,
                            env=proc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(path: Path, text: str, proc, after: int = 0, timeout: float = 180) -> int:
    """Wait until ``path`` has a line containing ``text`` beyond its first ``after`` lines; return
    that line's index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.is_file() else []
        for i, line in enumerate(lines[after:], after):
            if text in line:
                return i
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before logging {text!r}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail(f"no {text!r} in {path} after {timeout} s")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


def test_two_nodes_end_with_identical_weights_for_every_variant_of_a_pair(env):
    """Two torchrun launchers (one process each) meet through a c10d rendezvous on loopback, like two
    nodes, and train a pair (thin MLPs + grouped MLPs, stepping in turn on each batch) with gloo, the
    seed's augmentation, bf16 autocast, grad accumulation and progressive resizing (24 px then 32 px;
    val at 32 px, so timm's dynamic_img_size). One run for what were three tests: the rendezvous, the
    unpaired two-process run (thin) and the paired one (every variant in sync). ``--standalone
    --nproc-per-node=2`` differs for the trainer only in LOCAL_RANK (the GPU index) and
    LOCAL_WORLD_SIZE (cores per process): tests/test_runtime.py."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=fvr-test", "--local-addr=127.0.0.1"]
    args = [sys.executable, "-m", "torch.distributed.run", *launcher, env.runner, "--config", str(env.dir / "thin.yaml"),
            "--pair-with", str(env.dir / "grouped.yaml"), f"--logging.folder={env.runs / 'ddp'}",
            "--training.amp=bf16", "--training.global_batch=32", "--resolution.min_res=24",
            "--resolution.end_ramp=1", *HEAVY]
    nodes = [subprocess.Popen(args, cwd=REPO, env=proc_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    for name in ("thin", "grouped"):
        fin = final(env.runs / "ddp" / name)
        assert fin["completed"] and fin["world_size"] == 2 and fin["ranks_in_sync"] is True
        assert (fin["global_batch"], fin["accum"]) == (32, 2)  # 8 per process x 2 processes x accumulation 2
        assert [(r["epoch"], r["val_images"], r["res"]) for r in rows(env.runs / "ddp" / name)] == \
            [(0, 24, 24), (1, 24, 32)]
    fin = final(env.runs / "ddp" / "thin")
    assert fin["strategy"] == "thin" and fin["params"] < 264_260
    assert sum(o.count("thin epoch 1:") for o in outs) == 1  # only rank 0 logs


def test_sigterm_then_kill9_then_resume(env, no_jit):
    """Grouped MLPs, fp16 + GradScaler, last.pt after every update: SIGTERM → exit 124; re-run,
    kill -9 mid-epoch; re-run → finishes all epochs, each logged once, sharing intact. The two
    runs that get a signal are processes; the re-run that finishes and the reference run that is
    never stopped run here (``main``, the same code without the ~5 s process start)."""
    argv = ["--logging.experiment=preempt", "--reduction.strategy=grouped", "--training.amp=fp16",
            "--training.epochs=3", "--checkpoint.every_minutes=0.00001", "--logging.every_steps=1", *HEAVY]
    run = env.runs / "preempt"
    log = run / "train.log"

    p = start(env, *argv)
    wait_for_line(log, "saved last.pt at epoch 0 step 2", p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 124, out[-3000:]
    assert "stopped by signal" in out
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) < (3, 0) and state["updates"] >= 2

    seen = len(log.read_text().splitlines())
    p = start(env, *argv)
    resumed = wait_for_line(log, "resuming from", p, after=seen)
    wait_for_line(log, "saved last.pt at epoch 1 step 3", p, after=resumed)
    p.kill()  # SIGKILL: no chance to clean up
    p.communicate(timeout=60)

    assert main(["--config", env.cfg, *argv]) == 0
    log_rows = rows(run)
    assert [r["epoch"] for r in log_rows] == [0, 1, 2]
    fin = final(run)
    assert fin["completed"] and fin["updates"] == 3 * log_rows[0]["updates"]
    assert log.read_text().count("resuming from") == 2
    # the same command never stopped ends with the same weights: crops, augmentation and
    # drop-path are pure functions of (seed, epoch, step), and every counter was restored
    assert main(["--config", env.cfg, *argv, "--logging.experiment=unbroken"]) == 0
    assert final(env.runs / "unbroken")["weights_hash"] == fin["weights_hash"]
    state = torch.load(run / "last.pt", weights_only=True)
    for prefix, sd in (("", state["model"]), ("module.", state["ema"])):
        a, b = sd[f"{prefix}blocks.0.mlp.fc1.weight"], sd[f"{prefix}blocks.1.mlp.fc1.weight"]
        assert a.data_ptr() == b.data_ptr(), f"{prefix or 'model'}: blocks 0 and 1 no longer share an MLP"
