"""Hostile data: the writer (symbolic link loops, degenerate images), JPEGs that fail to decode
inside a .beton, and the numba cache's pickles. Each is refused, counted and named, never silent
garbage or code run from a file; a trainer start on a planted cache runs in a real process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import Touch, one_line_error, printed_commands, write_beton, write_tiny_config
from fastvit_reduce import runs
from fastvit_reduce.config import ConfigError
from fastvit_reduce.train import main


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny trainer config (64 train / 24 val images) in its own folder."""
    return write_tiny_config(tmp_path_factory.mktemp("hostile_data"))


# ----------------------------------------------------------------------------- writing a .beton
def _png(path: Path, w: int, h: int, value: int = 100) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, format="PNG")


def test_symlink_loops_are_walked_once_and_every_file_counted_once(tmp_path, capsys):
    """A link back up made os.walk list a class 40 levels deep (3,280 "images" from 80 files)."""
    from fastvit_reduce.data import write
    train = tmp_path / "data" / "train"
    for k in range(3):
        _png(train / "cat" / f"c{k}.png", 8, 8)
    _png(train / "dog" / "d0.png", 8, 8)
    _png(train / "dog" / "deep" / "d1.png", 8, 8)
    os.symlink("..", train / "cat" / "loop")                  # a loop back to the class folder
    os.symlink("../dog", train / "cat" / "into_dog")          # a second way into another class
    os.symlink("../dog/d0.png", train / "cat" / "dup.png")    # a file of another class, again
    os.symlink("../../cat", train / "dog" / "deep" / "up")    # a loop two levels up, into a class
    outside = tmp_path / "elsewhere"
    _png(outside / "e.png", 8, 8)
    os.symlink(outside, train / "dog" / "ext")                # a link out of the split: followed
    split = write.scan_split(tmp_path / "data", "train")
    assert sorted(map(os.fsdecode, split.files)) == ["cat/c0.png", "cat/c1.png", "cat/c2.png",
                                                      "dog/d0.png", "dog/deep/d1.png", "dog/ext/e.png"]
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(split.repeats) == ["cat/dup.png", "cat/into_dog", "cat/loop", "dog/deep/up"]

    out = tmp_path / "train.beton"
    capsys.readouterr()
    assert write.main([f"--cfg.data_dir={tmp_path / 'data'}", "--cfg.split=train", f"--cfg.write_path={out}",
                       "--cfg.max_resolution=8", "--cfg.num_workers=1"]) == 0
    err = capsys.readouterr().err
    assert "4 symbolic link(s) lead to folders or files listed already" in err and "cat/loop" in err
    assert json.loads(Path(f"{out}.report.json").read_text())["links_not_followed"] == split.repeats


def test_degenerate_aspect_ratios_are_skipped_at_write_time(tmp_path, capsys):
    """A 20000x20 image was stored 64x1 and later aborted validation inside OpenCV."""
    from fastvit_reduce.data import write
    train = tmp_path / "data" / "train"
    _png(train / "a" / "ok.png", 12, 10)
    _png(train / "a" / "strip.png", 2000, 2)
    _png(train / "b" / "tall.png", 3, 90)
    _png(train / "b" / "ok.png", 10, 12)
    out = tmp_path / "train.beton"
    assert write.main([f"--cfg.data_dir={tmp_path / 'data'}", "--cfg.split=train", f"--cfg.write_path={out}",
                       "--cfg.max_resolution=64", "--cfg.num_workers=1"]) == 0
    rep = json.loads(Path(f"{out}.report.json").read_text())
    assert rep["written"] == 2 and rep["settings"]["max_aspect"] == 20
    assert {Path(s["path"]).name: s["error"].split(":")[0] for s in rep["skipped"]} == {
        "strip.png": "degenerate aspect ratio", "tall.png": "degenerate aspect ratio"}
    assert "stored 64x1 px (64:1" in next(s["error"] for s in rep["skipped"] if s["path"].endswith("strip.png"))


def test_the_val_crop_of_a_strip_is_at_least_a_pixel(tmp_path, no_jit):
    """The box of a 64x1 image rounded to 0 px: OpenCV's resize aborted the process (SIGABRT)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastvit_reduce.data.decoders import timm_center_crop
    from fastvit_reduce.data.loaders import create_val_loader
    for h, w in [(1, 64), (64, 1), (1, 1), (2, 300)]:
        i, j, ch, cw = timm_center_crop(h, w, 32, 0.875)
        assert ch >= 1 and cw >= 1 and i + ch <= h and j + cw <= w, (h, w)
    path = tmp_path / "strips.beton"
    images = [(np.full((1, 64, 3), 200, np.uint8), 0), (np.full((64, 1, 3), 50, np.uint8), 1)]
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(images)
    loader = create_val_loader(path, 2, "cpu", res=32, crop_pct=0.875, num_workers=1, in_memory=True,
                               distributed=False)
    [(x, y)] = list(loader)
    assert x.shape == (2, 3, 32, 32) and (x[0] == 200).all() and (x[1] == 50).all()


def test_a_jpeg_whose_frame_disagrees_with_the_sample_table_is_refused_on_read(tiny_beton, capsys):
    """libjpeg-turbo fits a JPEG of another size into the buffer without an error: garbage pixels."""
    from fastvit_reduce.data.betons import _Layout, verify_beton
    path = tiny_beton(n=12, size=24, write_mode="jpg")
    assert verify_beton(path) == 12
    lay = _Layout(Path(path))
    table = lay.metadata.copy()
    table[lay.metadata_type.names[0]]["width"][5] = 64  # the sample table says 64x24
    with open(path, "r+b") as f:
        f.seek(lay.metadata_start)
        f.write(table.tobytes())
    with pytest.raises(ConfigError, match=r"image 5's JPEG data holds a 24x24 px frame, but the sample "
                                          r"table says 64x24 px"):
        verify_beton(path)



# ----------------------------------------------------------------------------- corrupt JPEGs
def test_the_loaders_count_jpegs_that_fail_to_decode_and_black_them_out(tiny_beton, no_jit):
    """libjpeg-turbo's error code was ignored: the sample trained on whatever the buffer held."""
    from conftest import corrupt_jpeg
    from fastvit_reduce.data import loaders as L
    path = tiny_beton(n=20, write_mode="jpg")
    corrupt_jpeg(path, 7)
    val = L.create_val_loader(path, 8, "cpu", res=32, crop_pct=0.875, num_workers=1, in_memory=True,
                              distributed=False)
    first = next(iter(val))[0].clone()
    val.close()
    assert val.take_decode_failures() == [7] and val.take_decode_failures() == []
    assert (first[7] == 0).all() and (first[6] != 0).any()
    train = L.create_train_loader(path, 4, "cpu", res=32, num_workers=1, in_memory=True, batches_ahead=1,
                                  drop_last=False, order="random", aug_repeats=1, seed=0, distributed=False,
                                  rrc_scale=(0.08, 1), rrc_ratio=(0.75, 4 / 3), hflip=True)
    L.set_epoch(train, 0)
    assert sum(len(y) for _, y in train) == 20 and train.take_decode_failures() == [7]


def test_inspect_decodes_a_sample_by_default(tiny_beton, capsys, monkeypatch):
    from conftest import corrupt_jpeg
    from fastvit_reduce.data import inspect as inspect_cmd
    path = tiny_beton(n=20, write_mode="jpg")
    corrupt_jpeg(path, 0)
    assert inspect_cmd.main([path]) == 1  # no --deep: the 20 JPEGs are within the sample
    assert "decoded every JPEG: 1 fail" in capsys.readouterr().out
    monkeypatch.setattr(inspect_cmd, "SAMPLE_JPEGS", 5)  # as if the file held 4,000 JPEGs
    assert inspect_cmd.main([path]) == 1
    captured = capsys.readouterr()
    assert "decoded 5 of 20 JPEGs (evenly spread; --deep: all): 1 fail" in captured.out
    one_line_error(SimpleNamespace(readouterr=lambda: captured), "1 image(s) fail to decode: 0",
                   "(of 5 decoded; --deep decodes all 20)")


@pytest.mark.usefixtures("no_jit")
def test_the_trainer_counts_decode_errors_per_epoch_and_stops_above_the_limit(cfg, tmp_path, capsys):
    from conftest import corrupt_jpeg
    train = write_beton(tmp_path / "it's $(touch PWNED) train.beton", n=64, size=48, write_mode="jpg")
    for i in (5, 40):
        corrupt_jpeg(train, i)
    argv = ["--config", cfg, f"--data.train_dataset={train}", f"--logging.folder={tmp_path / 'runs'}"]
    assert main([*argv, "--logging.experiment=tolerated", "--data.max_decode_errors=5"]) == 0
    run = tmp_path / "runs" / "tolerated"
    assert [r["decode_errors"] for r in runs.RunFolder(run).read_rows()] == [2, 2]
    assert json.loads((run / "final.json").read_text())["decode_errors"] == 4
    assert "2 JPEG(s) failed to decode and were used as black images" in (run / "train.log").read_text()
    assert f"{train}: samples 5, 40" in (run / "train.log").read_text()

    capsys.readouterr()
    assert main([*argv, "--logging.experiment=refused", "--data.max_decode_errors=1"]) == 1
    err = one_line_error(capsys, "2 JPEG(s) failed to decode in epoch 0", "more than data.max_decode_errors=1",
                         "samples 5, 40")
    assert printed_commands(err, "fastvit-reduce") == [["fastvit-reduce", "inspect", "--deep", train]]
    run = tmp_path / "runs" / "refused"
    final = json.loads((run / "final.json").read_text())
    assert not final["completed"] and final["exit_reason"] == "2 JPEGs failed to decode in epoch 0"
    assert not (run / "last.pt").exists()  # the damaged epoch never becomes a resume point



# ----------------------------------------------------------------------------- the numba cache
@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh numba cache folder and key for this test, and warnings not yet given."""
    from fastvit_reduce.data import jit, jit_trust
    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(jit_trust.KEY_ENV, str(tmp_path / "key" / "jit.key"))
    monkeypatch.setattr(jit_trust, "_key", None)
    monkeypatch.setattr(jit, "_warned", set())
    return tmp_path / "cache"


def _compile_twice():
    """``twice`` compiled through the cache; returns its dispatcher after one call."""
    from ffcv.pipeline.compiler import Compiler

    from fastvit_reduce.data import jit

    def twice(x):
        return 2 * x
    with jit.cached_compilation():
        compiled = Compiler.compile(twice)
    assert compiled(np.int64(21)) == 42
    return compiled


def _hits(dispatcher) -> int:
    return sum(dispatcher.stats.cache_hits.values())


def test_a_planted_pickle_in_the_numba_cache_never_runs(own_cache, tmp_path):
    """numba's index files are pickles: a planted .nbi ran code in the next process to start."""
    import pickle
    _compile_twice()
    files = sorted(own_cache.rglob("*.nb[ic]"))
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert (tmp_path / "key" / "jit.key").stat().st_mode & 0o777 == 0o600
    marker = tmp_path / "PWNED"
    for p in files:
        p.write_bytes(pickle.dumps(Touch(marker)))
    with pytest.warns(RuntimeWarning, match="not signed with this user's key") as caught:
        assert _hits(_compile_twice()) == 0
    assert not marker.exists() and len(caught) == 1
    assert _hits(_compile_twice()) == 1  # rewritten, signed: loaded again


@pytest.mark.parametrize("case", ["group_writable_folder", "foreign_file", "readable_key"])
def test_a_cache_or_key_others_could_write_is_refused_with_one_warning(own_cache, tmp_path, case):
    _compile_twice()
    if case == "group_writable_folder":
        os.chmod(own_cache, 0o775)
        words = "writable by its group"
    elif case == "foreign_file":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        for p in own_cache.rglob("*.nb[ic]"):
            os.chown(p, 12345, -1)
        words = "belongs to uid 12345"
    else:
        from fastvit_reduce.data import jit_trust
        os.chmod(tmp_path / "key" / "jit.key", 0o644)
        jit_trust._key = None  # a new process reads the key again
        words = "readable by others"
    with pytest.warns(RuntimeWarning, match=words) as caught:
        assert _hits(_compile_twice()) == 0
    assert len(caught) == 1


@pytest.mark.slow  # a trainer process compiling every pipeline
@pytest.mark.usefixtures("one_thread")  # the first run, here, on one thread as the process runs
def test_a_trainer_start_on_a_planted_cache_runs_nothing_and_trains_alike(cfg, tmp_path, capsys):
    """The real start: a cache holding one run's pipelines (the session's, which the first run fills
    or loads: tests/conftest.py), copied with every file replaced by a pickle that would create a
    file; the next trainer, a fresh process, refuses them unread, compiles, and gets the same
    weights. The first run needs no fresh interpreter: it runs here (``main``)."""
    import pickle
    import subprocess
    import sys

    session, cache, marker = Path(os.environ["FASTVIT_REDUCE_JIT_CACHE"]), tmp_path / "cache", tmp_path / "PWNED"
    args = ["--config", cfg, "--training.epochs=1", f"--logging.folder={tmp_path / 'runs'}"]
    assert main([*args, "--logging.experiment=filled"]) == 0, capsys.readouterr().err[-3000:]
    planted = 0
    for p in session.rglob("*.nb[ic]"):  # other test workers may be writing beside us: copy file by file
        target = cache / p.relative_to(session)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.write_bytes(pickle.dumps(Touch(marker)))
        planted += 1
    assert planted
    env = dict(os.environ, FASTVIT_REDUCE_JIT_CACHE=str(cache), OMP_NUM_THREADS="1")
    second = subprocess.run([sys.executable, "-m", "fastvit_reduce.cli", "train", *args,
                             "--logging.experiment=planted"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not marker.exists()
    assert second.stderr.count("RuntimeWarning") == 1 and "not signed with this user's key" in second.stderr
    weights = [json.loads((tmp_path / "runs" / n / "final.json").read_text())["weights_hash"]
               for n in ("filled", "planted")]
    assert weights[0] == weights[1]
