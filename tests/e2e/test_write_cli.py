"""``fastvit-reduce write`` killed (SIGKILL) or interrupted (SIGINT, SIGTERM) mid-write, in a forked
process: the old .beton stays intact, no writer worker outlives it, no partial file is left."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from test_write import imagenet, write_args  # noqa: F401 — the quirky ImageFolder fixture (tests/test_write.py)

from fastvit_reduce.data import write


def _open_by_anyone(path: Path) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
        except OSError:
            continue
    return False


def _slow_write(argv: list[str], log: Path) -> None:
    """Child-process body: ``write.main`` with a slow decode (~0.4 s per image, like a slow disk).

    Forked from pytest rather than started fresh: a new interpreter spends 6+ s importing ffcv.
    """
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    # a command in a terminal: Ctrl-C raises KeyboardInterrupt (pytest may run as a shell's background
    # job, whose children inherit SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    decode = write.load_rgb
    write.load_rgb = lambda path, max_res: (time.sleep(0.4), decode(path, max_res))[1]
    os._exit(write.main(argv))


def test_killed_write_leaves_old_file_intact(imagenet, tmp_path):
    import multiprocessing as mp
    root, good = imagenet
    out, log = tmp_path / "train.beton", tmp_path / "log.txt"
    out.write_bytes(b"previous dataset")

    def start_and_wait_for_partial():
        proc = mp.get_context("fork").Process(target=_slow_write, args=(write_args(root, out), log))
        proc.start()
        deadline = time.time() + 30
        while not (tmp_path / f"train.beton.partial-{proc.pid}").exists():
            assert proc.is_alive() and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are now decoding and writing pages
        return proc

    proc = start_and_wait_for_partial()
    proc.kill()  # SIGKILL: no clean-up possible in the main process
    proc.join()
    [partial] = tmp_path.glob("train.beton.partial-*")
    deadline = time.time() + 10
    while _open_by_anyone(partial):  # the workers die with their parent (PR_SET_PDEATHSIG)
        assert time.time() < deadline, "writer workers outlived the killed main process"
        time.sleep(0.2)
    assert out.read_bytes() == b"previous dataset"

    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, a scheduler's kill: clean up, exit 130
        proc = start_and_wait_for_partial()  # the first one also removes the stale partial file
        os.kill(proc.pid, sig)
        proc.join(30)
        err = log.read_text()
        assert proc.exitcode == 130 and "interrupted: nothing written" in err, err
        assert ("left by an interrupted write" in err) == (sig == signal.SIGINT)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "train.beton"]
        assert out.read_bytes() == b"previous dataset"

    assert write.main(write_args(root, out)) == 0  # a complete write replaces it
    assert json.loads(Path(f"{out}.report.json").read_text())["written"] == len(good)
