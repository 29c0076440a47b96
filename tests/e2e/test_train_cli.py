"""The trainer as real processes, end to end on CPU: ``python runner.py`` (what ``python train.py``
does) or ``torchrun``.

Runs are on tiny .beton files (64 train / 24 val images, 4 classes) with timm's ``test_vit`` (embed
64, depth 6) at 32 px, 2 epochs of 8 steps, on the recipe of ``rn_configs/base.yaml``. ``runner.py``
first turns ffcv's numba compiler off: the JIT costs ~10 s per pipeline and process, pure-Python
ops on 32 px images take milliseconds (ffcv's Compiler switch); the compiled pipelines are tested in
test_loaders.py. Several checks share one run to keep the file at a few processes.
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

from conftest import SEED_AUGMENT, TINY_TRAIN_YAML, write_beton
from fastvit_reduce.runs import FINAL_KEYS
from fastvit_reduce.train import main

REPO = Path(__file__).resolve().parents[2]
RUNNER = """import sys
import fastvit_reduce.data.ffcv_patch  # the fast ffcv import
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)  # why: tests skip ffcv's ~10 s numba JIT per pipeline
from fastvit_reduce.train import main
sys.exit(main(sys.argv[1:]))
"""


TINY = TINY_TRAIN_YAML


HEAVY = SEED_AUGMENT


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    runner = d / "runner.py"
    runner.write_text(RUNNER)
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY.format(base=REPO / "rn_configs" / "base.yaml", runs=d / "runs",
                               train=write_beton(d / "train.beton", n=64, size=40),
                               val=write_beton(d / "val.beton", n=24, size=40, seed=1)))
    return SimpleNamespace(dir=d, runner=str(runner), cfg=str(cfg), runs=d / "runs")


def proc_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(env, *args, torchrun=(), **kw):
    """Run the trainer to its end; return the CompletedProcess (output captured)."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable])
    return subprocess.run([*cmd, env.runner, "--config", env.cfg, *args], cwd=REPO, env=proc_env(),
                          capture_output=True, text=True, timeout=300, **kw)


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


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_one_process_trains_logs_and_refuses_a_changed_config(env, capsys):
    argv = ["--logging.experiment=single"]
    ok(train(env, *argv))
    run = env.runs / "single"
    log = rows(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["train_loss"] < log[0]["train_loss"]
    assert all(0 <= r["eval_top1"] <= 100 and 0 <= r["data_wait_frac"] <= 1 and r["train_img_s"] > 0 for r in log)
    assert len((run / "summary.csv").read_text().splitlines()) == 3  # header + one row per epoch
    fin = final(run)
    assert set(FINAL_KEYS) <= set(fin) and fin["completed"] and fin["epochs"] == 2
    assert fin["params"] == 264_260 and fin["best_top_1"] == max(r["eval_top1"] for r in log)
    # EMA on: the headline is the EMA's top-1 (as timm), the raw model's sits beside it
    assert fin["headline"] == "ema" and fin["final_ema_top_1"] == log[-1]["ema_top_1"] == fin["top_1"]
    assert fin["raw_final_top_1"] == log[-1]["raw_top_1"] is not None
    assert (run / "summary.csv").read_text().startswith("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,")
    params = json.loads((run / "params.json").read_text())
    assert set(params["versions"]) == {"python", "torch", "timm", "ffcv", "numpy"}
    assert params["git"]["revision"] and params["world_size"] == 1 and "--logging.experiment=single" in params["argv"]
    assert params["config"]["training.epochs"] == 2 and params["config"]["model.arch"] == "test_vit"
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["updates"]) == (2, 0, 16)
    assert torch.load(run / "best.pt", weights_only=True)["top_1"] == fin["best_top_1"]
    assert "epoch 1:" in (run / "train.log").read_text()
    assert f"numba cache of the ffcv pipelines: {os.environ['FASTVIT_REDUCE_JIT_CACHE']}" in (run / "train.log").read_text()
    assert set(fin["jit_cache"]) == {"loaded", "compiled"}

    # re-running a finished run is a no-op; a harmless change is fine; a real change is refused
    before = (run / "log.jsonl").read_text()
    assert main(["--config", env.cfg, *argv, "--data.num_workers=2", "--logging.progress=1"]) == 0
    assert (run / "log.jsonl").read_text() == before
    capsys.readouterr()
    assert main(["--config", env.cfg, *argv, "--training.epochs=3", "--optim.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "training.epochs: 2 -> 3" in err and "optim.lr" in err


def test_two_processes_end_with_identical_weights(env):
    """torchrun, gloo: thin MLPs, the seed's augmentation, bf16 autocast, grad accumulation,
    progressive resizing (24 px then 32 px; val at 32 px, so timm's dynamic_img_size)."""
    result = ok(train(env, "--logging.experiment=ddp", "--reduction.strategy=thin",
                      "--reduction.mlp_ratio=2.0", "--training.amp=bf16", "--training.global_batch=32",
                      "--resolution.min_res=24", "--resolution.end_ramp=1",
                      *HEAVY, torchrun=["--standalone", "--nproc-per-node=2"]))
    fin = final(env.runs / "ddp")
    assert fin["completed"] and fin["world_size"] == 2 and fin["ranks_in_sync"] is True
    assert (fin["global_batch"], fin["accum"]) == (32, 2)  # 8 per process x 2 processes x accumulation 2
    assert fin["strategy"] == "thin" and fin["params"] < 264_260
    assert [(r["epoch"], r["val_images"], r["res"]) for r in rows(env.runs / "ddp")] == [(0, 24, 24), (1, 24, 32)]
    assert result.stdout.count("epoch 1:") == 1  # only rank 0 logs


def test_two_node_rendezvous_on_loopback(env):
    """Two torchrun launchers (one process each) meet through a c10d rendezvous, like two nodes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=fvr-test", "--local-addr=127.0.0.1"]
    args = [sys.executable, "-m", "torch.distributed.run", *launcher, env.runner, "--config", env.cfg,
            "--logging.experiment=nodes", "--reduction.strategy=shallow", "--training.epochs=1"]
    nodes = [subprocess.Popen(args, cwd=REPO, env=proc_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    fin = final(env.runs / "nodes")
    assert fin["completed"] and fin["world_size"] == 2 and fin["ranks_in_sync"] is True
    assert fin["strategy"] == "shallow"


def test_sigterm_then_kill9_then_resume(env):
    """Grouped MLPs, fp16 + GradScaler, last.pt after every update: SIGTERM → exit 124; re-run,
    kill -9 mid-epoch; re-run → finishes all epochs, each logged once, sharing intact."""
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

    ok(train(env, *argv))
    log_rows = rows(run)
    assert [r["epoch"] for r in log_rows] == [0, 1, 2]
    fin = final(run)
    assert fin["completed"] and fin["updates"] == 3 * log_rows[0]["updates"]
    assert log.read_text().count("resuming from") == 2
    # the same command never stopped ends with the same weights: crops, augmentation and
    # drop-path are pure functions of (seed, epoch, step), and every counter was restored
    ok(train(env, *argv, "--logging.experiment=unbroken"))
    assert final(env.runs / "unbroken")["weights_hash"] == fin["weights_hash"]
    state = torch.load(run / "last.pt", weights_only=True)
    for prefix, sd in (("", state["model"]), ("module.", state["ema"])):
        a, b = sd[f"{prefix}blocks.0.mlp.fc1.weight"], sd[f"{prefix}blocks.1.mlp.fc1.weight"]
        assert a.data_ptr() == b.data_ptr(), f"{prefix or 'model'}: blocks 0 and 1 no longer share an MLP"


def test_nonfinite_loss_stops_and_keeps_a_finite_checkpoint(env):
    result = train(env, "--logging.experiment=nan", "--optim.lr=1e30", "--lr.warmup_epochs=0",
                   "--training.max_nonfinite=2", "--logging.every_steps=1")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "non-finite loss for 2 consecutive updates" in result.stderr
    assert final(env.runs / "nan")["exit_reason"].startswith("non-finite loss")
    state = torch.load(env.runs / "nan" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
