"""fastvit_reduce.runtime: a stop signal is remembered (and the old handler restored), not fatal;
what a second process on a node changes (torchrun --nproc-per-node=2: tests/e2e/ runs two nodes)."""
from __future__ import annotations

import os
import signal

import pytest

from fastvit_reduce import runtime
from fastvit_reduce.runtime import StopSignal


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


def test_the_second_process_of_a_node_takes_its_share_of_cores_and_the_next_gpu(monkeypatch):
    import numba
    import torch
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.available_cores() == 8 and runtime.decode_threads({"data.num_workers": 0}) == 8
    assert runtime.decode_threads({"data.num_workers": 3}) == 3  # a set value is kept
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group in this test
    d = runtime.Dist("cuda")
    assert chosen == [1] and d.device == torch.device("cuda", 1) and not d.main
