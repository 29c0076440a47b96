"""The run folder: what a training run writes, how it is read back, and whether it is the same run.

One module owns the format, so the trainer, ``report``, ``sweep`` and ``compare`` agree on it:

    <logging.folder>/<experiment>/
        .lock          exclusive lock of the trainer writing here (host and pid inside)
        params.json    resolved config, versions, git revision, command line, world size, pairing
        log.jsonl      one row per epoch (LOG_KEYS), rewritten atomically
        summary.csv    the same rows; timm's columns first (epoch, train_loss, eval_loss, eval_top1,
                       eval_top5, lr), so timm's plotting scripts read it unchanged
        final.json     summary (FINAL_KEYS) rewritten after every epoch; ``completed`` once done,
                       ``exit_reason`` says why a run ended
        last.pt        full state to resume (model, EMA, optimizer, scaler, counters, log rows)
        prev.pt        only while a paired save is half done (see ``resume_position``)
        best.pt        weights of the best headline top-1 (the EMA's when EMA is on, as timm)
        train.log      the log lines

"Is this the same run?" has one judge, ``run_changes``: every key except ``HARMLESS`` ones must
match the checkpoint's (``config_changes``), and the datasets must hold what they held
(``data_changes``: size, sample count and a hash of the header and sample table; a dataset may
move). The sweep asks the same function before relaunching a finished run.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

from .config import ConfigError, dump_json, file_problem
from .settings import STRATEGY_KNOBS

# keys that may differ between a checkpoint and the run resuming it: logging, checkpointing,
# loader tuning (threads, prefetch depth: the data stream does not depend on them), the decode
# error limit, dataset paths (a node may copy the data to its local disk; the contents are judged
# by data_changes), eval frequency/batch, compile, the dry-run switch
HARMLESS = ("logging.", "checkpoint.", "data.num_workers", "data.in_memory", "data.batches_ahead",
            "data.max_decode_errors", "data.train_dataset", "data.val_dataset", "validation.every_n_epochs",
            "validation.batch_size", "training.compile", "training.threads", "training.overlap")
# timm's summary.csv columns first, then ours
TIMM_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
LOG_KEYS = TIMM_COLUMNS + [
    "raw_top_1", "raw_top_5", "raw_loss", "ema_top_1", "ema_top_5", "ema_loss", "val_images", "res",
    "updates", "epoch_time_s", "train_time_s", "train_img_s", "data_wait_frac", "compute_s", "train_images",
    "peak_mem_mb", "weights_hash", "decode_errors"]
FINAL_KEYS = ["experiment", "strategy", "arch", "img_size", "epochs", "params", "mlp_params", "gflops",
              "top_1", "best_top_1", "final_top_1", "headline", "raw_best_top_1", "raw_final_top_1",
              "best_ema_top_1", "final_ema_top_1", "total_time_s", "train_img_s", "data_wait_frac",
              "compute_s", "train_images", "completed", "exit_reason", "weights_hash", "first_batch_hash",
              "decode_errors"]


class RunFolderError(RuntimeError):
    """The run folder cannot be used (locked by another trainer, not writable, ...)."""


def is_harmless(key: str) -> bool:
    return key.startswith(HARMLESS)


def config_changes(saved: dict, current: dict) -> list[str]:
    """``'key: old -> new'`` for every non-harmless key that differs (the one judge of sameness)."""
    from .checkpoint import config_diff
    return config_diff(saved, current, is_harmless)


NAME_MAX = 255  # bytes in one file name (Linux and macOS filesystems)


def run_changes(saved_cfg: dict, saved_data: dict | None, cfg: dict, data: dict | None) -> list[str]:
    """Every difference that makes a saved run another run than ``cfg`` on ``data`` (the judge)."""
    return config_changes(saved_cfg, cfg) + data_changes(saved_data, data)


def check_experiment_name(name: str) -> str:
    """``name`` if it is one plain folder name; ``ConfigError`` otherwise (no '..', '/', '.', control
    characters): a run must land in its own folder directly below ``logging.folder``. It must also
    be UTF-8 (logs, reports and JSON print it) and short enough for the filesystem."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("-")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ConfigError(f"logging.experiment={name!r} must be a plain folder name (no '/', '..', "
                          f"'.', leading '-' or control characters): runs live directly below "
                          f"logging.folder")
    check_utf8("logging.experiment", name)
    size = len(os.fsencode(name))
    if size > NAME_MAX:
        raise ConfigError(f"logging.experiment is {size} bytes long ({name[:40]!r}...); a folder name "
                          f"may have at most {NAME_MAX}")
    return name


def check_utf8(what: str, text: str) -> str:
    """``text`` unless it holds bytes that are not UTF-8 (Python keeps them as surrogates, which
    cannot be printed or logged); ``ConfigError`` naming ``what`` otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(f"{what} '{shown}' is not valid UTF-8; rename it") from None
    return text


def weights_hash(state_dict: dict) -> str:
    """Short SHA-256 of a state dict's tensors (names, shapes, dtypes, bytes), in key order."""
    return _hash((f"{name}:", t) for name, t in state_dict.items())


def tensor_hash(*tensors) -> str:
    """Short SHA-256 of tensors' shapes, dtypes and bytes (e.g. the first input batch)."""
    return _hash(("", t) for t in tensors)


def _hash(named_tensors) -> str:
    import torch  # why here: report and sweep read run folders without torch
    h = hashlib.sha256()
    for prefix, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{prefix}{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class RunFolder:
    """One run's folder. Only the process that writes (rank 0) creates, locks and writes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.last_pt, self.prev_pt, self.best_pt = (self.path / n for n in ("last.pt", "prev.pt", "best.pt"))
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ creating and locking
    def create(self) -> None:
        """Make the folder; a path that is a file, not writable or refused by the OS (too long,
        inside /proc or /sys) is a ``RunFolderError``."""
        parent = self.path.parent
        try:
            if parent.exists() and not parent.is_dir():
                raise RunFolderError(f"logging.folder {parent} is a file, not a folder")
            if self.path.exists() and not self.path.is_dir():
                raise RunFolderError(f"run folder {self.path} is a file, not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # ENAMETOOLONG, EACCES, EPERM (/sys), ENOENT (/proc), EROFS ...
            raise RunFolderError(f"cannot create run folder {self.path}: {e.strerror or e}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"run folder {self.path} is not writable")

    def lock(self) -> str | None:
        """Take the folder's exclusive lock (``flock`` on ``.lock``; the OS drops it when this
        process dies, kill -9 included). ``RunFolderError`` naming the holder when another
        trainer has it, or when nothing can be written here. Returns a warning when the
        filesystem cannot lock (then nothing is held).

        ``flock`` is honoured across hosts on NFSv4 (Linux maps it to a POSIX lock) and on Lustre
        mounted with ``-o flock``; with ``-o localflock`` or ``noflock`` it only guards one host.
        """
        lock_path = self.path / ".lock"
        try:  # why here too: os.access says yes to root in /proc, where nothing can be created
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot write in run folder {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{self.path} is in use by another trainer ({holder}); two trainers "
                                     f"on one run folder would overwrite each other's checkpoints") from None
            return f"could not lock {lock_path} ({e.strerror}): this filesystem does not support flock"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ writing
    def write_params(self, info: dict) -> None:
        dump_json(info, self.path / "params.json")

    def write_rows(self, rows: list[dict]) -> None:
        """Rewrite ``log.jsonl`` and ``summary.csv`` from ``rows`` (both atomically)."""
        for name in ("log.jsonl", "summary.csv"):
            tmp = self.path / f".{name}.tmp"
            with open(tmp, "w", newline="") as f:
                if name == "log.jsonl":
                    f.write("".join(json.dumps(r) + "\n" for r in rows))
                else:
                    writer = csv.DictWriter(f, fieldnames=LOG_KEYS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows)
            tmp.replace(self.path / name)

    def write_final(self, final: dict) -> None:
        dump_json(final, self.path / "final.json")

    # ------------------------------------------------------------------ reading back
    def read_final(self) -> dict | None:
        """``final.json`` (None if absent); ``RunFolderError`` naming the file when it is not
        UTF-8 JSON of the shape the trainer writes."""
        final = _read_json(self.path / "final.json")
        if final is not None:
            _check_types(final, FINAL_TYPES, self.path / "final.json")
        return final

    def read_params(self) -> dict | None:
        """``params.json`` (None if absent); ``RunFolderError`` as ``read_final``."""
        path = self.path / "params.json"
        params = _read_json(path)
        if params is not None:
            _check_types(params, PARAMS_TYPES, path)
            pair = params.get("pair")
            if pair is not None and not _is_list_of_str(pair.get("variants")):
                raise RunFolderError(f"{path}: 'pair' holds no list of variant names")
        return params

    def read_rows(self) -> list[dict]:
        """Rows of ``log.jsonl`` (a line torn by kill -9 is skipped; a row of the wrong shape is a
        ``RunFolderError``)."""
        rows = []
        path = self.path / "log.jsonl"
        try:
            lines = path.read_bytes().splitlines() if path.is_file() else []
        except OSError as e:
            raise RunFolderError(f"cannot read {path}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)  # bytes: invalid UTF-8 raises, as a torn line does
            except ValueError:
                continue
            if isinstance(row, dict) and type(row.get("epoch")) is int:
                _check_types(row, ROW_TYPES, f"{path} line {n}")
                rows.append(row)
        return rows

    def is_complete(self) -> bool:
        final = self.read_final()
        return bool(final and final.get("completed"))


_NUMBER, _TEXT = (int, float, type(None)), (str, type(None))
# what report, compare and resume read from final.json / params.json / log.jsonl, and its types
FINAL_TYPES = {**{k: _NUMBER for k in ("params", "mlp_params", "gflops", "img_size", "epochs", "top_1",
                                       "best_top_1", "final_top_1", "raw_best_top_1", "raw_final_top_1",
                                       "best_ema_top_1", "final_ema_top_1", "total_time_s", "train_img_s",
                                       "data_wait_frac", "epochs_done", "updates", "torch_threads",
                                       "decode_errors")},
               **{k: _TEXT for k in ("experiment", "strategy", "arch", "headline", "exit_reason",
                                     "weights_hash", "first_batch_hash")},
               "completed": (bool,), "paired_with": (list, type(None))}
PARAMS_TYPES = {"config": (dict,), "pair": (dict, type(None)), "data": (dict, type(None))}
ROW_TYPES = {k: _NUMBER for k in LOG_KEYS if k != "weights_hash"}


def _is_list_of_str(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _check_types(obj, types: dict, where) -> None:
    """``RunFolderError`` unless ``obj`` is a dict whose keys in ``types`` have those types."""
    if not isinstance(obj, dict):
        raise RunFolderError(f"{where}: expected a JSON object, found a {type(obj).__name__}")
    for key, allowed in types.items():
        value = obj.get(key)
        if key in obj and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            raise RunFolderError(f"{where}: {key!r} is {value!r}, expected "
                                 + " or ".join("null" if t is type(None) else t.__name__ for t in allowed))
    if "paired_with" in obj and obj["paired_with"] is not None and not _is_list_of_str(obj["paired_with"]):
        raise RunFolderError(f"{where}: 'paired_with' is not a list of names")


def _read_json(path: Path):
    """The JSON in ``path``, None if absent; ``RunFolderError`` naming it when unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(data)  # bytes: UTF-8 (or -16/-32) is detected, anything else raises
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not UTF-8 text") from None
    except ValueError as e:
        raise RunFolderError(f"{path}: cannot read JSON ({e})") from None


def _show_data(f: dict) -> str:
    return f"{f.get('path')} ({f.get('samples')} samples, {f.get('bytes')} bytes, header {f.get('sha256')})"


def data_changes(saved: dict | None, current: dict | None) -> list[str]:
    """``'data.train_dataset: A -> B'`` for each dataset whose contents differ between a saved
    fingerprint (``betons.data_fingerprints``) and the current one; a dataset that only moved
    (same size, samples and header hash at another path) is the same data. Nothing to compare
    (an older run, or a data source without .beton files) is no change."""
    if not saved or not current:
        return []
    out = []
    for split, old in saved.items():
        new = current.get(split)
        if old is None or new is None:
            continue
        if (old.get("bytes"), old.get("samples"), old.get("sha256")) != (new["bytes"], new["samples"], new["sha256"]):
            out.append(f"data.{split}_dataset: {_show_data(old)} -> {_show_data(new)}")
    return out


def position(state: dict) -> tuple[int, int]:
    """(epoch, micro-step) a ``last.pt`` state resumes at."""
    return int(state["epoch"]), int(state["step_in_epoch"])


def resume_position(positions: dict[str, tuple[int, int] | None],
                    prev_positions: dict[str, tuple[int, int] | None]) -> tuple[tuple[int, int] | None, dict]:
    """Where a paired run resumes, and which file each variant loads.

    A paired save writes the variants' ``last.pt`` one after another, moving each old one to
    ``prev.pt`` first and deleting the ``prev.pt`` files once all are written. kill -9 (or a
    second Ctrl-C) in between leaves some variants one save ahead and the one being written with
    only its ``prev.pt``; they go back to their ``prev.pt``, which is at the common position.
    Returns ``(position, {name: 'last' | 'prev' | None})``; ``None`` = start fresh.
    """
    usable = {n: p if p is not None else prev_positions.get(n) for n, p in positions.items()}
    if any(p is None for p in usable.values()):
        # a variant never saved (kill -9 during the first save): all start over; a variant's
        # early last.pt is then simply overwritten
        return None, {n: None for n in positions}
    target = min(usable.values())
    choice = {}
    for name, pos in positions.items():
        if pos == target:
            choice[name] = "last"
        elif prev_positions.get(name) == target:
            choice[name] = "prev"
        else:
            raise RunFolderError(f"variant {name} is at epoch/step {pos} but the others at {target}, "
                                 f"and no prev.pt matches: the paired run's checkpoints disagree")
    return target, choice


# ----------------------------------------------------------------------------- reading for report
def read_run(path: str | Path) -> dict:
    """Everything ``report`` and ``compare`` need from one folder: final, params, rows, knobs."""
    run = RunFolder(path)
    final = run.read_final() or {}
    params = run.read_params() or {}
    rows = run.read_rows()
    cfg = params.get("config", {}) if isinstance(params, dict) else {}
    strategy = final.get("strategy") or cfg.get("reduction.strategy")
    knobs = " ".join(f"{k}={cfg[f'reduction.{k}']}" for k in STRATEGY_KNOBS.get(strategy or "", {})
                     if f"reduction.{k}" in cfg and not (k == "round_to" and cfg[f"reduction.{k}"] == 1))
    return {"path": run.path, "final": final, "params": params, "rows": rows, "config": cfg,
            "strategy": strategy, "knobs": knobs, "pair": params.get("pair") if isinstance(params, dict) else None}


def compare(a: str | Path, b: str | Path) -> tuple[bool, str]:
    """Are two runs the same? (equal?, one-paragraph explanation).

    Equal when their final weights hashes agree (and both have one). Otherwise names the first
    epoch whose logged loss, top-1 or weights hash differs, and whether the first batches did.
    """
    ra, rb = read_run(a), read_run(b)
    fa, fb = ra["final"], rb["final"]
    if not fa.get("weights_hash") or not fb.get("weights_hash"):
        missing = [str(r["path"]) for r in (ra, rb) if not r["final"].get("weights_hash")]
        return False, f"cannot compare: no weights hash in final.json of {', '.join(missing)}"
    lines = []
    if fa.get("torch_threads") != fb.get("torch_threads") and None not in (fa.get("torch_threads"), fb.get("torch_threads")):
        lines.append(f"torch threads differ ({fa['torch_threads']} vs {fb['torch_threads']}): float reductions "
                     f"run in another order, so the weights can differ from the first update on "
                     f"(set training.threads to compare)")
    if fa.get("first_batch_hash") != fb.get("first_batch_hash"):
        lines.append(f"first batches differ ({fa.get('first_batch_hash')} vs {fb.get('first_batch_hash')}):"
                     " different data, order or augmentation")
    by_epoch_b = {r["epoch"]: r for r in rb["rows"]}
    first = None
    for row in ra["rows"]:
        other = by_epoch_b.get(row["epoch"])
        if other is None:
            continue
        keys = [k for k in ("weights_hash", "train_loss", "eval_top1") if row.get(k) != other.get(k)]
        if keys:
            first = row["epoch"]
            lines.append(f"first differing epoch: {first} ({', '.join(keys)})")
            break
    equal = fa["weights_hash"] == fb["weights_hash"]
    head = (f"equal: final weights {fa['weights_hash']} in both" if equal else
            f"different: final weights {fa['weights_hash']} vs {fb['weights_hash']}")
    if not equal and first is None and not lines:
        lines.append("every logged epoch agrees; the runs differ after the last logged epoch "
                     f"(epochs done: {fa.get('epochs_done')} vs {fb.get('epochs_done')})")
    return equal, "\n".join([head, *lines])


def main(argv: list[str]) -> int:
    """``fastvit-reduce compare RUN_A RUN_B``: exit 0 if the runs are equal, 1 if not, 2 on error."""
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        asked = argv[:1] in (["-h"], ["--help"])
        print("usage: fastvit-reduce compare RUN_A RUN_B   (exit 0 equal, 1 different, 2 error)",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    try:
        for p in argv:
            check_utf8("run folder", p)
            if file_problem(Path(p) / "final.json", "final.json"):
                raise RunFolderError(f"{p}: no final.json (not a finished or started run folder)")
        equal, text = compare(*argv)
    except (RunFolderError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if equal else 1

