"""Child processes of sweeps and benchmarks: started pinned to cores, ended with their parent.

``split_cores(N)`` cuts this process's cores into N disjoint sets; ``launch(cmd, cpus=...)`` starts
a child in its own session, pinned to a set, with ``PR_SET_PDEATHSIG`` so a kill -9 of the parent
does not leave it running (a sweep re-run would otherwise race it for the same run folder);
``run_logged`` runs one such child to its end with its output in a file, and times it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastvit_reduce.config import UsageError


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: signal this process gets when its parent thread dies


def launch(cmd: list[str], cpus: list[int] | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start a job in its own process group that dies with the sweep.

    Own session: a Ctrl-C in the terminal reaches the job only through the sweep, once, as SIGTERM
    (see ``Runner.stop``). ``PR_SET_PDEATHSIG=SIGTERM`` (Linux): if the sweep is kill -9'd, the job
    (torchrun, which forwards SIGTERM to its trainers, which save ``last.pt``) is ended instead of
    living on re-parented to init and racing a re-run sweep for the same run folder.
    ``cpus``: pin the job (and what it starts) to these cores; the trainer sizes its torch and
    decode threads from its CPU affinity.
    """
    preexec = None
    if sys.platform.startswith("linux"):
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # why look up now: no dlopen after fork
        parent = os.getpid()

        def preexec() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the sweep died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec, **popen_kwargs)


def run_logged(cmd: list[str], log: str | Path, cpus: list[int] | None = None,
               env: dict | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` (``launch``ed) to its end, stdout and stderr into the file ``log``; return its exit
    code, wall seconds and CPU seconds (``rusage`` of it and the children it waited for, such as
    DataLoader workers)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = launch(cmd, cpus=cpus, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return proc.returncode, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def split_cores(slots: int, gpus: bool) -> list[list[int]]:
    """``--cpu-slots N``: this process's cores (its affinity) in N disjoint, contiguous sets."""
    if slots < 1:
        raise UsageError(f"--cpu-slots must be >= 1, got {slots}")
    if slots > 1 and gpus:
        raise UsageError("--cpu-slots is for CPU sweeps; with --gpus the jobs run one per GPU slot")
    cores = sorted(os.sched_getaffinity(0))
    if slots > len(cores):
        raise UsageError(f"--cpu-slots {slots}: this sweep may use only {len(cores)} core(s) "
                         f"({','.join(map(str, cores))})")
    cut = [round(i * len(cores) / slots) for i in range(slots + 1)]
    return [cores[a:b] for a, b in zip(cut, cut[1:])]
