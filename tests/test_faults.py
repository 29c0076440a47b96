"""Hostile inputs and faults: each fault class ends in a one-line error, never a hang,
a traceback, silent loss or an injected command."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvit_reduce import sweep
from fastvit_reduce.data.betons import verify_beton


# ----------------------------------------------------------------------------- sweep children
def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_kill_9_of_the_sweep_ends_its_job():
    """A job outliving a kill -9'd sweep would race the re-run sweep for its run folder."""
    parent_code = ("import sys, time; from fastvit_reduce.sweep import launch; "
                   "p = launch([sys.executable, '-c', 'import time; time.sleep(120)']); "
                   "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20  # a liveness deadline, not a timing assertion
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), "the job survived the sweep"
    finally:
        parent.kill()
        if "child" in locals() and not _gone(child):
            os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- sweep --slurm injection
def test_slurm_refuses_a_config_name_that_would_inject_a_command(tmp_path, monkeypatch, capsys):
    """A newline in a config's file name used to end the script's comment line and run the rest."""
    evil = tmp_path / "x\n: ; touch PWNED #.yaml"
    evil.write_text("{}\n")
    bin_dir = tmp_path / "bin"  # a fake Slurm that really runs what it is given
    bin_dir.mkdir()
    for tool, body in {"sbatch": 'bash "$1" >/dev/null 2>&1; echo submitted', "srun": "true",
                       "scontrol": "echo node0", "scancel": "true"}.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)

    rc = sweep.main([str(evil), "--slurm", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: config path contains a control character") and err.count("\n") == 1
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--set", "--sbatch-arg", "--time", "--out"])
def test_sweep_refuses_control_characters_in_flags(tmp_path, capsys, flag):
    (tmp_path / "a.yaml").write_text("{}\n")
    value = {"--set": "training.epochs=1\ntouch X", "--sbatch-arg": "--partition=gpu\ntouch X",
             "--time": "1:00:00\ntouch X", "--out": str(tmp_path / "o\ntouch X")}[flag]
    args = [str(tmp_path / "a.yaml"), "--slurm", flag, value]
    if flag != "--out":
        args += ["--out", str(tmp_path / "o")]
    assert sweep.main(args) == 2
    assert "control character" in capsys.readouterr().err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_slurm_script_quotes_names_with_spaces_and_quotes(tmp_path, monkeypatch):
    """Spaces, quotes and $ in a config name stay data in the generated script."""
    odd = tmp_path / "it's $(touch PWNED) a.yaml"
    odd.write_text("{}\n")
    bash = shutil.which("bash")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: scripts are only written
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(odd), "--slurm", "--out", str(tmp_path / "out")]) == 0
    [script] = (tmp_path / "out" / "slurm").iterdir()
    subprocess.run([bash, "-n", str(script)], check=True)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for tool in ("srun", "scontrol", "scancel"):
        (fake / tool).write_text("#!/bin/sh\ntrue\n")
        (fake / tool).chmod(0o755)
    subprocess.run([bash, str(script)], env={"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "1",
                                                "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n0"},
                   capture_output=True, cwd=tmp_path, timeout=30)
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- damaged .beton
def _zero(path: str, start: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))


def _truncate_tail(path: str, nbytes: int = 100) -> None:
    os.truncate(path, os.path.getsize(path) - nbytes)


def _zero_middle_8mb(path: str) -> None:
    size = os.path.getsize(path)
    _zero(path, max(0, size // 2 - 4_000_000), 8_000_000)


def _zero_alloc_table(path: str) -> None:
    from ffcv.reader import Reader
    ptr = int(Reader(path).header["alloc_table_ptr"])
    _zero(path, ptr, os.path.getsize(path) - ptr)


def _zero_sample_table(path: str) -> None:
    from ffcv.types import FieldDescType, HeaderType
    _zero(path, HeaderType.itemsize + 2 * FieldDescType.itemsize, 24 * 8)  # first 8 records


def _zero_header(path: str) -> None:
    _zero(path, 0, 24)


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_verify_beton_accepts_a_healthy_file_and_reads_the_label_range(tiny_beton, mode):
    from fastvit_reduce.data.betons import label_range, verify_beton
    path = tiny_beton(n=40, num_classes=5, write_mode=mode)
    assert verify_beton(path) == 40
    assert label_range(path) == (0, 4, 40)


@pytest.mark.parametrize("mode, damage", [
    ("raw", _truncate_tail), ("jpg", _truncate_tail), ("jpg", _zero_middle_8mb),
    ("raw", _zero_alloc_table), ("raw", _zero_sample_table), ("raw", _zero_header),
    ("raw", lambda p: _truncate_tail(p, 5_000_000)),  # cut into the data pages
])
def test_verify_beton_finds_damage(tiny_beton, capsys, mode, damage):
    """The issue's cases: the last 100 bytes cut, 8 MB of zeros in the middle (and other regions)."""
    from fastvit_reduce.config import ConfigError
    from fastvit_reduce.data import inspect as inspect_cmd
    path = tiny_beton(n=64, num_classes=4, write_mode=mode)
    damage(path)
    capsys.readouterr()  # drop the writer's progress bar
    with pytest.raises(ConfigError, match="damaged .beton") as e:
        verify_beton(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
    assert inspect_cmd.main([path]) == 1  # plain inspect no longer calls it healthy
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: damaged .beton") and err.count("\n") == 1


def test_inspect_deep_lists_the_jpegs_that_do_not_decode(tiny_beton, capsys):
    """Damage inside one JPEG's compressed data keeps its markers and headers (the structure is
    fine); only decoding finds it."""
    from conftest import corrupt_jpeg
    from fastvit_reduce.data import inspect as inspect_cmd
    path = tiny_beton(n=20, num_classes=4, write_mode="jpg")
    corrupt_jpeg(path, 7)
    assert verify_beton(path) == 20
    assert inspect_cmd.deep_check(path) == [7]
    capsys.readouterr()
    assert inspect_cmd.main([path, "--deep"]) == 1
    assert "1 image(s) fail to decode: 7" in capsys.readouterr().err
    healthy = tiny_beton("ok.beton", n=20, num_classes=4, write_mode="jpg")
    assert inspect_cmd.main([healthy, "--deep"]) == 0
    assert "samples: 20" in capsys.readouterr().out


def test_label_range_reads_labels_from_the_file_without_classes_json(tiny_beton):
    from fastvit_reduce.data.betons import label_range
    path = tiny_beton(n=30, num_classes=6)
    assert not os.path.exists(path + ".classes.json")
    assert label_range(path) == (0, 5, 30)


# ----------------------------------------------------------------------------- checkpoints
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
