"""The on-disk numba cache of the ffcv pipelines (``fastvit_reduce.data.jit``) and the fast ffcv
import (``fastvit_reduce/data/__init__.py``).

The cache must change nothing but time: the same pixels cold, warm, off, from a damaged cache and
without a usable folder. Each case runs in a fresh process, as a run of a sweep would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastvit_reduce.data.ffcv_patch  # noqa: F401 — the fast ffcv import, before any ffcv module
from fastvit_reduce.data import jit

# one process: build the train and val loaders on a JPEG .beton, decode an epoch of each, print
# a hash of every batch and this process's cache counts
EPOCH = """
import hashlib, json, sys, warnings
warnings.simplefilter("always")
from fastvit_reduce.data import jit, loaders as L
train, val = sys.argv[1], sys.argv[2]
tl = L.create_train_loader(train, 8, "cpu", res=32, num_workers=1, in_memory=True, batches_ahead=1,
                           drop_last=True, order="random", aug_repeats=1, seed=0, distributed=False,
                           rrc_scale=(0.08, 1), rrc_ratio=(0.75, 4 / 3), hflip=True)
vl = L.create_val_loader(val, 8, "cpu", res=32, crop_pct=0.875, num_workers=1, in_memory=True,
                         distributed=False)
L.set_epoch(tl, 0)
h = hashlib.sha256()
for loader in (tl, vl):
    for x, y in loader:
        h.update(x.contiguous().numpy().tobytes()); h.update(y.numpy().tobytes())
print(json.dumps({"hash": h.hexdigest(), **jit.stats()}))
"""


@pytest.fixture(scope="module")
def jpeg_betons(tmp_path_factory):
    from conftest import write_beton
    folder = tmp_path_factory.mktemp("jit")
    return (write_beton(folder / "train.beton", n=32, write_mode="jpg"),
            write_beton(folder / "val.beton", n=16, seed=1, write_mode="jpg"))


def decode_epoch(betons, cache) -> tuple[dict, str]:
    env = {**os.environ, jit.CACHE_ENV: str(cache)}
    out = subprocess.run([sys.executable, "-c", EPOCH, *betons], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_cold_then_warm_loads_every_pipeline_and_decodes_the_same_pixels(jpeg_betons, tmp_path):
    cache = tmp_path / "cache"
    off, _ = decode_epoch(jpeg_betons, "off")
    cold, _ = decode_epoch(jpeg_betons, cache)
    warm, stderr = decode_epoch(jpeg_betons, cache)
    assert off["loaded"] == off["compiled"] == 0  # no cache at all
    # cold: the train pipeline compiles, with the functions it calls (libffcv bindings, crop, flip);
    # the val loader loads what it shares with train and compiles its own decoder.
    assert cold["compiled"] >= 4 and cold["loaded"] >= 1
    # warm: the 6 pipeline functions load whole (reader, image and label decoder, train and val)
    assert warm["compiled"] == 0 and warm["loaded"] == 6
    assert cold["hash"] == warm["hash"] == off["hash"]
    assert "Cannot cache" not in stderr and "not loaded" not in stderr


def test_two_cold_processes_at_once_fill_one_cache(jpeg_betons, tmp_path):
    """Two ranks (or two sweep slots) starting together on an empty cache: both compile and write
    the same entries; numba renames each finished file into place, so a third process loads all."""
    cache = tmp_path / "cache"
    env = {**os.environ, jit.CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", EPOCH, *jpeg_betons], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    hashes = {json.loads(out.strip().splitlines()[-1])["hash"] for out, _ in outs}
    third, stderr = decode_epoch(jpeg_betons, cache)
    assert hashes == {third["hash"]} and third["compiled"] == 0 and third["loaded"] == 6
    assert not list(cache.rglob("*.tmp.*"))  # no half-written file left behind


def test_damaged_cache_files_are_recompiled_with_a_warning(jpeg_betons, tmp_path):
    cache = tmp_path / "cache"
    good, _ = decode_epoch(jpeg_betons, cache)
    files = [p for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert files
    for p in files:  # a half-written disk, or another tool's files
        p.write_bytes(p.read_bytes()[:7])
    again, stderr = decode_epoch(jpeg_betons, cache)
    assert again["hash"] == good["hash"]
    assert again["compiled"] >= 1 and "not loaded" in stderr
    healed, stderr = decode_epoch(jpeg_betons, cache)  # rewritten: loads again
    assert healed["hash"] == good["hash"] and healed["compiled"] == 0 and healed["loaded"] == 6
    assert "not loaded" not in stderr


def test_unusable_cache_folder_warns_and_compiles(jpeg_betons, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    off, _ = decode_epoch(jpeg_betons, "off")
    run, stderr = decode_epoch(jpeg_betons, blocker / "cache")  # cannot be created
    assert run["hash"] == off["hash"] and run["loaded"] == run["compiled"] == 0
    assert "is not usable" in stderr


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


def test_fingerprint_is_the_same_in_another_process():
    code = ("from fastvit_reduce.data import jit, decoders as L; import numba;"
            "d = L.SeededRandomResizedCropDecoder((32, 32));"
            "print(jit.fingerprint(numba.njit(L._flip_in_place)), jit.fingerprint(numba.njit(jit.imdecode)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.split()) == 2


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


# ----------------------------------------------------------------------------- fast import
def test_ffcv_import_uses_a_plain_dict_for_image_modes_and_restores_numba():
    code = ("import time; t = time.perf_counter(); import fastvit_reduce.data.ffcv_patch;"
            "from ffcv.fields.rgb_image import IMAGE_MODES; import numba.typed as t2;"
            "print(type(IMAGE_MODES).__name__, sorted(IMAGE_MODES.items()), t2.Dict.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[0] == "dict"
    assert "[('jpg', 0), ('raw', 1)]" in out.stdout  # ffcv 1.0.2's entries
    assert out.stdout.strip().endswith("numba.typed.typeddict")


def test_decoder_cache_files_live_in_the_cache_folder_only(jpeg_betons, tmp_path):
    cache = tmp_path / "cache"
    decode_epoch(jpeg_betons, cache)
    names = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}
    assert {"decoders.SeededRandomResizedCropDecoder.generate_code.locals.decode",
            "decoders.TimmCenterCropDecoder.generate_code.locals.decode",
            "os_cache.OSCacheManager.compile_reader.locals.read"} <= names
    package = Path(jit.__file__).parent
    assert not list(package.rglob("*.nbi"))  # numba's default would write next to the source
