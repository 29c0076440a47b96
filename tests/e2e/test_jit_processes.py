"""The on-disk numba cache of the ffcv pipelines (``fastvit_reduce.data.jit``) across processes.

The cache must change nothing but time: the same pixels cold, warm, off, from a damaged cache and
without a usable folder. Each case runs in a fresh process, as a run of a sweep would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastvit_reduce.data.ffcv_patch  # noqa: F401 — the fast ffcv import, before any ffcv module
from fastvit_reduce.data import jit

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


def test_fingerprint_is_the_same_in_another_process():
    code = ("from fastvit_reduce.data import jit, decoders as L; import numba;"
            "d = L.SeededRandomResizedCropDecoder((32, 32));"
            "print(jit.fingerprint(numba.njit(L._flip_in_place)), jit.fingerprint(numba.njit(jit.imdecode)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.split()) == 2


def test_decoder_cache_files_live_in_the_cache_folder_only(jpeg_betons, tmp_path):
    cache = tmp_path / "cache"
    decode_epoch(jpeg_betons, cache)
    names = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}
    assert {"decoders.SeededRandomResizedCropDecoder.generate_code.locals.decode",
            "decoders.TimmCenterCropDecoder.generate_code.locals.decode",
            "os_cache.OSCacheManager.compile_reader.locals.read"} <= names
    package = Path(jit.__file__).parent
    assert not list(package.rglob("*.nbi"))  # numba's default would write next to the source
