"""The training loop: one process per GPU, configured by fastargs YAML files.

    python train.py --config rn_configs/thin.yaml                      # 1 process (1 GPU, or CPU)
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml
    # two nodes x 2 GPUs: run this on each node (MASTER = node 0's address, any free port):
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=$MASTER:29500 \\
        --rdzv-id=thin_vit_b16 train.py --config rn_configs/thin.yaml --logging.folder=/shared/runs

Overrides: ``--section.key=value`` (``--training.epochs=100``); later ``--config`` files override
earlier ones and a YAML may say ``base: other.yaml``. Unknown keys, flags not written 0/1 and
out-of-range values stop the run before any work (exit 2, the key named).

Run folder ``<logging.folder>/<logging.experiment>/`` (experiment '' = the strategy's name):
``params.json`` (resolved config, versions, git revision, command line, world size),
``log.jsonl`` + ``summary.csv`` (one row per epoch), ``final.json`` (rewritten after every epoch;
``completed`` is true once all epochs are done), ``train.log``, ``last.pt``, ``best.pt``.

Never losing work:
* ``last.pt`` (full state: model, EMA, optimizer, GradScaler, epoch / step / update counters,
  every rank's RNG states, config) is written atomically at each epoch end, every
  ``checkpoint.every_minutes`` at an update boundary, and on SIGTERM/SIGUSR1 (the ranks agree
  on stopping after the current update; exit code 124). ``best.pt`` (weights only) on a new
  best top-1. Multi-node: ``logging.folder`` must be on a filesystem every node sees.
* Re-running the same command resumes from ``last.pt``: the same batch order (``set_epoch``)
  with the batches already trained skipped, the LR schedule continuing, no epoch logged twice.
  A finished run re-run is a no-op (exit 0). The config must equal the checkpoint's except for
  ``HARMLESS`` keys (logging, checkpointing, loader tuning, dataset paths — a node may copy the
  data to its local disk —, eval frequency, compile); ``training.epochs`` is *not* harmless
  (the cosine schedule depends on it) and neither is the number of processes.
* Signals under torchrun: the launcher forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers
  (SIGUSR1 too if ``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists it) and SIGKILLs them ~30 s later,
  so saving ``last.pt`` must fit in that grace period; torchrun's own exit code is then not 124.
* Same order is not same pixels: ffcv 1.0.2 does not seed its random crops per batch, so a
  resumed run trains on the same images in the same batches, but not bit-identically.
* ``training.max_nonfinite`` consecutive updates with a non-finite loss (on any rank) stop the
  run (exit 1); such updates are skipped, so the last checkpoint holds good weights.
  fp16 steps skipped by the GradScaler (finite loss, overflowing gradients) are normal.

``data_wait_frac`` = (host time blocked in ``next(loader)``) / (host time per step). On CUDA every
step ends with ``torch.cuda.synchronize()``, so the device is idle while the host waits for the
next batch: the wait is time the GPU lost to data loading, not overlap.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from fastargs import Param, Section
from timm.data import resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .augment.batch import augment_from_config, normalize
from .config import (Bool01, Choice, ConfigError, FloatList, Number, declared_keys, dump_json,
                     load_config, resolved)
from .data.loaders import (check_beton, check_datasets, create_train_loader, create_val_loader,
                           get_resolution, read_classes, set_epoch, set_train_resolution)
from .ema import ModelEma
from .models import gflops, mlp_stats, model_from_config
from .strategies import StrategyError

Section("training", "the training loop").params(
    epochs=Param(Number(int, 1), "number of epochs", default=300),
    batch_size=Param(Number(int, 1), "images per process (per GPU) per micro-batch", default=256),
    grad_accum_steps=Param(Number(int, 1), "micro-batches per optimizer update", default=1),
    amp=Param(Choice("off", "fp16", "bf16"), "autocast dtype (fp16 uses a GradScaler)", default="off"),
    channels_last=Param(Bool01(), "NHWC images and conv weights", default=1),
    compile=Param(Bool01(), "torch.compile the model", default=0),
    label_smoothing=Param(Number(float, 0, 1, hi_open=True), "label smoothing (folded into "
                          "mixup's soft targets when mixup/cutmix is on)", default=0.1),
    clip_grad=Param(Number(float, 0), "max gradient norm (0 = no clipping)", default=0.0),
    seed=Param(Number(int, 0), "seed of model init, data order and augmentation", default=42),
    device=Param(Choice("auto", "cpu", "cuda"), "auto = cuda when available", default="auto"),
    max_nonfinite=Param(Number(int, 1), "stop after this many consecutive updates with a "
                        "non-finite loss", default=5),
)
Section("optim", "AdamW (torch; fused kernel when the device supports it)").params(
    lr=Param(Number(float, 0, lo_open=True), "peak learning rate (before lr.scale)", default=1e-3),
    weight_decay=Param(Number(float, 0), "decoupled weight decay (not on 1-D params, pos_embed, "
                       "cls_token)", default=0.05),
    betas=Param(FloatList(2), "AdamW betas", default=[0.9, 0.999]),
    eps=Param(Number(float, 0, lo_open=True), "AdamW eps", default=1e-8),
    fused=Param(Bool01(), "use torch's fused AdamW (falls back to foreach if unsupported)", default=1),
)
Section("lr", "per-update schedule: linear warm-up, then cosine").params(
    schedule=Param(Choice("cosine", "constant"), "shape after warm-up", default="cosine"),
    warmup_epochs=Param(Number(float, 0), "epochs of linear warm-up from warmup_lr", default=5.0),
    warmup_lr=Param(Number(float, 0), "learning rate at the first update", default=1e-5),
    min_lr=Param(Number(float, 0), "learning rate at the end of the cosine", default=0.0),
    scale=Param(Choice("none", "linear"), "linear: peak = optim.lr * global batch / base_batch "
                "(DeiT's rule)", default="none"),
    base_batch=Param(Number(int, 1), "global batch size at which optim.lr applies (lr.scale=linear)",
                     default=512),
)
Section("ema", "exponential moving average of the weights (sharing-safe)").params(
    decay=Param(Number(float, 0, 1, hi_open=True), "EMA decay per EMA update (0 = no EMA)", default=0.0),
    every=Param(Number(int, 1), "optimizer updates between EMA updates", default=1),
    eval=Param(Bool01(), "evaluate the EMA model alongside the model", default=1),
)
Section("validation", "top-1/top-5 on data.val_dataset").params(
    batch_size=Param(Number(int, 1), "images per process", default=256),
    every_n_epochs=Param(Number(int, 1), "evaluate every N epochs (and always after the last)", default=1),
    resolution=Param(Number(int, 0), "val resolution in px (0 = model.img_size)", default=0),
)
Section("logging", "where results go").params(
    folder=Param(str, "parent folder of run folders", default="runs"),
    experiment=Param(str, "run folder name ('' = reduction.strategy)", default=""),
    progress=Param(Bool01(), "tqdm progress bars on rank 0", default=1),
)
Section("checkpoint", "last.pt / best.pt").params(
    every_minutes=Param(Number(float, 0), "also write last.pt every N minutes mid-epoch (0 = only "
                        "at epoch ends)", default=0.0),
    save_best=Param(Bool01(), "write best.pt (weights) on a new best top-1", default=1),
)

SECTIONS = ["data", "resolution", "augment", "model", "reduction", "training", "optim", "lr", "ema",
            "validation", "logging", "checkpoint"]
HARMLESS = ("logging.", "checkpoint.", "data.num_workers", "data.in_memory", "data.batches_ahead",
            "data.train_dataset", "data.val_dataset", "validation.every_n_epochs",
            "validation.batch_size", "training.compile")
LOG_KEYS = ["epoch", "train_loss", "top_1", "top_5", "ema_top_1", "ema_top_5", "val_images", "lr", "res",
            "updates", "epoch_time_s", "train_time_s", "train_img_s", "data_wait_frac", "peak_mem_mb"]
FINAL_KEYS = ["experiment", "strategy", "arch", "img_size", "epochs", "params", "mlp_params", "gflops",
              "best_top_1", "final_top_1", "best_ema_top_1", "final_ema_top_1", "total_time_s",
              "train_img_s", "data_wait_frac", "completed"]  # what sweep/report read
EXIT_OK, EXIT_CRASH, EXIT_USER, EXIT_PREEMPTED = 0, 1, 2, 124
log = logging.getLogger("fastvit_reduce")


class NonFiniteLoss(RuntimeError):
    """The loss was NaN/inf for ``training.max_nonfinite`` consecutive updates."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; ``last.pt`` has been written."""


def is_harmless(key: str) -> bool:
    """Keys that may differ between a checkpoint and the run resuming it."""
    return key.startswith(HARMLESS)


def lr_at(progress: float, *, peak: float, epochs: int, warmup_epochs: float, warmup_lr: float,
          min_lr: float, schedule: str = "cosine") -> float:
    """Learning rate after ``progress`` epochs (a float: updates count as fractions of an epoch).

    Linear from ``warmup_lr`` to ``peak`` over ``warmup_epochs``, then cosine down to ``min_lr``
    at ``epochs`` (or constant). Why not timm's scheduler: a pure function of progress needs no
    state of its own to survive a resume.
    """
    if progress < warmup_epochs:
        return warmup_lr + (peak - warmup_lr) * progress / warmup_epochs
    if schedule == "constant" or epochs <= warmup_epochs:
        return peak
    t = min(1.0, (progress - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t))


def train_res(cfg: dict, epoch: int) -> int:
    """Train resolution of ``epoch`` (px) under the ``resolution.*`` schedule."""
    return get_resolution(epoch, cfg["resolution.min_res"], cfg["resolution.max_res"],
                          cfg["resolution.start_ramp"], cfg["resolution.end_ramp"], cfg["resolution.step"])


# ----------------------------------------------------------------------------- small helpers
class Dist:
    """Rank, world size and device of this process (torchrun env:// or a single process)."""

    def __init__(self, device_choice: str):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if use_cuda:
            # why before the loaders: ffcv creates its CUDA streams on the current device
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        if self.world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                    device_id=self.device if use_cuda else None)
        self.main = self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce (sum) a few numbers across ranks; identity with one process."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sync(self) -> None:
        """Wait for queued device work (CUDA), so host clocks measure finished work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (cluster preemption) until the loop reaches an update boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def setup_logging(folder: Path | None) -> None:
    """Rank 0: INFO to stdout and ``train.log``; other ranks (folder None): errors only."""
    close_logging()
    log.propagate = False  # why: an embedding app's root handlers would print every line twice
    log.setLevel(logging.INFO if folder else logging.ERROR)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if folder:
        handlers.append(logging.FileHandler(folder / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def close_logging() -> None:
    """Undo ``setup_logging`` (main() may run more than once in one process, e.g. in tests)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate, log.level = True, logging.NOTSET


def run_info(cfg: dict, argv: list[str], world: int) -> dict:
    """What ``params.json`` records: config, versions, git revision, command line."""
    import ffcv

    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"config": cfg, "argv": [sys.executable, *sys.argv[:1], *argv], "world_size": world,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "timm": timm.__version__, "ffcv": getattr(ffcv, "__version__", "?"),
                         "numpy": np.__version__},
            "git": {"revision": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
            "host": platform.node()}


def read_rows(path: Path, before_epoch: int) -> list[dict]:
    """Rows of ``log.jsonl`` for epochs < ``before_epoch`` (drops rows a resume will redo and a
    line torn by kill -9)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < before_epoch:
                rows.append(row)
    return rows


def write_rows(folder: Path, rows: list[dict]) -> None:
    """Rewrite ``log.jsonl`` and ``summary.csv`` from ``rows`` (both atomically)."""
    for name, text in (("log.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), ("summary.csv", None)):
        tmp = folder / f".{name}.tmp"
        with open(tmp, "w", newline="") as f:
            if text is not None:
                f.write(text)
            else:
                writer = csv.DictWriter(f, fieldnames=LOG_KEYS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        tmp.replace(folder / name)


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything from the resolved config ``cfg``, then ``run()`` trains."""

    def __init__(self, cfg: dict, argv: list[str]):
        self.cfg, self.t_start = cfg, time.monotonic()
        self.d = d = Dist(cfg["training.device"])
        self.folder = Path(cfg["logging.folder"]) / (cfg["logging.experiment"] or cfg["reduction.strategy"])
        if d.main:
            self.folder.mkdir(parents=True, exist_ok=True)
        setup_logging(self.folder if d.main else None)
        self.last_pt, self.best_pt = self.folder / "last.pt", self.folder / "best.pt"
        self.state = self.find_resume_state()
        if self.state is not None and self.state["epoch"] >= cfg["training.epochs"]:
            self.complete = True
            return
        self.complete = False
        if d.main:
            info = run_info(cfg, argv, d.world)
            info["resumed_from"] = None if self.state is None else {
                "epoch": self.state["epoch"], "step_in_epoch": self.state["step_in_epoch"]}
            dump_json(info, self.folder / "params.json")

        # model: the same init on every rank (DDP would broadcast rank 0's anyway)
        seed_all(cfg["training.seed"])
        img = cfg["model.img_size"]
        self.val_res = cfg["validation.resolution"] or img
        dynamic = {cfg["resolution.min_res"], cfg["resolution.max_res"], self.val_res} != {img}
        model = model_from_config(dynamic_img_size=dynamic)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if dynamic and patch:
            check_resolutions(cfg, patch)
        stats = mlp_stats(model)
        self.model_stats = {"params": stats["params"], "mlp_params": stats["mlp_params"],
                            "gflops": round(gflops(model, img), 4)}
        data_cfg = resolve_data_config({}, model=model)  # timm: the arch's mean/std/crop_pct
        self.mean, self.std = data_cfg["mean"], data_cfg["std"]
        self.crop_pct = cfg["data.crop_pct"] or data_cfg["crop_pct"]
        log.info(f"model {cfg['model.arch']} ({cfg['reduction.strategy']}): "
                 f"{self.model_stats['params']:,} params, {stats['mlp_params']:,} in "
                 f"{stats['unique_mlps']} MLPs (hidden {stats['mlp_hidden']}), "
                 f"{self.model_stats['gflops']:.3f} GFLOPs/img at {img}px")
        model.to(d.device)
        if cfg["training.channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model

        # optimizer, AMP, loss
        self.global_batch = cfg["training.batch_size"] * cfg["training.grad_accum_steps"] * d.world
        self.peak_lr = cfg["optim.lr"] * (self.global_batch / cfg["lr.base_batch"]
                                          if cfg["lr.scale"] == "linear" else 1.0)
        self.optimizer = self.build_optimizer()
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["training.amp"])
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg["training.amp"] == "fp16")
        dtype = self.amp_dtype or torch.float32
        self.augment = augment_from_config(cfg["model.num_classes"], self.mean, self.std,
                                           cfg["training.label_smoothing"], d.device, dtype)
        self.criterion = (SoftTargetCrossEntropy() if self.augment.soft_targets
                          else nn.CrossEntropyLoss(label_smoothing=cfg["training.label_smoothing"]))
        self.updates, self.start_epoch, self.skip, self.carry, self.nonfinite = 0, 0, 0, {}, 0
        self.elapsed_before, self.best = 0.0, None  # best = best top-1 so far (%)
        if self.state is not None:
            self.restore(self.state)

        # wrappers: DDP for gradients, torch.compile for speed, EMA of the plain model
        self.ddp = (DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda"
                                            else None) if d.world > 1 else None)
        self.train_model = self.ddp or model
        if cfg["training.compile"]:
            self.train_model = torch.compile(self.train_model)
        self.ema = ModelEma(model, cfg["ema.decay"]) if cfg["ema.decay"] > 0 else None
        if self.ema is not None and self.state is not None:
            self.ema.load_state_dict(self.state["ema"])
        seed_all(cfg["training.seed"] + 1000 * d.rank + self.start_epoch)
        if self.state is not None:
            ckpt.set_rng_state(self.state["rng"][d.rank])
        self.state = None  # free the checkpoint's host memory

        # loaders (C's ffcv pipelines) — after set_device and init_process_group
        res0 = train_res(cfg, self.start_epoch)
        self.train_loader = create_train_loader(
            cfg["data.train_dataset"], cfg["training.batch_size"], d.device, res=res0,
            num_workers=cfg["data.num_workers"], in_memory=cfg["data.in_memory"],
            batches_ahead=cfg["data.batches_ahead"], drop_last=cfg["data.drop_last"],
            order=cfg["data.order"], aug_repeats=cfg["augment.aug_repeats"], seed=cfg["training.seed"],
            distributed=d.world > 1, rrc_scale=cfg["data.rrc_scale"], rrc_ratio=cfg["data.rrc_ratio"],
            hflip=cfg["data.hflip"], channels_last=cfg["training.channels_last"])
        if len(self.train_loader) == 0:
            raise ConfigError(f"data.train_dataset: {cfg['data.train_dataset']} gives no full batch of "
                              f"training.batch_size={cfg['training.batch_size']} per process")
        self.val_loader = None
        if cfg["data.val_dataset"]:
            self.val_loader = create_val_loader(
                cfg["data.val_dataset"], cfg["validation.batch_size"], d.device, res=self.val_res,
                crop_pct=self.crop_pct, num_workers=cfg["data.num_workers"],
                in_memory=cfg["data.in_memory"], distributed=d.world > 1,
                channels_last=cfg["training.channels_last"])
        self.stop = StopSignal()
        self.last_save = time.monotonic()

    # --------------------------------------------------------------------- construction parts
    def find_resume_state(self) -> dict | None:
        """``last.pt`` if every rank sees it; refuse it when the config differs."""
        have = self.last_pt.is_file()
        seen = self.d.sum([float(have)])[0]
        if seen not in (0, self.d.world):
            raise ConfigError(f"{self.last_pt} is visible on {int(seen)} of {self.d.world} processes: "
                              "logging.folder must be on a filesystem shared by all nodes")
        if not have:
            return None
        state = ckpt.load(self.last_pt)
        diff = ckpt.config_diff(state["config"], self.cfg, is_harmless)
        if state["world_size"] != self.d.world:
            diff.append(f"number of processes: {state['world_size']} -> {self.d.world}")
        if diff:
            raise ConfigError(f"{self.last_pt} was written with a different configuration; use another "
                              "logging.experiment or restore these settings:\n  " + "\n  ".join(diff))
        for key in ("data.train_dataset", "data.val_dataset"):
            if state["config"].get(key) != self.cfg[key]:
                log.info(f"note: {key} moved since the checkpoint: {state['config'].get(key)} -> {self.cfg[key]}")
        return state

    def build_optimizer(self) -> torch.optim.Optimizer:
        """timm's AdamW param groups (no decay on 1-D params and ``no_weight_decay()`` names)."""
        cfg = self.cfg
        kwargs = dict(lr=self.peak_lr, weight_decay=cfg["optim.weight_decay"],
                      betas=tuple(cfg["optim.betas"]), eps=cfg["optim.eps"])
        if cfg["optim.fused"]:
            try:
                return create_optimizer_v2(self.model, "adamw", fused=True, **kwargs)
            except (RuntimeError, ValueError) as e:
                log.info(f"fused AdamW unavailable here ({e}); using foreach")
        return create_optimizer_v2(self.model, "adamw", foreach=True, **kwargs)

    def restore(self, state: dict) -> None:
        """Load model / optimizer / scaler / counters from a ``last.pt`` state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.updates, self.start_epoch, self.skip = state["updates"], state["epoch"], state["step_in_epoch"]
        self.carry = state["epoch_stats"] if self.skip else {}
        self.elapsed_before, self.best = state["elapsed_s"], state["best"]
        log.info(f"resuming from {self.last_pt}: epoch {self.start_epoch}, step {self.skip}, "
                 f"update {self.updates}")

    def lr(self, progress: float) -> float:
        c = self.cfg
        return lr_at(progress, peak=self.peak_lr, epochs=c["training.epochs"],
                     warmup_epochs=c["lr.warmup_epochs"], warmup_lr=c["lr.warmup_lr"],
                     min_lr=c["lr.min_lr"], schedule=c["lr.schedule"])

    # --------------------------------------------------------------------- the run
    def run(self) -> int:
        """Train the remaining epochs; return the exit code."""
        cfg, d = self.cfg, self.d
        if self.complete:
            log.info(f"{self.folder} is already complete ({cfg['training.epochs']} epochs); nothing to do")
            if d.main and self.state.get("final"):  # why: kill -9 may have hit between last.pt and final.json
                dump_json(self.state["final"], self.folder / "final.json")
            return EXIT_OK
        self.rows = read_rows(self.folder / "log.jsonl", self.start_epoch) if d.main else []
        if d.main:
            write_rows(self.folder, self.rows)
        log.info(f"training epochs {self.start_epoch}..{cfg['training.epochs'] - 1} on {d.world} x "
                 f"{d.device.type}, global batch {self.global_batch}, peak lr {self.peak_lr:g}, "
                 f"folder {self.folder}")
        try:
            for epoch in range(self.start_epoch, cfg["training.epochs"]):
                train = self.train_epoch(epoch)
                last = epoch + 1 == cfg["training.epochs"]
                t_eval = time.monotonic()
                metrics = (self.evaluate() if self.val_loader is not None and
                           ((epoch + 1) % cfg["validation.every_n_epochs"] == 0 or last) else {})
                self.end_epoch(epoch, train, metrics, eval_s=time.monotonic() - t_eval)
                if not last and d.sum([float(self.stop.received is not None)])[0]:
                    raise Preempted
        except Preempted:
            log.info(f"stopped by signal {self.stop.received}; {self.last_pt} holds the state, "
                     f"re-run the same command to resume")
            return EXIT_PREEMPTED
        finally:
            self.stop.restore()
        log.info(f"done: {cfg['training.epochs']} epochs, {self.elapsed():.0f} s in total; "
                 f"results in {self.folder / 'final.json'}")
        return EXIT_OK

    def train_epoch(self, epoch: int) -> dict:
        """One epoch (or its rest, after a mid-epoch resume); returns its sums for the log row."""
        cfg, d = self.cfg, self.d
        accum = cfg["training.grad_accum_steps"]
        set_train_resolution(self.train_loader, train_res(cfg, epoch))
        set_epoch(self.train_loader, epoch)  # same order on every rank and on resume
        n = len(self.train_loader)
        skip, self.skip = self.skip, 0
        s = {"loss_sum": 0.0, "loss_n": 0, "images": 0, "wait_s": 0.0, "step_s": 0.0, "wall_s": 0.0}
        s.update(self.carry)  # the part of this epoch trained before a mid-epoch stop
        self.carry = {}
        t_begin = time.monotonic() - s["wall_s"]
        self.model.train()
        it = iter(self.train_loader)
        for _ in range(skip):  # why: resume mid-epoch — these batches were trained before the stop
            next(it)
        bar = tqdm(total=n, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not (d.main and cfg["logging.progress"]))
        group_loss_bad = 0
        for i in range(skip, n):
            t0 = time.perf_counter()
            images, labels = next(it)
            t1 = time.perf_counter()
            group_start = i - i % accum
            group = min(accum, n - group_start)  # a short last group at the epoch end
            update = i + 1 == group_start + group
            x, y = self.augment(images, labels)
            if cfg["training.channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            sync_ctx = self.ddp.no_sync() if self.ddp is not None and not update else contextlib.nullcontext()
            with sync_ctx:
                with torch.autocast(d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.train_model(x), y)
                self.scaler.scale(loss / group).backward()
            loss_value = loss.item()
            if math.isfinite(loss_value):
                s["loss_sum"] += loss_value
                s["loss_n"] += 1
            else:
                group_loss_bad += 1
            lr = self.lr(epoch + (i + 1) / n)
            if update:
                self.optimizer_step(lr, group_loss_bad)
                group_loss_bad = 0
            d.sync()
            t2 = time.perf_counter()
            s["wait_s"] += t1 - t0
            s["step_s"] += t2 - t0
            s["images"] += len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", refresh=False,
                            img_s=f"{s['images'] * d.world / max(s['step_s'], 1e-9):.0f}")
            if update and i + 1 < n:
                s["wall_s"] = time.monotonic() - t_begin
                self.between_updates(epoch, i + 1, s, bar)
        bar.close()
        s["wall_s"] = time.monotonic() - t_begin
        s["lr"] = self.lr(epoch + 1)
        return s

    def optimizer_step(self, lr: float, bad: int) -> None:
        """Apply one update, unless a loss in the group was non-finite on any rank."""
        cfg = self.cfg
        bad_anywhere = self.d.sum([float(bad)])[0]
        if bad_anywhere:
            self.optimizer.zero_grad(set_to_none=True)  # skip: gradients are poisoned
            self.nonfinite += 1
            if self.nonfinite >= cfg["training.max_nonfinite"]:
                raise NonFiniteLoss(
                    f"the loss was not finite for {self.nonfinite} consecutive updates (update "
                    f"{self.updates}); stopping. The last good state is {self.last_pt} — lower "
                    f"optim.lr, raise lr.warmup_epochs, set training.clip_grad or training.amp=bf16")
            log.warning(f"non-finite loss at update {self.updates}: update skipped")
            return
        self.nonfinite = 0
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if cfg["training.clip_grad"] > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg["training.clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None and self.updates % cfg["ema.every"] == 0:
            self.ema.update(self.model, step=self.updates)

    def between_updates(self, epoch: int, step: int, s: dict, bar) -> None:
        """Mid-epoch: honour a stop signal (all ranks agree) and the periodic checkpoint."""
        minutes = self.cfg["checkpoint.every_minutes"]
        due = self.d.main and minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        stop, due = self.d.sum([float(self.stop.received is not None), float(due)])
        if stop or due:
            self.save_last(epoch, step, s)
        if stop:
            bar.close()
            raise Preempted

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1/top-5 (%) of the model and EMA over the whole val set (sums all-reduced)."""
        d = self.d
        models = {"": self.model}
        if self.ema is not None and self.cfg["ema.eval"]:
            models["ema_"] = self.ema.module
        for m in models.values():
            m.eval()
        k = min(5, self.cfg["model.num_classes"])
        sums = [0.0] * (2 * len(models) + 1)  # [top1, top5] per model, then the image count
        for images, labels in tqdm(self.val_loader, desc="eval", leave=False, dynamic_ncols=True,
                                   disable=not (d.main and self.cfg["logging.progress"])):
            x = normalize(images, self.mean, self.std, dtype=self.amp_dtype or torch.float32)
            for j, m in enumerate(models.values()):
                with torch.autocast(d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    top = m(x).topk(k, dim=1).indices  # (B, k)
                hit = top == labels[:, None]
                sums[2 * j] += hit[:, 0].sum().item()
                sums[2 * j + 1] += hit.any(dim=1).sum().item()
            sums[-1] += len(labels)
        sums = d.sum(sums)
        self.model.train()
        out = {}
        for j, prefix in enumerate(models):
            out[f"{prefix}top_1"] = 100 * sums[2 * j] / max(sums[-1], 1)
            out[f"{prefix}top_5"] = 100 * sums[2 * j + 1] / max(sums[-1], 1)
        out["val_images"] = int(sums[-1])  # summed over ranks: the val set's size, each image once
        return out


    # --------------------------------------------------------------------- logging and saving
    def end_epoch(self, epoch: int, s: dict, metrics: dict, eval_s: float) -> None:
        """Log the epoch's row, write best.pt on a new best, then last.pt and final.json."""
        d, cfg = self.d, self.cfg
        r = lambda v, digits: None if v is None else round(v, digits)  # noqa: E731 — readable logs
        row = {"epoch": epoch, "train_loss": r(s["loss_sum"] / max(s["loss_n"], 1), 5),
               "top_1": r(metrics.get("top_1"), 3), "top_5": r(metrics.get("top_5"), 3),
               "ema_top_1": r(metrics.get("ema_top_1"), 3), "ema_top_5": r(metrics.get("ema_top_5"), 3),
               "val_images": metrics.get("val_images"),
               "lr": s["lr"], "res": train_res(self.cfg, epoch), "updates": self.updates,
               "epoch_time_s": r(s["wall_s"] + eval_s, 3), "train_time_s": r(s["step_s"], 3),
               "train_img_s": r(s["images"] * d.world / max(s["step_s"], 1e-9), 1),
               "data_wait_frac": r(s["wait_s"] / max(s["step_s"], 1e-9), 4),
               "peak_mem_mb": r(peak_mem_mb(d.device), 1)}
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        if d.main:
            self.rows.append(row)
            write_rows(self.folder, self.rows)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        log.info(f"epoch {epoch}: loss {row['train_loss']:.4f} top-1 {fmt(row['top_1'], '.2f')} "
                 f"ema {fmt(row['ema_top_1'], '.2f')} lr {row['lr']:.2e} {row['train_img_s']:.0f} img/s "
                 f"wait {row['data_wait_frac']:.1%} {row['epoch_time_s']:.1f} s")
        top1 = row["top_1"]
        if top1 is not None and (self.best is None or top1 > self.best):
            self.best = top1
            if cfg["checkpoint.save_best"]:
                self.save(self.best_pt, lambda: {
                    "format": 1, "model": self.model.state_dict(), "epoch": epoch, "top_1": top1,
                    "ema": None if self.ema is None else self.ema.state_dict(), "config": cfg})
        in_sync = self.ranks_in_sync()
        if not in_sync:
            log.warning(f"epoch {epoch}: ranks hold different weights")
        final = self.final(completed=epoch + 1 == cfg["training.epochs"], ranks_in_sync=in_sync)
        self.save_last(epoch + 1, 0, {}, final)
        if d.main:
            dump_json(final, self.folder / "final.json")

    def save_last(self, epoch: int, step: int, epoch_stats: dict, final: dict | None = None) -> None:
        """Write ``last.pt``: resume at ``epoch``, after ``step`` micro-batches of it."""
        rngs = [None] * self.d.world
        if self.d.world > 1:
            dist.all_gather_object(rngs, ckpt.rng_state())
        else:
            rngs = [ckpt.rng_state()]
        self.save(self.last_pt, lambda: {
            "format": 1, "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step, "updates": self.updates, "rng": rngs,
            "config": self.cfg, "world_size": self.d.world, "elapsed_s": self.elapsed(),
            "epoch_stats": dict(epoch_stats), "best": self.best, "final": final})
        self.last_save = time.monotonic()
        if step:
            log.info(f"saved {self.last_pt.name} at epoch {epoch} step {step}")

    def save(self, path: Path, make_state) -> None:
        """Rank 0 writes ``make_state()`` atomically; every rank learns whether it worked."""
        error = None
        if self.d.main:
            try:
                ckpt.save(make_state(), path)
            except ckpt.CheckpointError as e:
                error = e
        if self.d.sum([float(error is not None)])[0]:
            raise error or ckpt.CheckpointError(f"rank 0 could not write {path}")

    def ranks_in_sync(self) -> bool:
        """True when every rank holds bit-identical weights (per-tensor sums agree exactly)."""
        if self.d.world == 1:
            return True
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()]
                           + [p.detach().double().abs().sum() for p in self.model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def elapsed(self) -> float:
        """Wall seconds spent in this experiment over all runs that resumed it."""
        return self.elapsed_before + time.monotonic() - self.t_start

    def final(self, completed: bool, ranks_in_sync: bool) -> dict:
        """The ``final.json`` summary (contract keys first) from the rows logged so far."""
        cfg, rows = self.cfg, self.rows
        top1 = [r["top_1"] for r in rows if r["top_1"] is not None]
        ema1 = [r["ema_top_1"] for r in rows if r["ema_top_1"] is not None]
        train_s = sum(r["train_time_s"] for r in rows)
        return {"experiment": self.folder.name, "strategy": cfg["reduction.strategy"],
                "arch": cfg["model.arch"], "img_size": cfg["model.img_size"],
                "epochs": cfg["training.epochs"], **self.model_stats,
                "best_top_1": max(top1, default=None), "final_top_1": top1[-1] if top1 else None,
                "best_ema_top_1": max(ema1, default=None), "final_ema_top_1": ema1[-1] if ema1 else None,
                "total_time_s": self.elapsed(),
                "train_img_s": sum(r["train_img_s"] * r["train_time_s"] for r in rows) / max(train_s, 1e-9),
                "data_wait_frac": sum(r["data_wait_frac"] * r["train_time_s"] for r in rows) / max(train_s, 1e-9),
                "completed": completed, "epochs_done": len(rows), "updates": self.updates,
                "world_size": self.d.world, "global_batch": self.global_batch,
                "ranks_in_sync": ranks_in_sync}


# ----------------------------------------------------------------------------- entry point
def train_resolutions(cfg: dict) -> set[int]:
    """Every train resolution of the ``resolution.*`` schedule over ``training.epochs``."""
    try:
        return {train_res(cfg, e) for e in range(cfg["training.epochs"])}
    except ValueError as e:  # e.g. min_res > max_res; the message names the keys
        raise ConfigError(str(e)) from None


def check_resolutions(cfg: dict, patch_size) -> None:
    """``ConfigError`` unless every train resolution and the val resolution is a multiple of the
    model's ``patch_size`` (int or (h, w)). Why: with ``dynamic_img_size`` timm asserts this in the
    forward, so a bad size would crash the run at its first step or first evaluation."""
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),)
    fits = lambda res: all(res % p == 0 for p in patch)  # noqa: E731 — images are square
    val_res = cfg["validation.resolution"] or cfg["model.img_size"]
    bad = [f"train resolution {r} (resolution.min_res/max_res/step)" for r in sorted(train_resolutions(cfg))
           if not fits(r)]
    if not fits(val_res):
        bad.append(f"val resolution {val_res} (validation.resolution, 0 = model.img_size)")
    if bad:
        raise ConfigError(f"the model's patch size is {'x'.join(map(str, patch))} px, so image sizes "
                          f"must be multiples of it: {', '.join(bad)}")


def check_inputs(cfg: dict) -> None:
    """User errors worth catching before any work: missing datasets, CUDA asked for but absent,
    an impossible resolution schedule."""
    train_resolutions(cfg)
    try:
        if cfg["data.val_dataset"]:
            check_datasets(cfg["data.train_dataset"], cfg["data.val_dataset"])
        else:
            check_beton(cfg["data.train_dataset"])
    except ConfigError as e:
        raise ConfigError(f"data.train_dataset / data.val_dataset: {e}") from None
    classes = read_classes(cfg["data.train_dataset"])  # the writer's list; None if absent
    if classes is not None and len(classes) > cfg["model.num_classes"]:
        # why here: a label >= num_classes would crash the first step (a device assert on CUDA)
        raise ConfigError(f"model.num_classes={cfg['model.num_classes']}, but {cfg['data.train_dataset']} "
                          f"has {len(classes)} classes (its .classes.json)")
    if cfg["training.device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda, but torch sees no CUDA device")


def main(argv: list[str]) -> int:
    """Parse ``argv`` (``--config FILE`` ... ``--section.key=value`` ...), train, return the exit
    code: 0 done (or already complete), 1 crash / non-finite loss / unwritable checkpoint,
    2 configuration or user error, 124 preempted by SIGTERM/SIGUSR1 after writing ``last.pt``."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        for key, p in sorted(declared_keys(SECTIONS).items()):
            print(f"  --{key}={p.default!r}  {p.desc} [{p.checker.help()}]")
        return EXIT_OK
    try:
        load_config(argv, SECTIONS)
        cfg = resolved(SECTIONS)
        check_inputs(cfg)
    except ConfigError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    try:
        return Trainer(cfg, argv).run()
    except (ConfigError, StrategyError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except (NonFiniteLoss, ckpt.CheckpointError) as e:  # every rank raises these together
        if rank0:
            log.error(f"error: {e}")  # into train.log too
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CRASH
    except Exception:
        log.exception("training crashed")
        raise
    finally:
        close_logging()
        if dist.is_initialized():
            dist.destroy_process_group()
