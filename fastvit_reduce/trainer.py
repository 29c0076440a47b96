"""The training loop: one process per GPU; one or several paired variants on the same batches.

    python train.py --config rn_configs/thin.yaml                      # 1 process (1 GPU, or CPU)
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml
    python train.py --config rn_configs/thin.yaml --dry-run [--world-size 8]   # the plan, no training
    # paired: K variants step in turn on each batch, decoded and augmented once
    torchrun --standalone --nproc-per-node=8 train.py --config rn_configs/baseline.yaml \\
        --pair-with rn_configs/thin.yaml rn_configs/shallow.yaml rn_configs/grouped.yaml
    # two nodes x 2 GPUs: run this on each node (MASTER = node 0's address, any free port):
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=$MASTER:29500 \\
        --rdzv-id=thin_vit_b16 train.py --config rn_configs/thin.yaml --logging.folder=/shared/runs

Overrides: ``--section.key=value`` (``--training.epochs=100``) apply to every variant; later
``--config`` files override earlier ones and a YAML may say ``base: other.yaml``. Unknown keys, flags
not written 0/1 and out-of-range values stop the run before any work (exit 2, the key named).

**The global batch is the recipe.** ``training.global_batch`` (1024 for the seed) is kept at any
process count: gradient accumulation = global / (processes x ``training.batch_size``); a count that
does not divide is refused, naming the per-GPU sizes that would. The peak lr is ``optim.lr``
(``lr.scale`` = linear or sqrt rescales it from ``lr.base_batch``).

**Paired variants** (``--pair-with``) may differ only in what a variant owns (``PER_VARIANT``:
model widths, reduction, EMA, optimizer, lr schedule, experiment name); everything that shapes the
batches must agree. Each variant has its own model, optimizer, scaler, EMA, DDP wrapper and run
folder (``fastvit_reduce.runs``), and a variant whose loss stays non-finite stops alone.
``--pair-part I/N`` trains only variants I, I+N, ... of the pair (all of them are still checked
and recorded as one pair): N processes with the same command line and parts 1..N train the whole
pair on the same batches, each decoding them itself (``sweep --paired --cpu-slots N`` does this
on a CPU, where one small model's step cannot use more than about one core).

**Reproducible.** Every random draw is a pure function of integer keys (``fastvit_reduce.seeding``):
crop and flip of (seed, epoch, sample), augmentation of (seed, epoch, step, rank), drop-path of
(seed, epoch, step, rank), init of (seed). On CPU the same command gives bit-identical weights,
whatever ``data.num_workers``/``data.batches_ahead``, and a run stopped anywhere (kill -9 included)
and resumed ends with the same weights as one never stopped. On CUDA the data stream is identical;
kernels are bit-exact only with ``training.deterministic=1``.

Never losing work: ``last.pt`` (full state and the log rows) is written atomically at each epoch
end, every ``checkpoint.every_minutes`` at an update boundary, and on SIGTERM/SIGUSR1 (exit 124).
Re-running the same command resumes; a finished run re-run is a no-op (exit 0); a changed config
is refused, naming the keys (``runs.config_changes``). Under torchrun the launcher forwards
SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers and SIGKILLs them ~30 s later. The run folder is
locked: a second trainer on it exits 2 naming the holder.

Host synchronisation: losses, finiteness and counters stay on the device; the host reads them
and the ranks agree on stop signals and periodic saves every ``logging.every_steps`` updates and
at epoch ends. ``data_wait_frac`` = host time blocked waiting for the next batch / epoch wall time.

Exit codes: 0 done, 1 crash / every variant non-finite / unwritable checkpoint / dead loader,
2 configuration or user error, 124 stopped by a signal with ``last.pt`` written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

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
from .augment.batch import augment_from_cfg, normalize
from .config import Bool01, Choice, ConfigError, FloatList, Number, declared_keys, load_config, resolved
from .data.loaders import (LoaderError, Turns, check_beton, check_datasets, create_train_loader, create_val_loader,
                           get_resolution, one_torch_thread, read_classes, set_epoch, set_train_resolution)
from .data.inspect import label_range, verify_beton
from .data.jit import CACHE_ENV as JIT_CACHE_ENV, cache_root as jit_cache_root, stats as jit_stats
from .data.orders import RepeatAugOrder
from .ema import ModelEma
from .models import gflops, mlp_stats, model_from_cfg
from .runs import (RunFolder, RunFolderError, check_experiment_name,
                   config_changes, position, resume_position, tensor_hash, weights_hash)
from .seeding import derive
from .strategies import STRATEGIES, StrategyError

Section("training", "the training loop").params(
    epochs=Param(Number(int, 1), "number of epochs", default=300),
    batch_size=Param(Number(int, 1), "images per process (per GPU) per micro-batch", default=256),
    global_batch=Param(Number(int, 0), "images per optimizer update over all processes; gradient "
                       "accumulation makes up the rest (0 = batch_size x processes)", default=0),
    amp=Param(Choice("off", "fp16", "bf16"), "autocast dtype (fp16 uses a GradScaler)", default="off"),
    channels_last=Param(Bool01(), "NHWC images and conv weights", default=1),
    compile=Param(Bool01(), "torch.compile each variant's model", default=0),
    label_smoothing=Param(Number(float, 0, 1, hi_open=True), "label smoothing (folded into "
                          "mixup's soft targets when mixup/cutmix is on)", default=0.1),
    clip_grad=Param(Number(float, 0), "max gradient norm (0 = no clipping)", default=0.0),
    seed=Param(Number(int, 0), "seed of model init, data order, crops and augmentation", default=42),
    device=Param(Choice("auto", "cpu", "cuda"), "auto = cuda when available", default="auto"),
    max_nonfinite=Param(Number(int, 1), "stop a variant after this many consecutive updates with a "
                        "non-finite loss", default=5),
    threads=Param(Number(int, 0), "torch intra-op threads (0 = the cores this process may use)",
                  default=0),
    deterministic=Param(Bool01(), "torch deterministic algorithms (bit-exact CUDA kernels, slower)",
                        default=0),
    overlap=Param(Choice("ahead", "decode", "none"),
                  "how preparing batches meets the model step (the result is the same in every mode): "
                  "ahead = decode (ffcv's thread) and augment (a thread) batch i+1 while step i computes; "
                  "decode = only decoding beside the step; none = decoding and augmentation take turns "
                  "with the step, each with all this process's cores (.beton data only)", default="ahead"),
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
    scale=Param(Choice("none", "linear", "sqrt"), "peak = optim.lr x (global batch / base_batch) "
                "(linear, DeiT's rule) or its square root; none = optim.lr as given", default="none"),
    base_batch=Param(Number(int, 1), "global batch at which optim.lr applies (lr.scale != none)",
                     default=512),
)
Section("ema", "exponential moving average of the weights (sharing-safe)").params(
    decay=Param(Number(float, 0, 1, hi_open=True), "EMA decay per EMA update (0 = no EMA)", default=0.0),
    every=Param(Number(int, 1), "optimizer updates between EMA updates", default=1),
    eval=Param(Bool01(), "evaluate the EMA model; its top-1 is then the headline, as in timm", default=1),
)
Section("validation", "top-1/top-5 on data.val_dataset").params(
    batch_size=Param(Number(int, 1), "images per process", default=256),
    every_n_epochs=Param(Number(int, 1), "evaluate every N epochs (and always after the last)", default=1),
    resolution=Param(Number(int, 0), "val resolution in px (0 = model.img_size)", default=0),
)
Section("logging", "where results go").params(
    folder=Param(str, "parent folder of run folders", default="runs"),
    experiment=Param(str, "run folder name ('' = the config file's name, else reduction.strategy)",
                     default=""),
    progress=Param(Bool01(), "tqdm progress bars on rank 0", default=1),
    every_steps=Param(Number(int, 1), "optimizer updates between host reads of the loss and the "
                      "ranks' stop/save agreement", default=20),
)
Section("checkpoint", "last.pt / best.pt").params(
    every_minutes=Param(Number(float, 0), "also write last.pt every N minutes mid-epoch (0 = only "
                        "at epoch ends)", default=0.0),
    save_best=Param(Bool01(), "write best.pt on a new best headline top-1", default=1),
    on_damaged=Param(Choice("refuse", "fresh", "best"), "a last.pt that cannot be read: refuse "
                     "(exit 2), or move it aside and start fresh / from best.pt", default="refuse"),
)

SECTIONS = ["data", "resolution", "augment", "model", "reduction", "training", "optim", "lr", "ema",
            "validation", "logging", "checkpoint"]
# what a paired variant may set for itself; every other key shapes the shared batches
PER_VARIANT = ("model.", "reduction.", "ema.", "optim.", "lr.", "logging.experiment")
SHARED_MODEL_KEYS = ("model.num_classes", "model.img_size")  # the batches' labels and pixels
EXIT_OK, EXIT_CRASH, EXIT_USER, EXIT_PREEMPTED = 0, 1, 2, 124
log = logging.getLogger("fastvit_reduce")


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived (``saved`` tells whether ``last.pt`` holds this position)."""

    def __init__(self, saved: bool = True):
        super().__init__()
        self.saved = saved


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


# ----------------------------------------------------------------------------- the plan
def batch_plan(cfg: dict, world: int) -> dict:
    """Per-GPU batch, accumulation, global batch and peak lr at ``world`` processes.

    ``ConfigError`` when ``training.global_batch`` is not world x batch_size x an integer; the
    message names the per-GPU batch sizes that would reach it.
    """
    per_gpu, want = cfg["training.batch_size"], cfg["training.global_batch"] or cfg["training.batch_size"] * world
    if want % (per_gpu * world):
        valid = [b for b in range(1, want // world + 1) if want % (b * world) == 0]
        near = sorted(valid, key=lambda b: (abs(b - per_gpu), -b))[:4]
        raise ConfigError(
            f"training.global_batch={want} cannot be reached with training.batch_size={per_gpu} on "
            f"{world} process(es) ({per_gpu} x {world} does not divide {want}); per-GPU sizes that do: "
            f"{', '.join(map(str, sorted(near))) or 'none (global_batch < processes)'}")
    scale = {"none": 1.0, "linear": want / cfg["lr.base_batch"],
             "sqrt": math.sqrt(want / cfg["lr.base_batch"])}[cfg["lr.scale"]]
    return {"world": world, "per_gpu_batch": per_gpu, "accum": want // (per_gpu * world),
            "global_batch": want, "peak_lr": cfg["optim.lr"] * scale}


def batches_per_epoch(cfg: dict, world: int, num_samples: int) -> int:
    """Train micro-batches per process per epoch, as the loader's order will give them."""
    repeats = cfg["augment.aug_repeats"]
    if repeats > 1:
        stand_in = SimpleNamespace(indices=np.arange(num_samples), seed=0, distributed=world > 1)
        per_rank = RepeatAugOrder(stand_in, repeats, rank=0, world_size=world).num_selected
    else:
        per_rank = math.ceil(num_samples / world)  # ffcv pads like torch's DistributedSampler
    b = cfg["training.batch_size"]
    return per_rank // b if cfg["data.drop_last"] else math.ceil(per_rank / b)


def stored_size(path: str) -> dict | None:
    """Median stored width/height/short side (px) of a .beton's images, from its metadata."""
    try:
        from ffcv.reader import Reader
        meta = Reader(str(path)).metadata["f0"]
    except Exception:  # noqa: BLE001 — a missing/odd file: the checks elsewhere name it
        return None
    w, h = meta["width"].astype(np.float64), meta["height"].astype(np.float64)
    return {"median_width": float(np.median(w)), "median_height": float(np.median(h)),
            "median_short_side": float(np.median(np.minimum(w, h))),
            "median_long_side": float(np.median(np.maximum(w, h)))}


def resolution_warnings(cfg: dict, crop_pct: float, train_store: dict | None,
                        val_store: dict | None) -> list[str]:
    """Where a stored image is smaller than what the crops need (so crops are upsampled)."""
    out = []
    img = cfg["validation.resolution"] or cfg["model.img_size"]
    if val_store:
        need = img / crop_pct  # timm eval: short side resized to img / crop_pct, then centre crop
        have = val_store["median_short_side"]
        if have < need:
            out.append(f"val images are stored with a median short side of {have:.0f} px; timm's eval "
                       f"transform resizes it to {need:.0f} px, so validation upsamples by "
                       f"{need / have:.2f}x (write the .beton at a larger max resolution)")
    if train_store:
        res = cfg["resolution.max_res"]
        lo, hi = cfg["data.rrc_scale"]
        side = math.sqrt((lo + hi) / 2 * train_store["median_width"] * train_store["median_height"])
        if side < res:
            out.append(f"train crops of mean area {(lo + hi) / 2:.2f} cover ~{side:.0f} px of the median "
                       f"stored image, below the {res} px train resolution: most crops are upsampled")
    return out


# ----------------------------------------------------------------------------- processes
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
        else:
            self.device = torch.device("cpu")
        if self.world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                    device_id=self.device if use_cuda else None)
        self.main = self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """All-reduce (sum) a few host numbers across ranks; identity with one process."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce (max) of a device tensor; no host sync."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def set_numerics(device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls on CUDA (as timm), or torch's deterministic algorithms when asked."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # why: cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def available_cores() -> int:
    """Cores for this process: its CPU affinity (Slurm/taskset limits count) shared among the
    processes torchrun started on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def decode_threads(cfg: dict) -> int:
    """``data.num_workers``, 0 resolved to this process's cores (numba's limit at most)."""
    import numba
    return cfg["data.num_workers"] or min(available_cores(), numba.config.NUMBA_NUM_THREADS)


OVERLAP_WORDS = {"ahead": "the next batch decoded and augmented beside the step",
                 "decode": "the next batch decoded beside the step, augmented in series",
                 "none": "decoding and augmentation take turns with the step, each with all the cores"}


def overlap_mode(choice: str, can_take_turns: bool) -> str:
    """``training.overlap``, checked against the data source (README, speed section: on 2 CPU
    cores ``none`` and ``ahead`` measured the same wall time; ``ahead`` keeps the data wait low)."""
    if choice == "none" and not can_take_turns:
        raise ConfigError("training.overlap=none: this data source cannot take turns with the step "
                          "(only the .beton loaders can); use ahead or decode")
    return choice


def process_age() -> float:
    """Seconds since this process started (Linux /proc), for the start-up time."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (cluster preemption) until the loop can act on it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def setup_logging(folders: list[Path] | None) -> None:
    """Rank 0: INFO to stdout and each variant's ``train.log``; other ranks: errors only."""
    close_logging()
    log.propagate = False  # why: an embedding app's root handlers would print every line twice
    log.setLevel(logging.INFO if folders is not None else logging.ERROR)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)] + [logging.FileHandler(f / "train.log") for f in folders or []]
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


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- data
class Ahead:
    """Runs ``make()``'s iterator one item ahead in a thread, so batch i+1 is decoded and augmented
    while step i computes (torch ops release the GIL). Items and exceptions arrive in order.
    ``poll`` is called every 0.5 s while the consumer waits (it may raise to stop the wait)."""

    _DONE = object()

    def __init__(self, make, poll=None, depth: int = 1):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.poll = poll
        torch.get_num_threads()  # fixes this thread's count before the helper sets 1 (one_torch_thread)
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="batch-ahead")
        self.thread.start()

    def _run(self, make):
        one_torch_thread()  # the step's OpenMP team stays the only one (loaders.one_torch_thread)
        try:
            for item in make():
                if not self._put((True, item)):
                    return
            self._put((True, self._DONE))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            self._put((False, e))

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                ok, item = self.q.get(timeout=0.5)
                break
            except queue.Empty:
                if self.poll is not None:
                    self.poll()
        if not ok:
            raise item
        if item is self._DONE:
            raise StopIteration
        return item

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=10)


class InPlace:
    """``Ahead``'s interface without the thread (``training.overlap=decode`` or ``none``)."""

    def __init__(self, iterator):
        self.it = iter(iterator)

    def __next__(self):
        return next(self.it)

    def close(self):
        close = getattr(self.it, "close", None)
        if close:
            close()


class FfcvSource:
    """Train and val batches from the .beton files: decoded by ffcv, augmented on the device once
    per batch for every variant, the next batch prepared in a thread while the model steps."""

    def __init__(self, cfg: dict, d: Dist, mean, std, crop_pct: float, start_epoch: int, dtype):
        self.cfg, self.d, self.mean, self.std = cfg, d, mean, std
        self.augment = augment_from_cfg(cfg, cfg["model.num_classes"], mean, std,
                                        cfg["training.label_smoothing"], d.device, dtype)
        self.soft_targets = self.augment.soft_targets
        self.loader = create_train_loader(
            cfg["data.train_dataset"], cfg["training.batch_size"], d.device, res=train_res(cfg, start_epoch),
            num_workers=decode_threads(cfg), in_memory=cfg["data.in_memory"],
            batches_ahead=cfg["data.batches_ahead"], drop_last=cfg["data.drop_last"],
            order=cfg["data.order"], aug_repeats=cfg["augment.aug_repeats"], seed=cfg["training.seed"],
            distributed=d.world > 1, rrc_scale=cfg["data.rrc_scale"], rrc_ratio=cfg["data.rrc_ratio"],
            hflip=cfg["data.hflip"], channels_last=cfg["training.channels_last"])
        self.val_loader = None
        if cfg["data.val_dataset"]:
            self.val_loader = create_val_loader(
                cfg["data.val_dataset"], cfg["validation.batch_size"], d.device,
                res=cfg["validation.resolution"] or cfg["model.img_size"], crop_pct=crop_pct,
                num_workers=decode_threads(cfg), in_memory=cfg["data.in_memory"],
                distributed=d.world > 1, channels_last=cfg["training.channels_last"])
        self.has_val = self.val_loader is not None
        self.loaders = [x for x in (self.loader, self.val_loader) if x is not None]
        self.side_stream = torch.cuda.Stream(d.device) if d.device.type == "cuda" else None
        self.turns: Turns | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def take_turns(self) -> None:
        """Decode only while the consumer waits for a batch (``training.overlap=none``); the
        augmentation then runs in the consumer's thread, inside its turn."""
        self.turns = Turns()
        for loader in self.loaders:
            loader.turns = self.turns

    def held(self):
        return self.turns.held() if self.turns is not None else contextlib.nullcontext()

    def set_poll(self, poll) -> None:
        """Called while a loader waits for its decode thread; may raise to stop the wait."""
        for loader in self.loaders:
            loader.poll = poll

    def close(self) -> None:
        """End the decode threads of a running epoch (a stopped or finished run)."""
        for loader in self.loaders:
            loader.close()

    def epoch(self, epoch: int, skip: int = 0):
        """(x, targets) for the steps ``skip``.. of ``epoch``; x normalised, in the AMP dtype."""
        cfg, d = self.cfg, self.d
        set_train_resolution(self.loader, train_res(cfg, epoch))
        set_epoch(self.loader, epoch)  # the order, crops and flips of this epoch
        stream = torch.cuda.stream(self.side_stream) if self.side_stream else contextlib.nullcontext()
        with stream, self.held():  # with turns: held while the consumer steps on each batch
            for i, (images, labels) in enumerate(self.loader):
                if i < skip:  # resumed mid-epoch: these steps were trained before the stop
                    continue
                # why clone: ffcv reuses its output buffers (batches_ahead + 2 slots) and this batch
                # is used one step later; the images are copied by the augmentation anyway
                labels = labels.clone()
                x, y = self.augment(images, labels, seed=derive(cfg["training.seed"], "augment", epoch, i, d.rank))
                if cfg["training.channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                ready = None
                if self.side_stream is not None:  # the model's stream waits for this batch only
                    ready = torch.cuda.Event()
                    ready.record(self.side_stream)
                yield x, y, ready

    def val(self):
        """(x normalised, int64 labels) over this rank's shard of the val set."""
        dtype = self.augment.dtype
        with self.held():
            for images, labels in self.val_loader:
                yield normalize(images, self.mean, self.std, dtype=dtype), labels


# ----------------------------------------------------------------------------- one variant
class Variant:
    """Everything one model of a (paired) run owns: model, optimizer, scaler, EMA, DDP/compile
    wrappers, run folder and log rows."""

    def __init__(self, cfg: dict, d: Dist, folder: RunFolder, plan: dict, soft_targets: bool):
        self.cfg, self.d, self.folder, self.plan = cfg, d, folder, plan
        self.name = folder.name
        img = cfg["model.img_size"]
        val_res = cfg["validation.resolution"] or img
        dynamic = {cfg["resolution.min_res"], cfg["resolution.max_res"], val_res} != {img}
        # same seed for every variant: those built from the full model start from the same
        # weights before their surgery; thin draws its own widths from the same stream
        model = model_from_cfg(cfg, dynamic_img_size=dynamic, seed=derive(cfg["training.seed"], "init"))
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if dynamic and patch:
            check_resolutions(cfg, patch)
        stats = mlp_stats(model)
        self.stats = {"params": stats["params"], "mlp_params": stats["mlp_params"],
                      "gflops": round(gflops(model, img), 4)}
        data_cfg = resolve_data_config({}, model=model)  # timm: the arch's mean/std/crop_pct
        self.mean, self.std, self.crop_pct = data_cfg["mean"], data_cfg["std"], cfg["data.crop_pct"] or data_cfg["crop_pct"]
        log.info(f"{self.name}: {cfg['model.arch']} ({cfg['reduction.strategy']}) {self.stats['params']:,} params, "
                 f"{stats['mlp_params']:,} in {stats['unique_mlps']} MLPs (hidden {stats['mlp_hidden']}), "
                 f"{self.stats['gflops']:.3f} GFLOPs/img at {img}px")
        model.to(d.device)
        if cfg["training.channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = self.build_optimizer()
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["training.amp"])
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg["training.amp"] == "fp16")
        self.criterion = (SoftTargetCrossEntropy() if soft_targets
                          else nn.CrossEntropyLoss(label_smoothing=cfg["training.label_smoothing"]))
        self.ddp = (DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
                    if d.world > 1 else None)
        self.train_model = torch.compile(self.ddp or model) if cfg["training.compile"] else (self.ddp or model)
        self.ema = ModelEma(model, cfg["ema.decay"]) if cfg["ema.decay"] > 0 else None
        # counters (device tensors: read by the host every logging.every_steps updates)
        dev = d.device
        self.updates, self.best, self.rows, self.elapsed_before = 0, None, [], 0.0
        self.consecutive_bad = torch.zeros((), device=dev)   # updates in a row with a non-finite loss
        self.group_bad = torch.zeros((), device=dev)          # non-finite micro-steps in this group
        self.active, self.exit_reason, self.saved_final = True, None, False
        self.first_batch_hash = None
        self.reset_epoch_sums()

    def build_optimizer(self) -> torch.optim.Optimizer:
        """timm's AdamW param groups (no decay on 1-D params and ``no_weight_decay()`` names)."""
        cfg = self.cfg
        kwargs = dict(lr=self.plan["peak_lr"], weight_decay=cfg["optim.weight_decay"],
                      betas=tuple(cfg["optim.betas"]), eps=cfg["optim.eps"])
        if cfg["optim.fused"]:
            try:
                return create_optimizer_v2(self.model, "adamw", fused=True, **kwargs)
            except (RuntimeError, ValueError) as e:
                log.info(f"fused AdamW unavailable here ({e}); using foreach")
        return create_optimizer_v2(self.model, "adamw", foreach=True, **kwargs)

    def lr(self, progress: float) -> float:
        c = self.cfg
        return lr_at(progress, peak=self.plan["peak_lr"], epochs=c["training.epochs"],
                     warmup_epochs=c["lr.warmup_epochs"], warmup_lr=c["lr.warmup_lr"],
                     min_lr=c["lr.min_lr"], schedule=c["lr.schedule"])

    def reset_epoch_sums(self, carry: dict | None = None) -> None:
        dev = self.d.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.loss_n = torch.zeros((), dtype=torch.float64, device=dev)
        self.lr_sum, self.lr_n = 0.0, 0
        if carry:
            self.loss_sum += carry.get("loss_sum", 0.0)
            self.loss_n += carry.get("loss_n", 0.0)
            self.lr_sum, self.lr_n = carry.get("lr_sum", 0.0), carry.get("lr_n", 0)

    # ------------------------------------------------------------------ one micro-step
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, update: bool, group: int) -> None:
        """Forward and backward on one micro-batch (gradients of a group accumulate)."""
        sync = self.ddp.no_sync() if self.ddp is not None and not update else contextlib.nullcontext()
        with sync:
            with torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.criterion(self.train_model(x), y)
            self.scaler.scale(loss / group).backward()
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_n += finite
        self.group_bad += ~finite
        # the graph is freed by backward; the next variant's forward starts with this one's
        # activations gone

    def optimizer_step(self, lr: float) -> None:
        """Apply one update unless a loss of the group was non-finite on any rank.

        Where the optimizer can skip on the device (fused AdamW takes a ``found_inf`` tensor),
        nothing is read back to the host; otherwise (CPU, foreach) the host checks the flag."""
        bad = self.d.all_max_(self.group_bad.clone())
        self.group_bad.zero_()
        self.consecutive_bad.copy_(torch.where(bad > 0, self.consecutive_bad + 1, torch.zeros_like(bad)))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.lr_sum, self.lr_n = self.lr_sum + lr, self.lr_n + 1
        on_device = self.d.device.type == "cuda" and self.fused and not self.scaler.is_enabled()
        if not on_device and bad.item() > 0:
            self.optimizer.zero_grad(set_to_none=True)  # skip: gradients are poisoned
            self.updates += 1
            return
        if self.cfg["training.clip_grad"] > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["training.clip_grad"])
        if on_device:  # why: torch's fused AdamW skips the step on the device when found_inf is 1
            self.optimizer.found_inf = (bad > 0).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if on_device:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None and self.updates % self.cfg["ema.every"] == 0:
            self.ema.update(self.model, step=self.updates)

    # ------------------------------------------------------------------ state
    def state(self, epoch: int, step: int, trainer) -> dict:
        """Everything ``last.pt`` holds for this variant (resume at ``epoch`` after ``step``)."""
        return {"format": 2, "model": self.model.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "step_in_epoch": step, "updates": self.updates,
                "consecutive_bad": float(self.consecutive_bad), "config": self.cfg,
                "world_size": self.d.world, "elapsed_s": trainer.elapsed(self),
                "epoch_stats": {"loss_sum": float(self.loss_sum), "loss_n": float(self.loss_n),
                                "lr_sum": self.lr_sum, "lr_n": self.lr_n,
                                **{k: v for k, v in trainer.epoch_stats.items()}} if step else {},
                "best": self.best, "rows": list(self.rows), "first_batch_hash": self.first_batch_hash}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.updates, self.best = state["updates"], state["best"]
        self.elapsed_before = state["elapsed_s"]
        self.consecutive_bad.fill_(state.get("consecutive_bad", 0.0))
        self.rows = [r for r in state.get("rows", []) if r["epoch"] < state["epoch"]]
        self.first_batch_hash = state.get("first_batch_hash")
        self.reset_epoch_sums(state.get("epoch_stats") if state["step_in_epoch"] else None)

    def restore_weights(self, best: dict) -> None:
        """Start from ``best.pt``'s weights (after a damaged last.pt): fresh optimizer state."""
        self.model.load_state_dict(best["model"])
        if self.ema is not None and best.get("ema") is not None:
            self.ema.load_state_dict(best["ema"])
        self.best = best.get("top_1")


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """K >= 1 variants trained on one stream of batches; ``run()`` returns the exit code."""

    def __init__(self, cfgs: list[dict], argv: list[str], d: Dist, folders: list[RunFolder],
                 source_factory=None):
        self.cfgs, self.cfg, self.argv, self.d = cfgs, cfgs[0], argv, d
        self.t_start, self.t_age = time.monotonic(), process_age()
        cfg = self.cfg
        self.plan = batch_plan(cfg, d.world)
        set_numerics(d.device, cfg["training.deterministic"])
        # models first (the seed of each variant's init does not depend on what else is built)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["training.amp"], torch.float32)
        soft = cfg["augment.mixup"] > 0 or cfg["augment.cutmix"] > 0
        self.variants = []
        for c, folder in zip(cfgs, folders):
            self.variants.append(Variant(c, d, folder, {**self.plan, **batch_plan(c, d.world)}, soft))
        v0 = self.variants[0]
        self.start_epoch, self.skip = self.resume()
        # data: one source for all variants (the first variant's normalisation: pairable configs
        # share model.arch's family? no — mean/std must agree, checked in check_pairable)
        factory = source_factory or (lambda c, dev, mean, std: FfcvSource(c, d, mean, std, v0.crop_pct,
                                                                        self.start_epoch, dtype))
        self.source = factory(cfg, d.device, v0.mean, v0.std)
        if len(self.source) == 0:
            raise ConfigError(f"data.train_dataset: {cfg['data.train_dataset']} gives no full batch of "
                              f"training.batch_size={cfg['training.batch_size']} per process")
        # threads: ffcv's Loader set torch's intra-op count to data.num_workers; we own it
        self.threads = cfg["training.threads"] or available_cores()
        torch.set_num_threads(self.threads)
        # why read it back: torch fixes a thread's count on its first use of it, from the last
        # value set anywhere; helper threads set 1 (one_torch_thread), so this thread must be first
        if torch.get_num_threads() != self.threads:
            raise RuntimeError(f"torch kept {torch.get_num_threads()} intra-op threads, not {self.threads}")
        self.overlap = overlap_mode(cfg["training.overlap"], hasattr(self.source, "take_turns"))
        if self.overlap == "none":
            self.source.take_turns()
        log.info(f"threads: torch {self.threads} intra-op, {decode_threads(cfg)} decode; overlap "
                 f"{self.overlap}: {OVERLAP_WORDS[self.overlap]} ({available_cores()} cores for this process)")
        if hasattr(self.source, "take_turns"):  # ffcv pipelines (final.json: jit_cache loaded/compiled)
            log.info(f"numba cache of the ffcv pipelines: {jit_cache_root() or 'off'} (${JIT_CACHE_ENV})")
        self.stop = StopSignal()
        if hasattr(self.source, "set_poll"):
            self.source.set_poll(self.poll_stop)
        self.last_save = time.monotonic()
        self.epoch_stats: dict = {}
        self.updates_done = 0  # updates stepped by this process (the cadence of host reads)
        means = {(tuple(v.mean), tuple(v.std), v.crop_pct) for v in self.variants}
        if len(means) > 1:
            raise ConfigError(f"paired variants normalise differently (mean, std, crop_pct): {sorted(means)}; "
                              "pair models of one family (the batches are prepared once for all)")

    # ------------------------------------------------------------------ resuming
    def resume(self) -> tuple[int, int]:
        """Load every active variant's ``last.pt`` (or ``prev.pt``) at one common position."""
        d = self.d
        states, positions, prevs = {}, {}, {}
        for v in self.variants:
            state = self.load_state(v, v.folder.last_pt)
            states[v.name] = state
            positions[v.name] = position(state) if state else None
            prev = ckpt.load(v.folder.prev_pt) if v.folder.prev_pt.is_file() else None
            prevs[v.name] = (position(prev), prev) if prev else None
        pos, choice = resume_position(positions, {n: p[0] for n, p in prevs.items() if p})
        seen = d.all_sum([float(pos is not None)])[0]
        if seen not in (0, d.world):
            raise ConfigError(f"{self.variants[0].folder.last_pt} is visible on {int(seen)} of {d.world} "
                              "processes: logging.folder must be on a filesystem shared by all nodes")
        if pos is None:
            for v in self.variants:
                self.maybe_from_best(v)
            return (self.variants[0].rows[-1]["epoch"] + 1 if self.variants[0].rows else 0), 0
        for v in self.variants:
            state = states[v.name] if choice[v.name] == "last" else prevs[v.name][1]
            self.check_same_run(v, state)
            v.restore(state)
        if d.main:
            for v in self.variants:
                v.folder.prev_pt.unlink(missing_ok=True)
        log.info(f"resuming from last.pt: epoch {pos[0]}, step {pos[1]}, update {self.variants[0].updates}")
        return pos

    def load_state(self, v: Variant, path: Path) -> dict | None:
        """``path``'s state, or None if absent; a damaged file per ``checkpoint.on_damaged``."""
        if not path.is_file():
            return None
        try:
            return ckpt.load(path)
        except ckpt.CheckpointError as e:
            mode = v.cfg["checkpoint.on_damaged"]
            if mode == "refuse" or e.kind == "unreadable":  # why: a permission problem is not damage
                raise ConfigError(f"{e}. Re-run with --checkpoint.on_damaged=fresh (start over) or "
                                  f"=best (start from best.pt); either moves the bad file aside") from None
            moved = ckpt.move_aside(path) if self.d.main else path
            log.warning(f"{path} is unusable ({e}); moved to {moved.name}; starting "
                        f"{'from best.pt' if mode == 'best' else 'fresh'}")
            v.start_from_best = mode == "best"
            return None

    def maybe_from_best(self, v: Variant) -> None:
        if getattr(v, "start_from_best", False) and v.folder.best_pt.is_file():
            best = ckpt.load(v.folder.best_pt)
            self.check_same_run(v, best)
            v.restore_weights(best)
            v.rows = [r for r in v.folder.read_rows() if r["epoch"] <= best["epoch"]]
            log.info(f"{v.name}: starting from best.pt (epoch {best['epoch']}) with a fresh optimizer")

    def check_same_run(self, v: Variant, state: dict) -> None:
        if not isinstance(state.get("config"), dict):
            raise ConfigError(f"{v.folder.last_pt}: not a fastvit-reduce checkpoint (no config)")
        diff = config_changes(state["config"], v.cfg)
        if state.get("world_size", self.d.world) != self.d.world:
            diff.append(f"number of processes: {state['world_size']} -> {self.d.world}")
        if diff:
            raise ConfigError(f"{v.folder.path} was written with a different configuration; use another "
                              "logging.experiment or restore these settings:\n  " + "\n  ".join(diff))

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        """Train the remaining epochs of every active variant; return the exit code."""
        cfg, d = self.cfg, self.d
        if d.main:
            for v in self.variants:
                v.folder.write_rows(v.rows)
        if self.start_epoch >= cfg["training.epochs"]:  # last.pt says done; final.json was lost
            for v in self.variants:
                v.exit_reason = "completed"
            self.save_last(self.start_epoch, 0, completed=True)
            return EXIT_OK
        names = ", ".join(v.name for v in self.variants)
        p = self.plan
        log.info(f"training {names}: epochs {self.start_epoch}..{cfg['training.epochs'] - 1} on {d.world} x "
                 f"{d.device.type}, per-GPU batch {p['per_gpu_batch']} x accumulation {p['accum']} x "
                 f"{d.world} = global batch {p['global_batch']}, peak lr {p['peak_lr']:g}")
        try:
            for epoch in range(self.start_epoch, cfg["training.epochs"]):
                self.train_epoch(epoch)
                last = epoch + 1 == cfg["training.epochs"]
                t_eval = time.monotonic()
                metrics = (self.evaluate() if self.source_has_val() and
                           ((epoch + 1) % cfg["validation.every_n_epochs"] == 0 or last) else {})
                self.end_epoch(epoch, metrics, eval_s=time.monotonic() - t_eval)
                if not any(v.active for v in self.variants):
                    break
                if not last and d.all_sum([float(self.stop.received is not None)])[0]:
                    raise Preempted
        except Preempted as e:
            how = "last.pt holds the state" if e.saved else "last.pt holds the last saved state"
            log.info(f"stopped by signal {self.stop.received}; {how}; re-run the same command to resume")
            return EXIT_PREEMPTED
        finally:
            self.stop.restore()
            if hasattr(self.source, "close"):
                self.source.close()
        bad = [v for v in self.variants if v.exit_reason and v.exit_reason != "completed"]
        for v in bad:
            if d.main:
                print(f"error: {v.name}: {v.exit_reason}", file=sys.stderr)
        log.info(f"done: {cfg['training.epochs']} epochs, {self.elapsed(self.variants[0]):.0f} s; results in "
                 + ", ".join(str(v.folder.path / "final.json") for v in self.variants))
        return EXIT_CRASH if bad and len(bad) == len(self.variants) else EXIT_OK

    def source_has_val(self) -> bool:
        return bool(getattr(self.source, "has_val", True))

    def poll_stop(self) -> None:
        """While waiting for data: a stop signal ends the wait (the last saved state stands)."""
        if self.stop.received is not None:
            raise Preempted(saved=False)

    def train_epoch(self, epoch: int) -> None:
        """One epoch (or its rest after a mid-epoch resume): for each batch, each variant steps."""
        cfg, d = self.cfg, self.d
        accum, n = self.plan["accum"], len(self.source)
        skip, self.skip = self.skip, 0
        carry = self.epoch_stats if skip else {}
        s = {"wait_s": carry.get("wait_s", 0.0), "images": carry.get("images", 0),
             "wall_s": carry.get("wall_s", 0.0)}
        if not skip:
            for v in self.variants:
                v.reset_epoch_sums()
        t_begin = time.monotonic() - s["wall_s"]
        for v in self.variants:
            v.model.train()
        self.epoch_stats = s
        bar = tqdm(total=n, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not (d.main and cfg["logging.progress"]))
        make = lambda: self.source.epoch(epoch, skip) if skip else self.source.epoch(epoch)  # noqa: E731
        batches = Ahead(make, poll=self.poll_stop) if self.overlap == "ahead" else InPlace(make())
        every = cfg["logging.every_steps"]
        try:
            for i in range(skip, n):
                t0 = time.monotonic()
                try:
                    item = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the train loader ended after {i} of {n} batches") from None
                x, y, ready = item if len(item) == 3 else (*item, None)
                s["wait_s"] += time.monotonic() - t0
                if ready is not None:
                    main_stream = torch.cuda.current_stream(d.device)
                    main_stream.wait_event(ready)
                    for t in (x, y):  # allocated on the side stream, used on this one
                        t.record_stream(main_stream)
                if self.variants[0].first_batch_hash is None and epoch == 0 and i == 0:
                    h = tensor_hash(x, y)
                    for v in self.variants:
                        v.first_batch_hash = h
                group_start = i - i % accum
                group = min(accum, n - group_start)  # a short last group at the epoch end
                update = i + 1 == group_start + group
                for v in self.variants:
                    if not v.active:
                        continue
                    # drop-path/dropout: the same stream for every variant and every rerun
                    torch.manual_seed(derive(cfg["training.seed"], "model", epoch, i, d.rank))
                    v.micro_step(x, y, update=update, group=group)
                    if update:
                        v.optimizer_step(v.lr(epoch + (i + 1) / n))
                del x, y
                s["images"] += cfg["training.batch_size"]
                bar.update(1)
                self.updates_done += update
                if update and i + 1 < n and self.updates_done % every == 0:
                    s["wall_s"] = time.monotonic() - t_begin
                    self.between_updates(epoch, i + 1, bar)
        finally:
            batches.close()
            bar.close()
        s["wall_s"] = time.monotonic() - t_begin

    def between_updates(self, epoch: int, step: int, bar) -> None:
        """Every ``logging.every_steps`` updates: one agreement of all ranks on stopping and on the
        periodic save, the loss read back for the progress bar, non-finite variants stopped."""
        minutes = self.cfg["checkpoint.every_minutes"]
        due = self.d.main and minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        stop, due = self.d.all_sum([float(self.stop.received is not None), float(due)])
        self.check_nonfinite(epoch)
        v = self.variants[0]
        bar.set_postfix(loss=f"{float(v.loss_sum / v.loss_n.clamp(min=1)):.3f}", refresh=False)
        if stop or due:
            self.save_last(epoch, step)
        if stop:
            raise Preempted

    def check_nonfinite(self, epoch: int) -> None:
        """Stop each variant whose loss was non-finite for ``training.max_nonfinite`` updates in a row."""
        for v in self.variants:
            if v.active and float(v.consecutive_bad) >= v.cfg["training.max_nonfinite"]:
                v.active = False
                v.exit_reason = (f"non-finite loss for {int(v.consecutive_bad)} consecutive updates "
                                 f"(update {v.updates}, epoch {epoch}); stopped; lower optim.lr, raise "
                                 f"lr.warmup_epochs, set training.clip_grad or training.amp=bf16")
                log.error(f"error: {v.name}: the loss was not finite for {int(v.consecutive_bad)} "
                          f"consecutive updates; this variant stops, the others go on")
                if self.d.main:
                    v.folder.write_final(self.final(v, completed=False, ranks_in_sync=True))

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict]:
        """Top-1/top-5 (%) and loss of each active variant's model and EMA over the whole val set."""
        d = self.d
        models = []  # (variant, prefix, module)
        for v in self.variants:
            if not v.active:
                continue
            models.append((v, "raw_", v.model))
            if v.ema is not None and v.cfg["ema.eval"]:
                models.append((v, "ema_", v.ema.module))
        for _, _, m in models:
            m.eval()
        k = min(5, self.cfg["model.num_classes"])
        sums = torch.zeros(3 * len(models) + 1, dtype=torch.float64, device=d.device)  # top1, top5, loss
        amp = self.variants[0].amp_dtype
        for x, labels in self.source.val():
            for j, (v, _, m) in enumerate(models):
                with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
                    logits = m(x)
                top = logits.topk(k, dim=1).indices  # (B, k)
                hit = top == labels[:, None]
                sums[3 * j] += hit[:, 0].sum()
                sums[3 * j + 1] += hit.any(dim=1).sum()
                sums[3 * j + 2] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            sums[-1] += len(labels)
        if d.world > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        out: dict[str, dict] = {}
        for v in self.variants:
            v.model.train()
        for j, (v, prefix, m) in enumerate(models):
            n = max(sums[-1], 1)
            out.setdefault(v.name, {"val_images": int(sums[-1])}).update({
                f"{prefix}top_1": 100 * sums[3 * j] / n, f"{prefix}top_5": 100 * sums[3 * j + 1] / n,
                f"{prefix}loss": sums[3 * j + 2] / n})
        return out

    # ------------------------------------------------------------------ logging and saving
    def end_epoch(self, epoch: int, metrics: dict, eval_s: float) -> None:
        """Per variant: log the row (EMA first, as timm), best.pt on a new best, last.pt, final.json."""
        d, cfg, s = self.d, self.cfg, self.epoch_stats
        self.check_nonfinite(epoch)
        r = lambda v, digits: None if v is None else round(v, digits)  # noqa: E731 — readable logs
        in_sync = self.ranks_in_sync()
        completed = epoch + 1 == cfg["training.epochs"]
        for v in self.variants:
            if not v.active and v.exit_reason:
                continue
            m = metrics.get(v.name, {})
            head = "ema_" if "ema_top_1" in m else "raw_"
            loss_sum, loss_n = d.all_sum([float(v.loss_sum), float(v.loss_n)])
            row = {"epoch": epoch, "train_loss": r(loss_sum / max(loss_n, 1), 5),
                   "eval_loss": r(m.get(f"{head}loss"), 5), "eval_top1": r(m.get(f"{head}top_1"), 3),
                   "eval_top5": r(m.get(f"{head}top_5"), 3), "lr": v.lr_sum / max(v.lr_n, 1),
                   **{f"{p}{k}": r(m.get(f"{p}{k}"), 5 if k == "loss" else 3)
                      for p in ("raw_", "ema_") for k in ("top_1", "top_5", "loss")},
                   "val_images": m.get("val_images"), "res": train_res(cfg, epoch), "updates": v.updates,
                   "epoch_time_s": r(s["wall_s"] + eval_s, 3), "train_time_s": r(s["wall_s"], 3),
                   "train_img_s": r(s["images"] * d.world / max(s["wall_s"], 1e-9), 1),
                   "data_wait_frac": r(s["wait_s"] / max(s["wall_s"], 1e-9), 4),
                   "peak_mem_mb": r(peak_mem_mb(d.device), 1),
                   "weights_hash": weights_hash(v.model.state_dict())}
            v.rows.append(row)
            fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
            log.info(f"{v.name} epoch {epoch}: loss {row['train_loss']:.4f} top-1 {fmt(row['eval_top1'], '.2f')}"
                     f"{' (EMA)' if head == 'ema_' else ''} raw {fmt(row['raw_top_1'], '.2f')} "
                     f"lr {row['lr']:.2e} {row['train_img_s']:.0f} img/s wait {row['data_wait_frac']:.1%} "
                     f"{row['epoch_time_s']:.1f} s")
            top1 = row["eval_top1"]
            if top1 is not None and (v.best is None or top1 > v.best):
                v.best = top1
                if cfg["checkpoint.save_best"]:
                    self.save(v.folder.best_pt, lambda v=v: {
                        "format": 2, "model": v.model.state_dict(), "epoch": epoch, "top_1": top1,
                        "headline": head.rstrip("_"),
                        "ema": None if v.ema is None else v.ema.state_dict(), "config": v.cfg})
            if completed:
                v.exit_reason = "completed"
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        if not in_sync:
            log.warning(f"epoch {epoch}: ranks hold different weights")
        self.save_last(epoch + 1, 0, completed=completed, in_sync=in_sync)

    def save_last(self, epoch: int, step: int, completed: bool = False, in_sync: bool = True) -> None:
        """Write every active variant's ``last.pt`` at (``epoch``, ``step``), then their final.json.

        Paired: each old last.pt becomes prev.pt first; prev.pt files are deleted once all are
        written, so kill -9 mid-way leaves every variant able to go back to one common position."""
        d = self.d
        live = [v for v in self.variants if v.active or not v.saved_final]
        paired = len(live) > 1
        for v in live:
            if paired and d.main and v.folder.last_pt.is_file():
                os.replace(v.folder.last_pt, v.folder.prev_pt)
            self.save(v.folder.last_pt, lambda v=v: v.state(epoch, step, self))
        if d.main:
            for v in live:
                v.folder.prev_pt.unlink(missing_ok=True)
                v.folder.write_rows(v.rows)
                v.folder.write_final(self.final(v, completed=completed, ranks_in_sync=in_sync))
        for v in live:
            v.saved_final = not v.active or v.exit_reason == "completed"
        self.last_save = time.monotonic()
        if step:
            log.info(f"saved last.pt at epoch {epoch} step {step}")

    def save(self, path: Path, make_state) -> None:
        """Rank 0 writes ``make_state()`` atomically; every rank learns whether it worked."""
        error = None
        if self.d.main:
            try:
                ckpt.save(make_state(), path)
            except ckpt.CheckpointError as e:
                error = e
        if self.d.all_sum([float(error is not None)])[0]:
            raise error or ckpt.CheckpointError(f"rank 0 could not write {path}")

    def ranks_in_sync(self) -> bool:
        """True when every rank holds bit-identical weights (per-tensor sums agree exactly)."""
        if self.d.world == 1:
            return True
        params = [p for v in self.variants for p in v.model.parameters()]
        sums = torch.stack([p.detach().double().sum() for p in params]
                           + [p.detach().double().abs().sum() for p in params])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def elapsed(self, v: Variant) -> float:
        """Wall seconds spent on this run over all the processes that resumed it."""
        return v.elapsed_before + time.monotonic() - self.t_start

    def final(self, v: Variant, completed: bool, ranks_in_sync: bool) -> dict:
        """The ``final.json`` summary: headline top-1 (EMA's when EMA is evaluated), raw next to it."""
        cfg, rows = v.cfg, v.rows
        col = lambda k: [r[k] for r in rows if r.get(k) is not None]  # noqa: E731
        head, raw, ema = col("eval_top1"), col("raw_top_1"), col("ema_top_1")
        train_s = sum(r["train_time_s"] for r in rows)
        weighted = lambda k: sum(r[k] * r["train_time_s"] for r in rows) / max(train_s, 1e-9)  # noqa: E731
        reason = v.exit_reason or ("completed" if completed else "running")
        return {"experiment": v.name, "strategy": cfg["reduction.strategy"], "arch": cfg["model.arch"],
                "img_size": cfg["model.img_size"], "epochs": cfg["training.epochs"], **v.stats,
                "top_1": head[-1] if head else None, "best_top_1": max(head, default=None),
                "final_top_1": head[-1] if head else None,
                "headline": "ema" if ema and cfg["ema.eval"] else "raw",
                "raw_best_top_1": max(raw, default=None), "raw_final_top_1": raw[-1] if raw else None,
                "best_ema_top_1": max(ema, default=None), "final_ema_top_1": ema[-1] if ema else None,
                "total_time_s": self.elapsed(v), "train_img_s": weighted("train_img_s"),
                "data_wait_frac": weighted("data_wait_frac"),
                "completed": completed and reason == "completed", "exit_reason": reason,
                "weights_hash": rows[-1]["weights_hash"] if rows else None,
                "first_batch_hash": v.first_batch_hash, "epochs_done": len(rows), "updates": v.updates,
                "world_size": self.d.world, **{k: self.plan[k] for k in ("global_batch", "accum", "per_gpu_batch")},
                "peak_lr": v.plan["peak_lr"], "startup_s": getattr(self, "startup_s", None),
                "torch_threads": self.threads,  # CPU results are bit-exact only at one count
                "jit_cache": jit_stats(),  # this process's ffcv pipelines: loaded / compiled
                "ranks_in_sync": ranks_in_sync, "paired_with": [w.name for w in self.variants if w is not v]}


# ----------------------------------------------------------------------------- checks
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
    """User errors worth catching before any work: missing or damaged datasets, labels beyond
    ``model.num_classes``, CUDA asked for but absent, an impossible resolution schedule."""
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
    for key in ("data.train_dataset", "data.val_dataset"):
        if cfg[key]:
            verify_beton(cfg[key])  # header, tables, page boundaries: a damaged file is refused here
            lo, hi, _ = label_range(cfg[key])  # from the file itself (.classes.json may be missing)
            if lo < 0 or hi >= cfg["model.num_classes"]:
                raise ConfigError(f"{key}: {cfg[key]} holds labels {lo}..{hi}, but model.num_classes="
                                  f"{cfg['model.num_classes']} (labels must be 0..num_classes-1)")
    if cfg["training.device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda, but torch sees no CUDA device")


def check_pairable(cfgs: list[dict], names: list[str]) -> None:
    """``ConfigError`` naming every key that differs between paired configs but shapes the batches."""
    base = cfgs[0]
    problems = []
    for c, name in zip(cfgs[1:], names[1:]):
        diff = [k for k in sorted(set(base) | set(c)) if base.get(k) != c.get(k)
                and (not k.startswith(PER_VARIANT) or k in SHARED_MODEL_KEYS)]
        if diff:
            problems.append(f"{name} vs {names[0]}: " + ", ".join(f"{k} ({base.get(k)!r} vs {c.get(k)!r})"
                                                                 for k in diff))
    if len(set(names)) != len(names):
        problems.append(f"two variants would share a run folder: {names} (set logging.experiment)")
    if problems:
        raise ConfigError("these configs cannot be paired: they must agree on everything that shapes "
                          "the batches (data, resolution, augmentation, batch sizes, epochs, seed, "
                          "device, AMP, logging folder):\n  " + "\n  ".join(problems))


def experiment_name(cfg: dict, config_files: list[str]) -> str:
    name = cfg["logging.experiment"] or (Path(config_files[-1]).stem if config_files else cfg["reduction.strategy"])
    return check_experiment_name(name)


# ----------------------------------------------------------------------------- entry point
def split_argv(argv: list[str]) -> tuple[list[list[str]], dict]:
    """Split the command line into one argv per variant (``--pair-with B.yaml C.yaml`` adds
    variants; other arguments apply to all) and the options of this entry point."""
    opts = {"dry_run": False, "world_size": None, "part": None}
    shared, first, others, i = [], [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--dry-run":
            opts["dry_run"] = True
        elif a.startswith("--pair-part"):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            part = re.fullmatch(r"(\d+)/(\d+)", value)
            if not part or not 1 <= int(part[1]) <= int(part[2]):
                raise ConfigError(f"--pair-part needs I/N with 1 <= I <= N (e.g. 1/2), got {value!r}")
            opts["part"] = (int(part[1]), int(part[2]))
        elif a.startswith("--world-size"):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size needs a positive integer, got {value!r}")
            opts["world_size"] = int(value)
        elif a == "--pair-with":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                others.append(argv[i])
                i += 1
            if not others:
                raise ConfigError("--pair-with needs one or more config files")
            continue
        elif a in ("--config", "-C") and i + 1 < len(argv):
            first += [a, argv[i + 1]]
            i += 1
        elif a.startswith("--config="):
            first.append(a)
        else:
            shared.append(a)
        i += 1
    variants = [first + shared] + [["--config", f] + shared for f in others]
    return variants, opts


def config_files(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a in ("--config", "-C") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def print_plan(cfgs: list[dict], names: list[str], world: int) -> None:
    """``--dry-run``: the resolved plan of every variant as a table and as JSON."""
    from .models import mlp_stats as stats_of
    cfg = cfgs[0]
    p = batch_plan(cfg, world)
    try:
        n = check_beton(cfg["data.train_dataset"]) if cfg["data.train_dataset"] else None
    except ConfigError:
        n = None
    upe = math.ceil(batches_per_epoch(cfg, world, n) / p["accum"]) if n else None
    store = stored_size(cfg["data.train_dataset"]) if n else None
    plans = []
    for c, name in zip(cfgs, names):
        vp = batch_plan(c, world)
        with torch.device("meta"):  # shapes only: ViT-B's parameters counted without allocating them
            model = model_from_cfg(c)
        plans.append({"experiment": name, **vp, "updates_per_epoch": upe, "epochs": c["training.epochs"],
                      "train_images": n, "stored_long_side_px": store and store["median_long_side"],
                      "stored_short_side_px": store and store["median_short_side"],
                      "train_res_px": sorted(train_resolutions(c)),
                      "val_res_px": c["validation.resolution"] or c["model.img_size"],
                      "strategy": c["reduction.strategy"], "arch": c["model.arch"],
                      "params": stats_of(model)["params"], "weight_decay": c["optim.weight_decay"],
                      "warmup_epochs": c["lr.warmup_epochs"], "drop_path": c["model.drop_path"],
                      "ema_decay": c["ema.decay"], "randaugment": c["augment.randaugment"],
                      "mixup": c["augment.mixup"], "cutmix": c["augment.cutmix"], "reprob": c["augment.reprob"],
                      "aug_repeats": c["augment.aug_repeats"], "amp": c["training.amp"],
                      "knobs": {f"reduction.{k}": c[f"reduction.{k}"]
                                for k in getattr(STRATEGIES.get(c["reduction.strategy"]), "knobs", {})}})
    keys = ["world", "per_gpu_batch", "accum", "global_batch", "peak_lr", "updates_per_epoch", "epochs",
            "train_images", "stored_long_side_px", "train_res_px", "val_res_px", "strategy", "params"]
    width = max(map(len, keys))
    print(f"{'':{width}}  " + "  ".join(f"{pl['experiment']:>16}" for pl in plans))
    cell = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    for k in keys:
        print(f"{k:{width}}  " + "  ".join(f"{cell(pl[k]):>16}" for pl in plans))
    print("plan (JSON):")
    print(json.dumps(plans, indent=1, default=str))


def prepare_folder(f: RunFolder, cfg: dict) -> bool:
    """Rank 0: create and lock the run folder; False when there is nothing to train in it
    (finished with the same config, or stopped on a non-finite loss)."""
    f.create()
    warning = f.lock()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    ckpt.clean_stale_tmp(f.path)
    final = f.read_final() or {}
    if final.get("completed"):
        diff = config_changes((f.read_params() or {}).get("config", cfg), cfg)
        if diff:
            raise ConfigError(f"{f.path} is a finished run with a different configuration; use another "
                              "logging.experiment or restore:\n  " + "\n  ".join(diff))
        print(f"{f.path} is already complete ({cfg['training.epochs']} epochs); nothing to do")
        return False
    if str(final.get("exit_reason", "")).startswith("non-finite"):
        print(f"{f.path} stopped on a non-finite loss; skipping it (delete the folder to train it again)")
        return False
    return True


def broadcast(d: Dist, values: list[bool]) -> list[bool]:
    """Rank 0's list of flags, on every rank."""
    if d.world == 1:
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_variants(argv: list[str], whole: bool = False) -> list[tuple[dict, str]]:
    """(resolved config, run folder name) of every variant the command line asks this process to
    train (with ``--pair-part I/N``: variants I, I+N, I+2N, ... of the pair, counting from 1;
    ``whole``: all of them), every variant of the pair checked to be pairable; ``ConfigError``
    naming the problem otherwise. ``sweep`` uses it too."""
    argvs, opts = split_argv(argv)
    out = []
    for a in argvs:
        load_config(a, SECTIONS)
        cfg = resolved(SECTIONS)
        out.append((cfg, experiment_name(cfg, config_files(a))))
    check_pairable([c for c, _ in out], [n for _, n in out])
    return out if whole else select_part(out, opts["part"])


def select_part(variants: list, part: tuple[int, int] | None) -> list:
    """``--pair-part I/N``: variants I, I+N, I+2N, ... (counting from 1); all of them for None."""
    if part is None:
        return variants
    i, n = part
    if n > len(variants):
        raise ConfigError(f"--pair-part {i}/{n}: the pair has only {len(variants)} variant(s); "
                          f"use at most {len(variants)} parts")
    return variants[i - 1::n]


def main(argv: list[str], source_factory=None) -> int:
    """Parse ``argv`` (``--config FILE`` ... ``--pair-with B.yaml ...`` ``--section.key=value`` ...),
    train, return the exit code: 0 done (or already complete), 1 crash / non-finite loss in every
    variant / unwritable checkpoint / dead loader, 2 configuration or user error, 124 preempted.

    ``source_factory(cfg, device, mean, std)`` replaces the FFCV data source (``bench e2e`` runs
    timm's own loader through the same loop)."""
    rank0 = int(os.environ.get("RANK", 0)) == 0

    def fail(msg, code=EXIT_USER):
        if rank0:
            print(f"error: {msg}", file=sys.stderr)
        return code

    if {"-h", "--help"} & set(argv):
        print(__doc__)
        for key, p in sorted(declared_keys(SECTIONS).items()):
            print(f"  --{key}={p.default!r}  {p.desc} [{p.checker.help()}]")
        return EXIT_OK
    try:
        _, opts = split_argv(argv)
        pair = resolve_variants(argv, whole=True)
        pair_names = [n for _, n in pair]  # the whole pair, also what other processes train
        cfgs, names = map(list, zip(*select_part(pair, opts["part"])))
        world = opts["world_size"] or int(os.environ.get("WORLD_SIZE", 1))
        for c in cfgs:
            batch_plan(c, world)
        if opts["dry_run"]:
            print_plan(cfgs, names, world)
            return EXIT_OK
        if source_factory is None:
            check_inputs(cfgs[0])
    except (ConfigError, StrategyError) as e:
        return fail(e)
    d = None
    folders: list[RunFolder] = []
    try:
        d = Dist(cfgs[0]["training.device"])
        folders = [RunFolder(Path(c["logging.folder"]) / n) for c, n in zip(cfgs, names)]
        # rank 0 alone looks at the folders; all ranks then act on the same verdicts
        verdicts, error = [], None
        if d.main:
            try:
                verdicts = [prepare_folder(f, c) for c, f in zip(cfgs, folders)]
            except (ConfigError, RunFolderError) as e:
                error = e
        if d.all_sum([float(error is not None)])[0]:
            raise error or ConfigError("rank 0 refused the run folder (its message is above)")
        verdicts = broadcast(d, verdicts)
        todo = [(c, f) for c, f, ok in zip(cfgs, folders, verdicts) if ok]
        if not todo:
            return EXIT_OK
        cfgs = [c for c, _ in todo]
        folders = [f for _, f in todo]
        setup_logging([f.path for f in folders] if d.main else None)
        trainer = Trainer(cfgs, argv, d, folders, source_factory)
        if d.main:
            for v in trainer.variants:
                info = run_info(v.cfg, argv, d.world)
                # the whole pair, also the variants other processes train (--pair-part)
                info["pair"] = {"variants": pair_names, "baseline": pair_names[0]} \
                    if len(pair_names) > 1 else None
                info["plan"] = v.plan
                v.folder.write_params(info)
            for w in resolution_warnings(cfgs[0], trainer.variants[0].crop_pct,
                                         stored_size(cfgs[0]["data.train_dataset"]) if source_factory is None else None,
                                         stored_size(cfgs[0]["data.val_dataset"]) if source_factory is None and cfgs[0]["data.val_dataset"] else None):
                log.warning(f"warning: {w}")
        trainer.startup_s = round(process_age(), 2)
        return trainer.run()
    except (ConfigError, StrategyError, RunFolderError) as e:
        return fail(e)
    except ckpt.CheckpointError as e:  # every rank raises these together
        if rank0:
            log.error(f"error: {e}")
        return fail(e, EXIT_CRASH)
    except LoaderError as e:  # a dead decode thread: a fault, named, not a hang
        if rank0:
            log.error(f"error: {e}")
        return fail(e, EXIT_CRASH)
    except Exception:
        log.exception("training crashed")
        raise
    finally:
        for f in folders:
            f.unlock()
        close_logging()
        if dist.is_initialized():
            dist.destroy_process_group()
