"""What the numba cache (``data.jit``) trusts before it loads compiled code: nothing it cannot check.

numba's cache files are pickles, and unpickling runs code: a ``.nbi`` planted in a cache folder
would run inside the trainer at its next start. So a cache is used only when

* the cache folder, each folder below it and each file is owned by this user and writable by
  nobody else (a folder or file that fails is refused: the pipelines are compiled, with one
  warning), and
* every file carries an HMAC-SHA256 of its name and contents under this user's secret key,
  checked before a single byte is unpickled. A file without a valid tag (planted, damaged,
  written by another user or by an older fastvit-reduce) is ignored with one warning, and the
  compiled code is written over it.

The key is 32 random bytes in ``$FASTVIT_REDUCE_JIT_KEY`` (default
``$XDG_CACHE_HOME/fastvit-reduce/jit.key``, i.e. ``~/.cache/...``), created on first use with mode
0600; a key file that others may read or write, or that is not this user's, turns the cache off.
Nodes that share one cache folder load each other's entries only when they share the key (a home
folder on shared storage, or ``FASTVIT_REDUCE_JIT_KEY`` pointing at one private file); otherwise
each node recompiles and rewrites the entries, which costs time, never correctness.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import pickle
import stat
import uuid
from pathlib import Path

from numba.core.caching import IndexDataCacheFile

KEY_ENV = "FASTVIT_REDUCE_JIT_KEY"
MAGIC = b"fastvit-reduce signed numba cache 1\n"
_TAG = hashlib.sha256().digest_size


class Refused(Exception):
    """A cache folder, file or key that may not be trusted; the message says which and why."""


def key_path() -> Path:
    """Where this user's cache key lives."""
    value = os.environ.get(KEY_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastvit-reduce" / "jit.key"


def problem(st: os.stat_result, what: str) -> str | None:
    """Why a folder or file with this ``stat`` may not be trusted (None: it may)."""
    if st.st_uid != os.geteuid():
        return f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{what} is writable by {who} (mode {stat.filemode(st.st_mode)})"
    return None


def trusted_folder(path: Path, create: bool = False) -> None:
    """``Refused`` unless ``path`` is a folder of this user's that nobody else may write to;
    ``create``: make it (mode 0700) when missing."""
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise Refused(f"cannot create {path} ({e.strerror or e})") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(f"cannot use {path} ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{path} is not a folder")
    why = problem(st, f"the folder {path}")
    if why:
        raise Refused(why)


_key: bytes | None = None


def user_key() -> bytes:
    """This user's secret (made on first use); ``Refused`` when the key file cannot be trusted."""
    global _key
    if _key is None:
        path = key_path()
        try:
            _key = _read_key(path)
        except FileNotFoundError:
            _key = _make_key(path)
    return _key


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Refused(f"cannot read the key {path} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        why = problem(st, f"the key {path}")
        if why is None and st.st_mode & 0o077:
            why = f"the key {path} is readable by others (mode {stat.filemode(st.st_mode)}; it must be 0600)"
        if why:
            raise Refused(why)
        key = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(key) != 32:
        raise Refused(f"the key {path} holds {len(key)} bytes, not 32 (delete it: a new one is made)")
    return key


def _make_key(path: Path) -> bytes:
    """32 random bytes in ``path`` (0600); the first of several processes starting at once wins."""
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # why link: fails if another process made the key meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise Refused(f"cannot create the key {path} ({e.strerror or e})") from None
    return _read_key(path)


class SignedCacheFile(IndexDataCacheFile):
    """numba's index and data files, each written as ``MAGIC | HMAC-SHA256(key, name \\0 bytes) |
    bytes`` (the bytes numba itself writes) with mode 0600; read only when owned by this user,
    written by nobody else and carrying a valid tag. A file that fails counts as absent, so numba
    compiles and writes over it; ``on_refused(message)`` is told why."""

    def __init__(self, cache_path, filename_base, source_stamp, key: bytes, on_refused):
        super().__init__(cache_path, filename_base, source_stamp)
        self._key, self._on_refused = key, on_refused

    def _tag(self, path: str, data: bytes) -> bytes:
        return hmac.new(self._key, os.path.basename(path).encode() + b"\0" + data, hashlib.sha256).digest()

    def _read_signed(self, path: str) -> bytes | None:
        """The authenticated contents of ``path``; None when absent or refused."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symbolic link, which we never write
            self._on_refused(f"numba cache file {path} not loaded ({e.strerror or e})")
            return None
        try:
            st = os.fstat(fd)
            why = problem(st, "it") or (None if stat.S_ISREG(st.st_mode) else "it is not a regular file")
            if why:
                self._on_refused(f"numba cache file {path} not loaded ({why}); compiling without it")
                return None
            with io.FileIO(fd, "rb", closefd=False) as f:
                blob = f.read()
        finally:
            os.close(fd)
        head, tag, data = blob[:len(MAGIC)], blob[len(MAGIC):len(MAGIC) + _TAG], blob[len(MAGIC) + _TAG:]
        if head != MAGIC or not hmac.compare_digest(tag, self._tag(path, data)):
            self._on_refused(f"numba cache file {path} not loaded (not signed with this user's key: planted, "
                             "damaged, or from another user or version); refused unread, compiling again "
                             "and rewriting it")
            return None
        return data

    def _load_index(self):
        data = self._read_signed(self._index_path)
        if data is None:
            return {}
        f = io.BytesIO(data)
        version = pickle.load(f)  # authenticated above: written by this user's own process
        if version != self._version:
            return {}
        stamp, overloads = pickle.loads(f.read())
        return overloads if stamp == self._source_stamp else {}

    def _save_index(self, overloads):
        data = pickle.dumps(self._version, protocol=-1) + self._dump((self._source_stamp, overloads))
        self._write_signed(self._index_path, data)

    def _load_data(self, name):
        data = self._read_signed(self._data_path(name))
        return None if data is None else pickle.loads(data)

    def _save_data(self, name, data):
        self._write_signed(self._data_path(name), self._dump(data))

    def _write_signed(self, path: str, data: bytes) -> None:
        with self._open_for_write(path) as f:
            f.write(MAGIC + self._tag(path, data) + data)

    @contextlib.contextmanager
    def _open_for_write(self, filepath):
        """numba's write to a temporary name and rename, but created 0600 (not the umask's mode)."""
        tmp = f"{filepath}.tmp.{uuid.uuid4().hex[:16]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, filepath)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
