"""On-disk cache for the numba code of our ffcv pipelines: a machine compiles them once, not once
per process.

Why: ffcv compiles every pipeline with numba when an epoch first runs. Ours took 6.4 s per
process on our 2-core CPU (the OS-cache reader 1.1 s, the train decoder 3.3 s, the val decoder
1.6 s, the label decoders 0.3 s), and every run of a sweep paid it again.

Why numba's own ``cache=True`` does not do it: (1) ffcv's ``Compiler.compile`` does not pass it;
(2) ffcv calls libjpeg-turbo and OpenCV through ctypes pointers, which numba embeds as addresses
("dynamic globals") and refuses to cache; (3) numba keys a closure by pickling its cells, and a
pickled dispatcher carries a random uuid, so a closure over jitted functions (every ffcv decoder)
would never hit.

What this module does instead:

* ``libffcv(name)``: the same libffcv C functions (``imdecode``, ``resize_crop``) bound by symbol
  name (``types.ExternalFunction``), which the linker resolves again when cached code is loaded.
* ``cached_compilation()``: while it is active, every dispatcher ffcv's ``Compiler.compile``
  makes gets a cache keyed by ``fingerprint``: a hash of the function's bytecode and constants,
  its closure cells and the globals it names, followed recursively into jitted and plain
  functions. A change to any function a pipeline calls changes its key, and numba drops a
  function's entries when its source file changes. The CPU model is part of numba's key, so one
  folder can serve different machines. A function whose closure holds something we cannot hash
  stably (e.g. a ctypes pointer) is compiled as before, uncached.
* The cache lives in ``$FASTVIT_REDUCE_JIT_CACHE`` (default ``$XDG_CACHE_HOME/fastvit-reduce/numba``,
  i.e. ``~/.cache/...``); ``FASTVIT_REDUCE_JIT_CACHE=off`` turns it off. A cache that cannot be
  written (read-only, full disk) or read (damaged file) costs a warning and a compilation, never
  a run. Concurrent processes are safe: numba writes each file to a temporary name and renames it.
* numba's cache files are pickles: ``jit_trust`` uses only folders and files of this user that
  nobody else can write, and loads a file only after checking its HMAC under this user's key.

Measured (docs/results/speed.md): the first process on a machine pays the compilation and
writes the cache; every later one loads its pipelines in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import types
import warnings
import weakref
from pathlib import Path

import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — before any ffcv module
import ffcv._libffcv
import ffcv.libffcv
import llvmlite.binding as llvm
import numba
import numpy as np
from ffcv.pipeline.compiler import Compiler
from numba import types as nbtypes

try:  # numba's cache classes are private: another numba may move them
    from numba.core.caching import (CompileResultCacheImpl, FunctionCache, _CacheLocator,
                                    _SourceFileBackedLocatorMixin)
    from numba.core.dispatcher import Dispatcher
    MISSING = None
except ImportError as _e:  # then pipelines compile uncached, with one warning (cached_compilation)
    MISSING = f"numba {numba.__version__} lacks the cache internals this cache uses ({_e})"

    class CompileResultCacheImpl:  # stand-ins, so the classes below still define; never used
        pass

    class FunctionCache:
        pass

    class _CacheLocator:
        pass

    class _SourceFileBackedLocatorMixin:
        pass

    class Dispatcher:
        pass

from .jit_trust import Refused, SignedCacheFile, trusted_folder, user_key

CACHE_ENV = "FASTVIT_REDUCE_JIT_CACHE"
OFF = ("0", "off", "none", "false")

# ----------------------------------------------------------------------------- libffcv by symbol
# why: ffcv's ctypes handles CDLL(RTLD_LOCAL); the JIT linker finds symbols only in libraries
# loaded "permanently"
llvm.load_library_permanently(ffcv._libffcv.__file__)
_u32, _ptr = nbtypes.uint32, nbtypes.uintp
# the signatures of ffcv 1.0.2's libffcv (ffcv/libffcv.py argtypes); C bools as uint8 0/1
_IMDECODE = nbtypes.ExternalFunction("imdecode", nbtypes.int32(
    _ptr, nbtypes.uint64, _u32, _u32, _ptr, _u32, _u32, _u32, _u32, _u32, _u32,
    nbtypes.uint8, nbtypes.uint8))
_RESIZE = nbtypes.ExternalFunction("resize", nbtypes.void(*[nbtypes.int64] * 11))


# Both run only compiled: called from Python, an ExternalFunction builds a numba signature and
# calls nothing. Pipelines take them through ``libffcv()``.
def imdecode(source, dst, source_height, source_width, crop_height, crop_width, offset_x,
             offset_y, scale_factor_num, scale_factor_denom, enable_crop, do_flip):
    """ffcv's ``libffcv.imdecode`` (libjpeg-turbo), for cached numba code."""
    return _IMDECODE(source.ctypes.data, source.size, source_height, source_width,
                     dst.ctypes.data, crop_height, crop_width, offset_x, offset_y,
                     scale_factor_num, scale_factor_denom, np.uint8(enable_crop), np.uint8(do_flip))


def resize_crop(source, start_row, end_row, start_col, end_col, destination):
    """ffcv's ``libffcv.resize_crop`` (OpenCV INTER_AREA), for cached numba code."""
    _RESIZE(0, source.ctypes.data, source.shape[0], source.shape[1], start_row, end_row,
            start_col, end_col, destination.ctypes.data, destination.shape[0],
            destination.shape[1])


_BY_SYMBOL = {"imdecode": imdecode, "resize_crop": resize_crop}


def libffcv(name: str):
    """libffcv's ``name`` ('imdecode' or 'resize_crop') for a pipeline: compiled and bound by
    symbol (cacheable) when ffcv compiles, ffcv's own ctypes call when it runs pipelines as
    Python (``Compiler.set_enabled(False)``)."""
    if Compiler.is_enabled:
        return Compiler.compile(_BY_SYMBOL[name])
    return getattr(ffcv.libffcv, name)


# ----------------------------------------------------------------------------- keys
class Uncacheable(Exception):
    """An object in a function's closure or globals that has no stable fingerprint."""


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_NAMED = (range, numba.prange)  # loop iterators ffcv's Compiler.get_iterator hands out


def fingerprint(obj) -> str:
    """A hex digest that is the same in every process for the same compiled behaviour of ``obj``
    (a dispatcher or function); raises ``Uncacheable`` if something it depends on cannot be hashed
    stably."""
    digest = hashlib.sha256()
    _feed(digest, obj, set())
    return digest.hexdigest()


def _feed(digest, obj, seen: set) -> None:
    put = digest.update
    if isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        put(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (tuple, list)):
        put(f"{type(obj).__name__}[".encode())
        for item in obj:
            _feed(digest, item, seen)
        put(b"]")
    elif isinstance(obj, dict):
        put(b"dict{")
        for key in sorted(obj, key=repr):
            _feed(digest, key, seen)
            _feed(digest, obj[key], seen)
        put(b"}")
    elif isinstance(obj, np.ndarray):  # numba freezes global and closure arrays into the code
        put(f"ndarray:{obj.dtype.str}:{obj.shape};".encode())
        put(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (np.dtype, nbtypes.Type)):
        put(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, Dispatcher):
        put(f"jit:{sorted(obj.targetoptions.items())!r};".encode())
        _feed(digest, obj.py_func, seen)
    elif isinstance(obj, types.FunctionType):
        _feed_function(digest, obj, seen)
    elif isinstance(obj, types.ModuleType):
        put(f"module:{obj.__name__};".encode())
    elif any(obj is named for named in _NAMED):
        put(f"iterator:{obj.__name__};".encode())
    else:
        raise Uncacheable(f"{type(obj).__module__}.{type(obj).__qualname__}")


def _feed_function(digest, fn: types.FunctionType, seen: set) -> None:
    name = f"{fn.__module__}.{fn.__qualname__}"
    digest.update(f"function:{name};".encode())
    if id(fn) in seen:  # recursion, or a function reached twice: its name is enough
        return
    seen.add(id(fn))
    names: set[str] = set()
    _feed_code(digest, fn.__code__, names, seen)
    for cell in fn.__closure__ or ():
        _feed(digest, cell.cell_contents, seen)
    for global_name in sorted(names):
        if global_name in fn.__globals__:
            digest.update(f"global:{global_name}=".encode())
            _feed(digest, fn.__globals__[global_name], seen)


def _feed_code(digest, code: types.CodeType, names: set, seen: set) -> None:
    digest.update(code.co_code)
    names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(digest, const, names, seen)
        else:
            _feed(digest, const, seen)


# ----------------------------------------------------------------------------- cache
def cache_root() -> Path | None:
    """The cache folder, or None when ``FASTVIT_REDUCE_JIT_CACHE`` turns the cache off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastvit-reduce" / "numba"


class _Locator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """numba's user-provided-folder locator, pointed at ``cache_root()``: one folder per source
    folder; an entry is dropped when its function's source file changes (numba's stamp)."""

    root: Path | None = None  # set by _attach, read when numba builds the cache

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(self.root / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    def ensure_cache_path(self):
        try:  # why: numba's makedirs gives the umask's mode, and it trusts any folder it can write
            trusted_folder(Path(self._cache_path), create=True)
        except Refused as e:
            raise OSError(str(e)) from None
        super().ensure_cache_path()

    @classmethod
    def from_function(cls, py_func, py_file):
        return None if cls.root is None else super().from_function(py_func, py_file)


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_Locator]

    def check_cachable(self, cres):
        # numba warns for every uncacheable function; this is already known and harmless here
        return (not cres.library.has_dynamic_globals
                and all(lifted.can_cache for lifted in cres.lifted))


class _KeyedCache(FunctionCache):
    """numba's function cache, keyed by ``fingerprint`` instead of pickled closure cells, and
    never fatal: a damaged entry is recompiled and an unwritable folder skipped, with a warning."""

    _impl_class = _Impl

    def __init__(self, py_func, key: str, secret: bytes):
        self._key = key
        super().__init__(py_func)
        self._cache_file = SignedCacheFile(self._cache_path, self._impl.filename_base,
                                           self._impl.locator.get_source_stamp(), secret,
                                           on_refused=lambda message: _warn_once(message, "refused"))

    def _index_key(self, sig, codegen):
        return sig, codegen.magic_tuple(), self._key

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # noqa: BLE001 — a damaged or foreign file must not stop a run
            _warn_once(f"numba cache entry in {self.cache_path} not loaded ({type(e).__name__}: "
                       f"{e}); compiling it again and rewriting it")
            # why: numba's save reads the index first; without it, it writes a fresh one
            with contextlib.suppress(OSError):
                os.unlink(self._cache_file._index_path)
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as e:  # noqa: BLE001 — e.g. a full disk; the compiled code is still used
            _warn_once(f"numba cache not written to {self.cache_path} ({type(e).__name__}: {e}); "
                       f"this process compiled its pipelines and the next one will too")


_warned: set[str] = set()
_lock = threading.Lock()


def _warn_once(message: str, kind: str | None = None) -> None:
    """Warn once per message, or once per ``kind`` of message (refused files: the first one)."""
    with _lock:
        if (kind or message) in _warned:
            return
        _warned.add(kind or message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _attach(dispatcher, root: Path) -> bool:
    """Give ``dispatcher`` our cache; False (left uncached) when it has no stable key or the
    folder cannot be used."""
    try:
        key = fingerprint(dispatcher)
    except Uncacheable:
        return False
    try:
        trusted_folder(root, create=True)
        secret = user_key()
    except Refused as e:
        _warn_once(f"numba cache folder {root} is not usable: {e}; compiling without a cache "
                   "(docs/data.md: what the numba cache trusts)", "refused")
        return False
    _Locator.root = root
    try:
        # why the private attribute: Dispatcher.enable_caching() installs numba's own cache only
        dispatcher._cache = _KeyedCache(dispatcher.py_func, key, secret)
    except RuntimeError as e:  # numba: "no locator available" (folder not creatable/writable)
        _warn_once(f"numba cache folder {root} is not usable ({e}); compiling without a cache")
        return False
    _attached.add(dispatcher)
    return True


_attached: weakref.WeakSet = weakref.WeakSet()  # every dispatcher given our cache, while alive


def stats() -> dict:
    """``{"loaded": n, "compiled": m}``: this process's compilations of cached dispatchers that
    were loaded from the cache and that were compiled (and written). A pipeline loaded whole
    counts once: the functions it calls are inside its cached code."""
    dispatchers = list(_attached)
    return {"loaded": sum(sum(d.stats.cache_hits.values()) for d in dispatchers),
            "compiled": sum(sum(d.stats.cache_misses.values()) for d in dispatchers)}


@contextlib.contextmanager
def cached_compilation():
    """While active, ffcv's ``Compiler.compile`` returns dispatchers backed by our cache (lazy
    ones as before; an explicit signature is compiled, or loaded, right away, as numba does).

    Enter it on the thread that builds loaders, around ``Loader.__init__`` and ``generate_code``;
    the compilation itself happens later, in the decode thread, on the first batch.
    """
    root = cache_root()
    original = Compiler.__dict__["compile"]
    if root is not None and MISSING:
        _warn_once(f"{MISSING}; ffcv's pipelines are compiled without the on-disk cache")
        root = None
    if root is None or not Compiler.is_enabled or getattr(original.__func__, "cached", False):
        yield  # off, or already active (Loader.__init__ calls generate_code)
        return

    def compile_cached(cls, code, signature=None):
        dispatcher = original.__func__(cls, code)  # ffcv's options, compiled lazily
        if not isinstance(dispatcher, Dispatcher) or not _attach(dispatcher, root):
            return dispatcher if signature is None else original.__func__(cls, code, signature)
        if signature is not None:
            dispatcher.compile(signature)  # what njit(signature) does, now through the cache
            dispatcher.disable_compile()
        return dispatcher

    compile_cached.cached = True
    Compiler.compile = classmethod(compile_cached)
    try:
        yield
    finally:
        Compiler.compile = original
