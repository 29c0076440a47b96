"""fastvit_reduce.runtime: a stop signal is remembered (and the old handler restored), not fatal."""
from __future__ import annotations

import os
import signal

import pytest

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
