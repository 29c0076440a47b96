"""The on-disk numba cache of the ffcv pipelines (``fastvit_reduce.data.jit``) across processes.

The cache must change nothing but time: the same pixels cold, warm, from a damaged cache and without
a usable folder (no cache at all). Each case runs in a fresh process, as a run of a sweep would.

A cold process spends ~10 s compiling, so the module's processes run once, in one fixture, and the
tests read their results: two cold processes that start at once on one empty cache, whose cache the
warm run then loads (a copy of it is damaged), and one run without a usable folder (no cache at all:
the reference pixels; ``off`` is tests/test_jit.py's, in-process). Independent processes run side
by side (each compiles on one core).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import fastvit_reduce.data.ffcv_patch  # noqa: F401 — the fast ffcv import, before any ffcv module
from fastvit_reduce.data import jit

# one process: build the train and val loaders on a JPEG .beton, decode an epoch of each, print
# a hash of every batch, this process's cache counts, and the cache keys (fingerprints) of two
# functions (after the counts: a fingerprint neither compiles nor touches the cache)
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
stats = jit.stats()
from fastvit_reduce.data import decoders as D; import numba
d = D.SeededRandomResizedCropDecoder((32, 32))
prints = [jit.fingerprint(numba.njit(D._flip_in_place)), jit.fingerprint(numba.njit(jit.imdecode))]
print(json.dumps({"hash": h.hexdigest(), **stats, "fingerprints": prints}))
"""


@pytest.fixture(scope="module")
def jpeg_betons(tmp_path_factory):
    from conftest import write_beton
    folder = tmp_path_factory.mktemp("jit")
    return (write_beton(folder / "train.beton", n=32, write_mode="jpg"),
            write_beton(folder / "val.beton", n=16, seed=1, write_mode="jpg"))


def start_epoch(betons, cache) -> subprocess.Popen:
    env = {**os.environ, jit.CACHE_ENV: str(cache)}
    return subprocess.Popen([sys.executable, "-c", EPOCH, *betons], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def decode_epochs(betons, *caches) -> list[tuple[dict, str]]:
    """One fresh process per cache folder, all at once; each (its JSON line, its stderr)."""
    return [result(p) for p in [start_epoch(betons, cache) for cache in caches]]


@pytest.fixture(scope="module")
def runs(jpeg_betons, tmp_path_factory):
    """Every process of the module, side by side where they are independent."""
    root = tmp_path_factory.mktemp("jit_caches")
    r = SimpleNamespace(cache=root / "cache", damaged_cache=root / "damaged", blocker=root / "a_file")
    r.blocker.write_text("not a folder")
    # two cold processes on one empty cache at once, as two ranks (or two sweep slots) start, and
    # one with a folder that cannot be created (no cache at all: the reference pixels)
    *r.both, (r.unusable, r.unusable_err) = decode_epochs(jpeg_betons, r.cache, r.cache, r.blocker / "cache")
    shutil.copytree(r.cache, r.damaged_cache)  # the cold runs' files, to damage
    r.damaged_files = [p for p in r.damaged_cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    for p in r.damaged_files:  # a half-written disk, or another tool's files
        p.write_bytes(p.read_bytes()[:7])
    # a load (warm) and a compile (the damaged copy)
    (r.warm, r.warm_err), (r.again, r.again_err) = decode_epochs(jpeg_betons, r.cache, r.damaged_cache)
    (r.healed, r.healed_err), = decode_epochs(jpeg_betons, r.damaged_cache)  # rewritten: loads again
    r.cold = r.both[0][0]
    return r


def test_cold_then_warm_loads_every_pipeline_and_decodes_the_same_pixels(runs):
    uncached, warm, stderr = runs.unusable, runs.warm, runs.warm_err
    cold = [out for out, _ in runs.both]
    assert uncached["loaded"] == uncached["compiled"] == 0  # no cache at all
    # cold: the train pipeline compiles, with the functions it calls (libffcv bindings, crop, flip),
    # in one process or the other; each val loader loads what it shares with its train loader and
    # compiles its own decoder.
    assert sum(c["compiled"] for c in cold) >= 4 and all(c["loaded"] >= 1 for c in cold)
    # warm: the 6 pipeline functions load whole (reader, image and label decoder, train and val)
    assert warm["compiled"] == 0 and warm["loaded"] == 6
    assert {c["hash"] for c in cold} == {warm["hash"]} == {uncached["hash"]}
    assert "Cannot cache" not in stderr and "not loaded" not in stderr


def test_two_cold_processes_at_once_fill_one_cache(runs):
    """Two ranks (or two sweep slots) starting together on an empty cache: both compile and write
    the same entries; numba renames each finished file into place, so the next process loads all."""
    assert runs.warm["compiled"] == 0 and runs.warm["loaded"] == 6
    assert not [err for _, err in runs.both if "not loaded" in err]  # neither read the other's half-written file
    assert not list(runs.cache.rglob("*.tmp.*"))  # no half-written file left behind


def test_damaged_cache_files_are_recompiled_with_a_warning(runs):
    good = runs.cold
    assert runs.damaged_files
    again, stderr = runs.again, runs.again_err
    assert again["hash"] == good["hash"]
    assert again["compiled"] >= 1 and "not loaded" in stderr
    healed, stderr = runs.healed, runs.healed_err
    assert healed["hash"] == good["hash"] and healed["compiled"] == 0 and healed["loaded"] == 6
    assert "not loaded" not in stderr


def test_unusable_cache_folder_warns_and_compiles(runs):
    run, stderr = runs.unusable, runs.unusable_err
    assert run["hash"] == runs.cold["hash"] and run["loaded"] == run["compiled"] == 0
    assert "is not usable" in stderr


def test_fingerprint_is_the_same_in_another_process(runs):
    """The cache keys of a closure-free function and of a libffcv binding, from two processes
    (the cold and the warm run)."""
    prints = [runs.cold["fingerprints"], runs.warm["fingerprints"]]
    assert prints[0] == prints[1] and len(prints[0]) == 2


def test_decoder_cache_files_live_in_the_cache_folder_only(runs):
    names = {p.name.split("-")[0] for p in runs.cache.rglob("*.nbi")}
    assert {"decoders.SeededRandomResizedCropDecoder.generate_code.locals.decode",
            "decoders.TimmCenterCropDecoder.generate_code.locals.decode",
            "os_cache.OSCacheManager.compile_reader.locals.read"} <= names
    package = Path(jit.__file__).parent
    assert not list(package.rglob("*.nbi"))  # numba's default would write next to the source
