"""Checkpoints that survive kill -9, full disks and untrusted files.

* ``save(state, path)`` writes to a temporary file in the same folder, fsyncs it, renames it over
  ``path`` and fsyncs the folder: a reader sees the old file or the new one, never half of one.
  If the disk is full the temporary file is removed and the previous checkpoint stays intact.
* Only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None) may be
  saved, so every checkpoint loads with ``torch.load(weights_only=True)``; ``load`` refuses files
  that would need arbitrary pickles.
* ``rng_state()`` / ``set_rng_state()`` capture python, numpy, torch and CUDA generators as
  plain values.
* ``config_diff()`` names the keys in which a resumed run's config differs from the saved one.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""


_PLAIN = (str, int, float, bool, type(None))


def check_plain(obj, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first value that is not a tensor or plain Python type."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not str/int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold "
                    "only tensors and plain Python values (so weights_only=True can load them)")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # why: some filesystems (and Windows) cannot open a directory; rename is done
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict, path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temp file + fsync + rename + fsync of the folder).

    Raises ``CheckpointError`` when the state holds a non-plain value or the write fails
    (e.g. ``ENOSPC``); in both cases an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    try:
        check_plain(state)
    except TypeError as e:
        raise CheckpointError(f"refusing to write {path}: {e}") from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise CheckpointError(f"could not write checkpoint {path}: {e}{kept}") from None
    _fsync_dir(path.parent)


def load(path: str | Path) -> dict:
    """Load a checkpoint on CPU with ``torch.load(weights_only=True)``; refuse anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing {path}: it needs arbitrary pickles to load, which we do "
                              f"not allow ({str(e).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def rng_state() -> dict:
    """Python, numpy, torch CPU and (if present) CUDA generator states as plain values."""
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss),
                  float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state()`` captured (the CUDA part only when CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_gauss, np_cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def config_diff(saved: dict, current: dict, harmless=lambda key: False) -> list[str]:
    """``'key: saved -> current'`` for every key that differs and is not ``harmless(key)``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if harmless(key):
            continue
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out
