"""The trainer, end to end on CPU, plus its pure parts (LR schedule, checkpoints, config checks).

Runs are real processes — ``python runner.py`` (what ``python train.py`` does) or ``torchrun`` —
on tiny .beton files (64 train / 24 val images, 4 classes) with timm's ``test_vit`` (embed 64,
depth 6) at 32 px, 2 epochs of 8 steps, on the recipe of ``rn_configs/base.yaml``. ``runner.py``
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
from fastvit_reduce import checkpoint as ckpt
from fastvit_reduce.config import ConfigError
from fastvit_reduce.runs import FINAL_KEYS, RunFolder
from fastvit_reduce.data.ahead import Ahead
from fastvit_reduce.data.source import overlap_mode
from fastvit_reduce.recipe import check_resolutions, lr_at
from fastvit_reduce.runtime import StopSignal
from fastvit_reduce.train import main

REPO = Path(__file__).resolve().parent.parent
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


# ----------------------------------------------------------------------------- end to end
def test_one_process_trains_logs_and_refuses_a_changed_config(env, capsys):
    argv = ["--logging.experiment=single"]
    ok(train(env, *argv))
    run = env.runs / "single"
    log = rows(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["train_loss"] < log[0]["train_loss"]
    assert all(0 <= r["eval_top1"] <= 100 and 0 <= r["data_wait_frac"] <= 1 and r["train_img_s"] > 0 for r in log)
    # the variant's own step time: part of the epoch's training time, read at log points
    assert all(0 < r["compute_s"] < r["train_time_s"] and r["train_images"] == 64 for r in log)
    assert len((run / "summary.csv").read_text().splitlines()) == 3  # header + one row per epoch
    fin = final(run)
    assert set(FINAL_KEYS) <= set(fin) and fin["completed"] and fin["epochs"] == 2
    assert fin["params"] == 264_260 and fin["best_top_1"] == max(r["eval_top1"] for r in log)
    assert fin["train_images"] == 128 and fin["compute_s"] == pytest.approx(sum(r["compute_s"] for r in log))
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


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, yaml_text, key", [
    ([], "training:\n  epoch: 3\n", "training.epoch"),                   # unknown YAML key
    (["--training.channels_last=False"], "", "training.channels_last"),   # bool not 0/1
    (["--training.epochs=0"], "", "training.epochs"),                     # out of range
    (["--trainig.epochs=3"], "", "trainig.epochs"),                        # unknown CLI key
    (["--training.amp=fp8"], "", "training.amp"),                          # not a choice
    (["--resolution.min_res=64"], "", "resolution.min_res"),               # min_res > max_res
    (["--data.train_dataset=/nonexistent.beton"], "", "data.train_dataset"),
])
def test_bad_config_exits_2_naming_the_key(env, tmp_path, capsys, extra, yaml_text, key):
    argv = ["--config", env.cfg, f"--logging.folder={tmp_path / 'runs'}", *extra]
    if yaml_text:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "bad.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and key in err
    assert not (tmp_path / "runs").exists()  # no work done


def test_help_lists_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --nnodes=2" in out and "--training.amp='off'" in out and "--data.train_dataset=''" in out


# ----------------------------------------------------------------------------- pure parts
def test_num_classes_below_the_datasets_class_count_is_refused(tmp_path):
    from fastvit_reduce.train import check_inputs

    beton = write_beton(tmp_path / "d.beton", n=4, size=16)
    Path(f"{beton}.classes.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    cfg = {"data.train_dataset": beton, "data.val_dataset": "", "model.num_classes": 4, "training.device": "cpu",
           "resolution.min_res": 16, "resolution.max_res": 16, "resolution.start_ramp": 0,
           "resolution.end_ramp": 0, "resolution.step": 8, "training.epochs": 1}
    with pytest.raises(ConfigError, match=r"model.num_classes=4, but .* has 5 classes"):
        check_inputs(cfg)
    check_inputs({**cfg, "model.num_classes": 5})


def test_resolutions_must_be_multiples_of_the_patch_size():
    cfg = {"resolution.min_res": 24, "resolution.max_res": 40, "resolution.start_ramp": 0,
           "resolution.end_ramp": 4, "resolution.step": 8, "training.epochs": 5,
           "validation.resolution": 0, "model.img_size": 32}
    check_resolutions(cfg, (8, 8))  # 24, 32, 40 and val 32: all fit
    with pytest.raises(ConfigError, match=r"patch size is 16x16.*train resolution 24.*train resolution 40"):
        check_resolutions(cfg, (16, 16))
    with pytest.raises(ConfigError, match=r"val resolution 36 \(validation.resolution"):
        check_resolutions({**cfg, "validation.resolution": 36}, 8)


def test_lr_schedule_per_epoch_and_per_update():
    """timm's semantics (tests/test_timm_parity.py checks them against timm's scheduler itself)."""
    cfg = {"training.epochs": 10, "lr.step_on": "epoch", "lr.schedule": "cosine", "lr.warmup_epochs": 2,
           "lr.warmup_lr": 1e-5, "lr.min_lr": 1e-6, "lr.warmup_prefix": 0, "lr.cooldown_epochs": 0,
           "lr.cycle_mul": 1.0, "lr.cycle_decay": 0.5, "lr.cycle_limit": 1, "lr.k_decay": 1.0}
    assert lr_at(cfg, 1e-3, 0, 0, 4) == lr_at(cfg, 1e-3, 0, 3, 4) == 1e-5  # the whole epoch 0
    assert lr_at(cfg, 1e-3, 1, 0, 4) == pytest.approx((1e-5 + 1e-3) / 2)
    assert lr_at(cfg, 1e-3, 5, 2, 4) == pytest.approx((1e-3 + 1e-6) / 2)  # the cosine counts the warm-up
    upd = {**cfg, "lr.step_on": "update"}
    assert lr_at(upd, 1e-3, 0, 0, 4) == 1e-5 and lr_at(upd, 1e-3, 0, 2, 4) == pytest.approx(1e-5 + 2 * (1e-3 - 1e-5) / 8)
    steps = [lr_at(upd, 1e-3, e, u, 4) for e in range(2, 10) for u in range(4)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert lr_at({**cfg, "lr.schedule": "constant", "lr.warmup_epochs": 0}, 1e-3, 7, 0, 4) == 1e-3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_is_remembered_not_fatal(sig):
    before = signal.getsignal(sig)
    stop = StopSignal()
    try:
        os.kill(os.getpid(), sig)
        assert stop.received == sig
    finally:
        stop.restore()
    assert signal.getsignal(sig) is before


def test_checkpoint_roundtrip_keeps_shared_tensors(tmp_path):
    w = torch.randn(3, 3)
    state = {"format": 2, "epoch": 0, "model": {"a": w, "b": w}, "n": 1, "t": (1, "x", None)}
    ckpt.save(state, tmp_path / "c.pt")
    back = ckpt.load(tmp_path / "c.pt")
    assert back["model"]["a"].data_ptr() == back["model"]["b"].data_ptr() and back["t"] == (1, "x", None)
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]  # no temp file left


def test_checkpoint_refuses_non_plain_values_and_pickles(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"state\['cfg'\] is a pathlib"):
        ckpt.save({"cfg": tmp_path}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    torch.save({"format": 2, "model": SimpleNamespace(a=1), "epoch": 0}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="unsafe pickle: refused"):
        ckpt.load(tmp_path / "evil.pt")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save({"format": 2, "model": {}, "epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous last.pt is intact"):
        ckpt.save({"format": 2, "model": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_read_rows_skips_torn_lines(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    assert RunFolder(tmp_path).read_rows() == [{"epoch": 0}, {"epoch": 1}]
    assert RunFolder(tmp_path / "missing").read_rows() == []


def test_optimizer_has_no_weight_decay_on_1d_params_pos_embed_and_cls_token():
    from fastvit_reduce.models import create_model
    from fastvit_reduce.trainer import Variant

    model = create_model("test_vit", strategy="grouped", num_classes=4, img_size=32, patch_size=8)
    cfg = {"optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.fused": 1}
    opt = Variant.build_optimizer(SimpleNamespace(cfg=cfg, model=model, plan={"peak_lr": 1e-3}))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(p.ndim > 1 for n, p in model.named_parameters() if n in decayed)
    assert {"pos_embed", "cls_token"} <= set(names.values()) and not decayed & {"pos_embed", "cls_token"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)  # shared MLP tensors once


def test_batch_ahead_thread_runs_torch_on_one_thread():
    """The stepping thread's OpenMP team must stay the only one (loaders.one_torch_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ahead = Ahead(lambda: (torch.get_num_threads() for _ in range(3)))
        seen = list(ahead)
        ahead.close()
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_overlap_none_needs_a_source_that_can_take_turns():
    assert overlap_mode("none", True) == "none" and overlap_mode("ahead", False) == "ahead"
    with pytest.raises(ConfigError, match="overlap=none"):
        overlap_mode("none", False)  # timm's loader (bench e2e) cannot
