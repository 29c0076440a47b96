"""A variant's own compute time: its forward, backward and optimizer step, nothing else.

In a paired run every variant shares one wall clock (the same batches, the same epochs), so wall
time says nothing about which strategy is cheaper; what differs is the time each variant's own
work takes. ``ComputeTimer`` brackets a variant's step:

* CUDA: two events per step, recorded on the current stream (no host sync); the host reads them
  only at log points (``read``), where the trainer already waits for the device. The events
  measure the device time between the variant's first and last kernel of the step, so work of the
  other variants or of the data stream is not counted.
* CPU: kernels run synchronously, so a host timer around the step measures the same thing.
"""
from __future__ import annotations

import time

import torch


class ComputeTimer:
    """Seconds a variant spent in its own steps this epoch (``start``/``stop`` around each step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: not read yet
        self.epoch_s = 0.0
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._start, end))
        else:
            self.epoch_s += time.perf_counter() - self._start
        self._start = None

    def read(self) -> float:
        """Seconds of this epoch's steps so far. On CUDA this waits for the last recorded step to
        finish on the device: call it at log points only."""
        if self.pending:
            self.pending[-1][1].synchronize()
            self.epoch_s += sum(s.elapsed_time(e) for s, e in self.pending) / 1000  # ms -> s
            self.pending.clear()
        return self.epoch_s

    def reset(self, carried_s: float = 0.0) -> None:
        """A new epoch (or the rest of one resumed mid-way, with the seconds it had already)."""
        self.pending.clear()
        self.epoch_s = float(carried_s)
