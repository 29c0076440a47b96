"""fastvit_reduce.procs: a launched job dies with its parent (PR_SET_PDEATHSIG)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_kill_9_of_the_sweep_ends_its_job():
    """A job outliving a kill -9'd sweep would race the re-run sweep for its run folder."""
    parent_code = ("import sys, time; from fastvit_reduce.sweep import launch; "
                   "p = launch([sys.executable, '-c', 'import time; time.sleep(120)']); "
                   "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20  # a liveness deadline, not a timing assertion
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), "the job survived the sweep"
    finally:
        parent.kill()
        if "child" in locals() and not _gone(child):
            os.kill(child, signal.SIGKILL)
