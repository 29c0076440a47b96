"""ComputeTimer: a variant's own step time, host timer on CPU, CUDA events read at log points."""
from __future__ import annotations

import time

import pytest
import torch

from fastvit_reduce.steptime import ComputeTimer


def test_cpu_timer_counts_only_the_bracketed_work_and_carries_over_a_resume():
    t = ComputeTimer(torch.device("cpu"))
    t.start()
    time.sleep(0.05)
    t.stop()
    time.sleep(0.05)  # between steps: another variant's turn, not counted
    assert 0.04 < t.read() < 0.09
    t.reset(1.5)  # resumed mid-epoch with 1.5 s already spent
    assert t.read() == 1.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timer_records_events_without_waiting_and_reads_them_later():
    t = ComputeTimer(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        t.start()
        for _ in range(10):
            x = x @ x / 2048
        t.stop()
    assert len(t.pending) == 3 and t.epoch_s == 0.0  # nothing read back yet
    assert t.read() > 0 and not t.pending
