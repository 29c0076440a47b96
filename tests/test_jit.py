"""fastvit_reduce.data.jit, the on-disk numba cache of the ffcv pipelines, in this process: a failed
write, ``off``, the default folder, the cache keys (fingerprints) and the symbol bindings. The cache
across processes (cold, warm, damaged, unusable): tests/e2e/test_jit_processes.py; the fast ffcv
import: tests/test_ffcv_patch.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastvit_reduce.data.ffcv_patch  # noqa: F401 — the fast ffcv import, before any ffcv module
from fastvit_reduce.data import jit

def test_cache_write_failure_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    """A full disk: numba's write raises OSError; the compiled code is still used."""
    import numba
    from ffcv.pipeline.compiler import Compiler

    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jit.FunctionCache, "save_overload", full_disk)

    def twice(x):
        return 2 * x

    with jit.cached_compilation():
        compiled = Compiler.compile(twice)
    with pytest.warns(RuntimeWarning, match="not written"):
        assert compiled(np.int64(21)) == 42
    assert isinstance(compiled, numba.core.dispatcher.Dispatcher)


def test_off_writes_nothing_and_leaves_ffcv_compiling_as_before(tmp_path, monkeypatch):
    from ffcv.pipeline.compiler import Compiler

    monkeypatch.setenv(jit.CACHE_ENV, "off")
    before = Compiler.__dict__["compile"]
    with jit.cached_compilation():
        assert Compiler.__dict__["compile"] is before
    assert jit.cache_root() is None
    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path / "c"))
    with jit.cached_compilation():
        assert Compiler.__dict__["compile"] is not before
        with jit.cached_compilation():  # re-entered by Loader.__init__ -> generate_code
            pass
        assert Compiler.__dict__["compile"] is not before
    assert Compiler.__dict__["compile"] is before


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(jit.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jit.cache_root() == tmp_path / "fastvit-reduce" / "numba"


# ----------------------------------------------------------------------------- keys
def _closure(value, helper):
    def fn(x):
        return helper(x) + value
    return fn


def _plus_one(x):
    return x + 1


def _plus_two(x):
    return x + 2


def test_fingerprint_follows_closure_values_and_called_code():
    import numba

    a = jit.fingerprint(numba.njit(_closure(1, numba.njit(_plus_one))))
    assert a == jit.fingerprint(numba.njit(_closure(1, numba.njit(_plus_one))))  # new dispatchers
    assert a != jit.fingerprint(numba.njit(_closure(2, numba.njit(_plus_one))))
    assert a != jit.fingerprint(numba.njit(_closure(1, numba.njit(_plus_two))))
    assert a != jit.fingerprint(numba.njit(fastmath=True)(_closure(1, numba.njit(_plus_one))))
    arrays = [jit.fingerprint(numba.njit(_closure(np.array(v), _plus_one))) for v in ([1, 2], [1, 3])]
    assert arrays[0] != arrays[1]


def test_fingerprint_refuses_what_it_cannot_hash_stably():
    import numba
    from ffcv.libffcv import ctypes_imdecode, imdecode

    with pytest.raises(jit.Uncacheable):
        jit.fingerprint(numba.njit(_closure(ctypes_imdecode, _plus_one)))
    with pytest.raises(jit.Uncacheable):  # ffcv's own binding names a ctypes pointer
        jit.fingerprint(numba.njit(imdecode))
    with pytest.raises(jit.Uncacheable):
        jit.fingerprint(numba.njit(_closure(object(), _plus_one)))


# ----------------------------------------------------------------------------- bindings
def test_symbol_bindings_match_ffcvs_ctypes_calls():
    import numba
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.libffcv import imdecode as ffcv_imdecode
    from ffcv.libffcv import resize_crop as ffcv_resize_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    image[:, ::4] = 255  # structure, so a wrong crop or stride shows
    encoded = encode_jpeg(image, 90)
    ours_dec, theirs_dec = numba.njit(jit.imdecode), numba.njit(ffcv_imdecode)
    ours_rc, theirs_rc = numba.njit(jit.resize_crop), numba.njit(ffcv_resize_crop)
    # the whole image (what our decoders ask for), then a transform with crop and flip
    for h, w, x, y, enable, flip in [(37, 53, 0, 0, False, False), (16, 24, 8, 8, True, True)]:
        a, b = np.zeros(37 * 53 * 3, np.uint8), np.zeros(37 * 53 * 3, np.uint8)
        result = ours_dec(encoded, a, 37, 53, h, w, x, y, 1, 1, enable, flip)
        assert result == theirs_dec(encoded, b, 37, 53, h, w, x, y, 1, 1, enable, flip)
        np.testing.assert_array_equal(a, b)
        assert a.any() or result != 0
    assert ours_dec(encoded, a, 37, 53, 37, 53, 0, 0, 1, 1, False, False) == 0
    for out in [(16, 16), (40, 20)]:
        a, b = np.zeros((*out, 3), np.uint8), np.zeros((*out, 3), np.uint8)
        ours_rc(image, 3, 30, 5, 50, a)
        theirs_rc(image, 3, 30, 5, 50, b)
        np.testing.assert_array_equal(a, b)
