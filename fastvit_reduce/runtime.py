"""This process: rank and device, numerics, cores and threads, stop signals, logging, run info, exit codes.

Everything here is about the process the trainer runs in, not about the recipe: ``Dist`` (torchrun's
env:// rank, world and device), ``set_numerics`` (TF32 or deterministic kernels), how many cores
this process may use and how many ffcv decode threads that gives, the signals that stop a run
with ``last.pt`` written, the ``fastvit_reduce`` logger, and ``params.json``'s record of the run.
"""
from __future__ import annotations

import logging
import os
import platform
import resource
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_OK, EXIT_CRASH, EXIT_USER, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 1, 2, 124, 130
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # training.amp -> autocast dtype ("off": none)
log = logging.getLogger("fastvit_reduce")


class Preempted(Exception):
    """SIGTERM/SIGUSR1/SIGINT arrived (``saved`` tells whether ``last.pt`` holds this position)."""

    def __init__(self, saved: bool = True):
        super().__init__()
        self.saved = saved


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
    import numba  # numba's own cap: it refuses more threads than NUMBA_NUM_THREADS (the cores at import)
    return cfg["data.num_workers"] or min(available_cores(), numba.config.NUMBA_NUM_THREADS)


def process_age() -> float:
    """Seconds since this process started (Linux /proc), for the start-up time."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (cluster preemption) and SIGINT (Ctrl-C) until the loop can save
    and stop; a second Ctrl-C raises ``KeyboardInterrupt`` at once (a save it interrupts removes
    its temporary file, so ``last.pt`` stays the previous one)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # the first stop signal
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C (the shell's convention), 124 after a scheduler's signal."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

    @property
    def name(self) -> str:
        return "Ctrl-C (SIGINT)" if self.received == signal.SIGINT else f"signal {int(self.received)}"

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
                         "timm": _version("timm"), "ffcv": _version("ffcv"),
                         "numpy": _version("numpy")},
            "git": {"revision": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
            "host": platform.node()}


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _version(package: str) -> str:
    """An installed distribution's version, without importing it ('?' when absent)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
