"""Hostile inputs and faults (issue 15): each fault class ends in a one-line error, never a hang,
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
    from fastvit_reduce.data.inspect import label_range, verify_beton
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
        inspect_cmd.verify_beton(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
    assert inspect_cmd.main([path]) == 1  # plain inspect no longer calls it healthy
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: damaged .beton") and err.count("\n") == 1


def test_inspect_deep_lists_the_jpegs_that_do_not_decode(tiny_beton, capsys):
    """Damage inside one JPEG keeps its markers (structure is fine); only decoding finds it."""
    from ffcv.reader import Reader

    from fastvit_reduce.data import inspect as inspect_cmd
    path = tiny_beton(n=20, num_classes=4, write_mode="jpg")
    meta = Reader(path).metadata
    ptr = int(meta["f0"]["data_ptr"][7])
    _zero(path, ptr + 2, 400)  # the JPEG headers after SOI
    assert inspect_cmd.verify_beton(path) == 20
    assert inspect_cmd.deep_check(path) == [7]
    capsys.readouterr()
    assert inspect_cmd.main([path, "--deep"]) == 1
    assert "1 image(s) fail to decode: 7" in capsys.readouterr().err
    healthy = tiny_beton("ok.beton", n=20, num_classes=4, write_mode="jpg")
    assert inspect_cmd.main([healthy, "--deep"]) == 0
    assert "samples: 20" in capsys.readouterr().out


def test_label_range_reads_labels_from_the_file_without_classes_json(tiny_beton):
    from fastvit_reduce.data.inspect import label_range
    path = tiny_beton(n=30, num_classes=6)
    assert not os.path.exists(path + ".classes.json")
    assert label_range(path) == (0, 5, 30)
