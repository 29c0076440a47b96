"""Checkpoints that survive kill -9, full disks and untrusted or damaged files.

* ``save(state, path)`` writes to ``.<name>.tmp<pid>`` in the same folder, fsyncs it, renames it
  over ``path`` and fsyncs the folder: a reader sees the old file or the new one, never half of
  one. If the write fails (a full disk: ``OSError`` or torch's ``RuntimeError``) the temporary
  file is removed, the previous checkpoint stays intact and ``CheckpointError`` names the file and
  the cause. ``clean_stale_tmp(folder)`` removes the temporary files of writers killed by kill -9.
* Only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None) may be
  saved, so every checkpoint loads with ``torch.load(weights_only=True)``.
* ``load(path)`` sorts every failure into one ``CheckpointError.kind``: ``"damaged"`` (empty,
  truncated, overwritten, a CRC mismatch in the zip), ``"foreign"`` (readable, but not one of our
  checkpoints) or ``"unsafe"`` (asks for a Python class: refused, never loaded unsafely), and
  ``move_aside(path)`` renames a bad file so a run can start fresh or from ``best.pt``.
* ``config_diff()`` names the keys in which a resumed run's config differs from the saved one.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import torch

OUR_KEYS = ("format", "model", "epoch")  # every last.pt / best.pt the trainer writes holds these


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why.

    ``kind``: ``"write"`` (save failed), ``"unreadable"`` (the OS refused to open it), or for a
    file that opened: ``"damaged"``, ``"foreign"``, ``"unsafe"``.
    """

    def __init__(self, message: str, kind: str = "write"):
        super().__init__(message)
        self.kind = kind


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


def _tmp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


_TMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def save(state: dict, path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temp file + fsync + rename + fsync of the folder).

    Raises ``CheckpointError`` (kind ``"write"``) when the state holds a non-plain value or the
    write fails (e.g. ``ENOSPC``, which torch reports as ``RuntimeError``); in every case the
    temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    try:
        check_plain(state)
    except TypeError as e:
        raise CheckpointError(f"refusing to write {path}: {e}") from None
    tmp = _tmp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        cause = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"could not write checkpoint {path}: {cause[:300]}{kept}") from None
    finally:
        tmp.unlink(missing_ok=True)  # after an error or an interrupt (KeyboardInterrupt) alike
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp<pid>`` files (left by ``save`` when its process was kill -9'd) whose
    pid is not alive on this host, or is this process's own (an earlier run that got the same pid,
    common in containers); return the removed paths. Call it before this process saves.

    Call it while holding the run folder's lock: a pid is only meaningful on the host that wrote
    the file, and the lock guarantees no other writer (on any host) is saving into ``folder``.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        m = _TMP.match(tmp.name)
        if m is None or not tmp.is_file():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def load(path: str | Path) -> dict:
    """Load a checkpoint on CPU with ``torch.load(weights_only=True)``; refuse anything else.

    Raises ``CheckpointError`` with ``kind`` ``"damaged"`` (empty, truncated, overwritten, CRC
    mismatch), ``"foreign"`` (no dict with ``OUR_KEYS``), ``"unsafe"`` (would unpickle a Python
    class: refused; loading it with ``weights_only=False`` is never suggested) or ``"unreadable"``.
    """
    path = Path(path)

    def fail(kind: str, what: str):
        error = CheckpointError(f"checkpoint {path}: {what}", kind)
        error.__suppress_context__ = True  # why: torch's own message advises an unsafe load
        raise error

    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}", "unreadable") from None
    if size == 0:
        fail("damaged", "damaged: empty file (0 bytes)")
    if zipfile.is_zipfile(path):  # torch's format: a zip; check every member's CRC32 (torch does not)
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            fail("damaged", f"damaged: unreadable zip ({e})")
        if bad is not None:
            fail("damaged", f"damaged: CRC mismatch in {bad} (overwritten)")
    try:
        with warnings.catch_warnings():  # why: a foreign pickle protocol makes torch warn before it refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises UnpicklingError, KeyError, OSError, ... on garbage
        # why read the opcodes: torch's words differ by pickle protocol ("Unsupported operand
        # 149", "unsupported GLOBAL"), so its message cannot tell a hostile file from a torn one
        unsafe = [g for g in asked_globals(path) if g not in _allowed_globals()]
        if unsafe:
            fail("unsafe", f"unsafe pickle: refused (it asks for the Python object {unsafe[0]}; "
                           "our checkpoints hold only tensors and plain values)")
        detail = " ".join(str(e).split())[:120] if not isinstance(e, pickle.UnpicklingError) else ""
        fail("damaged", f"damaged: not a readable torch file ({type(e).__name__}{': ' + detail if detail else ''})")
    if not isinstance(state, dict):
        fail("foreign", f"not a fastvit-reduce checkpoint (holds a {type(state).__name__}, not a dict)")
    missing = [k for k in OUR_KEYS if k not in state]
    if missing:
        fail("foreign", f"not a fastvit-reduce checkpoint (no {', '.join(map(repr, missing))} key)")
    return state


def asked_globals(path: str | Path) -> list[str]:
    """The ``module.name`` objects the pickle in ``path`` (a torch zip's ``data.pkl``, or the whole
    file) would import, read with ``pickletools.genops``, which decodes opcodes and runs nothing.
    What precedes a torn or garbled part of the stream still counts; unreadable files give []."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return []
    found, strings, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):  # arg: 'module name'
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":  # module and name: the two strings pushed last
                found.append(".".join(map(str, strings[-2:])))
            elif isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING", "UNICODE8")):
                strings.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif op.name.endswith("PUT"):
                memo[arg] = strings[-1] if strings else None
            elif op.name.endswith("GET"):
                strings.append(memo.get(arg))
    except Exception:  # noqa: BLE001 — pickletools raises ValueError and others on garbage
        pass
    return found


def _allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` imports (its own allowlist, where torch exposes it)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return set(_get_allowed_globals())
    except (ImportError, AttributeError):  # why: a private torch function; fall back to its shape
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.Size",
                "torch.FloatStorage", "torch.LongStorage", "torch.HalfStorage", "torch.BFloat16Storage"}


def move_aside(path: str | Path) -> Path:
    """Rename a bad checkpoint to ``<name>.damaged-<UTC time>`` (kept for a post-mortem, out of
    the way of resuming) and return the new path."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    new = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while new.exists():  # two moves within one second
        new, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
    os.rename(path, new)
    return new


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
