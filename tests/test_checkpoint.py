"""fastvit_reduce.checkpoint: plain-value checkpoints, written atomically, loaded without unsafe
pickles; a damaged, foreign or unsafe file is named in one line, a full disk keeps the old file."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastvit_reduce import checkpoint as ckpt


def test_checkpoint_roundtrip_keeps_shared_tensors(tmp_path):
    w = torch.randn(3, 3)
    state = {"format": 2, "epoch": 0, "model": {"a": w, "b": w}, "n": 1, "t": (1, "x", None)}
    ckpt.save(state, tmp_path / "c.pt")
    back = ckpt.load(tmp_path / "c.pt")
    assert back["model"]["a"].data_ptr() == back["model"]["b"].data_ptr() and back["t"] == (1, "x", None)
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]  # no temp file left


def test_checkpoint_refuses_non_plain_values_and_pickles(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"state\['cfg'\] is a pathlib"):
        ckpt.save({"cfg": tmp_path}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    torch.save({"format": 2, "model": SimpleNamespace(a=1), "epoch": 0}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="unsafe pickle: refused"):
        ckpt.load(tmp_path / "evil.pt")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save({"format": 2, "model": {}, "epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous last.pt is intact"):
        ckpt.save({"format": 2, "model": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def _good_state():
    import torch
    return {"format": 2, "model": {"w": torch.arange(20000.0).reshape(100, 200)}, "epoch": 3}


def _good_bytes(tmp_path) -> bytes:
    from fastvit_reduce import checkpoint as ckpt
    ckpt.save(_good_state(), tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


@pytest.mark.parametrize("make, kind, words", [
    (lambda good: os.urandom(5000), "damaged", "damaged"),
    (lambda good: b"epoch: 3\nthis is a text file\n", "damaged", "damaged"),
    (lambda good: b"", "damaged", "damaged: empty file"),
    (lambda good: good[: len(good) // 2], "damaged", "damaged"),
    (lambda good: good[:-100], "damaged", "damaged"),
    (lambda good: good[:3000] + bytes(30000) + good[33000:], "damaged", "CRC mismatch"),
])
def test_load_calls_a_damaged_checkpoint_damaged(tmp_path, make, kind, words):
    from fastvit_reduce import checkpoint as ckpt
    path = tmp_path / "last.pt"
    path.write_bytes(make(_good_bytes(tmp_path)))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path)
    assert e.value.kind == kind and words in str(e.value) and str(path) in str(e.value)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_load_refuses_foreign_and_unsafe_files_with_their_own_words(tmp_path):
    from types import SimpleNamespace

    import torch

    from fastvit_reduce import checkpoint as ckpt
    cases = {"foreign_dict.pt": ({"state_dict": {}}, "foreign", "not a fastvit-reduce checkpoint"),
             "list.pt": ([1, 2, 3], "foreign", "not a fastvit-reduce checkpoint"),
             "tensor.pt": (torch.zeros(3), "foreign", "not a fastvit-reduce checkpoint"),
             "evil.pt": ({"format": 2, "model": SimpleNamespace(a=1), "epoch": 0}, "unsafe",
                         "unsafe pickle: refused")}
    for name, (obj, kind, words) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load(tmp_path / name)
        assert e.value.kind == kind and words in str(e.value), name
        assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert ckpt.load(_save_good(tmp_path))["epoch"] == 3  # and ours still loads


def _save_good(tmp_path):
    from fastvit_reduce import checkpoint as ckpt
    ckpt.save(_good_state(), tmp_path / "good.pt")
    return tmp_path / "good.pt"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_during_save_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path, monkeypatch, error):
    import torch

    from fastvit_reduce import checkpoint as ckpt
    path = _save_good(tmp_path).rename(tmp_path / "last.pt")

    def full_disk(obj, f):
        f.write(b"x" * 100_000)  # part of the file, then the disk is full
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=rf"could not write checkpoint {path}: .*"
                                                   rf"{str(error)[-20:]}; the previous last.pt is intact") as e:
        ckpt.save(_good_state() | {"epoch": 4}, path)
    assert e.value.kind == "write"
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_clean_stale_tmp_removes_temp_files_of_dead_pids_only(tmp_path):
    from fastvit_reduce import checkpoint as ckpt
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".last.pt.tmp{dead}", f".last.pt.tmp{alive.pid}", f".best.pt.tmp{os.getpid()}",
                     "last.pt", "notes.tmp123"):
            (tmp_path / name).write_bytes(b"x")
        removed = ckpt.clean_stale_tmp(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in removed) == sorted([f".last.pt.tmp{dead}", f".best.pt.tmp{os.getpid()}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".last.pt.tmp{alive.pid}", "last.pt",
                                                                 "notes.tmp123"])


def test_move_aside_renames_with_a_utc_stamp(tmp_path):
    from fastvit_reduce import checkpoint as ckpt
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"junk")
    first = ckpt.move_aside(bad)
    bad.write_bytes(b"junk again")
    second = ckpt.move_aside(bad)
    assert not bad.exists() and first != second
    for moved in (first, second):
        assert moved.parent == tmp_path and moved.name.startswith("last.pt.damaged-20")
        assert moved.name.split("damaged-")[1][:16].endswith("Z")
