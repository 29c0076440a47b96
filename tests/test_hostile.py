"""Hostile inputs: each class ends in one ``error:`` line and exit 2, or is refused,
counted and named, never a traceback, silent garbage or code run from a file.

Most cases run in this process (``train.main``, ``report.main``, ``runs.main``, ``sweep.main``);
only a signal from a terminal needs a real process. Hostile data (the writer, JPEGs that fail to
decode, the numba cache) is in test_hostile_data.py.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Touch, one_line_error, printed_commands, write_beton, write_tiny_config
from fastvit_reduce import checkpoint as ckpt
from fastvit_reduce import report, runs, runtime, sweep, trainer
from fastvit_reduce.config import ConfigError, load
from fastvit_reduce.settings import SECTIONS
from fastvit_reduce.train import main

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, as Python holds them (surrogate escapes)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny trainer config (64 train / 24 val images) in its own folder."""
    return write_tiny_config(tmp_path_factory.mktemp("hostile"))


# ----------------------------------------------------------------------------- config files
@pytest.mark.parametrize("text, key", [
    ("training:\n  epochs:\n", "training.epochs"),           # the value forgotten
    ("training:\n  epochs: ~\n", "training.epochs"),
    ("training:\n", "training"),                            # a section left empty
    ("data: {train_dataset: null}\n", "data.train_dataset"),
])
def test_an_empty_yaml_value_is_an_error_naming_the_key(tmp_path, text, key):
    """fastargs took a null for "not given" and silently used the code's default (300 epochs)."""
    base = tmp_path / "base.yaml"
    base.write_text("training: {epochs: 2}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: base.yaml\n{text}")
    with pytest.raises(ConfigError, match=rf"child.yaml: line \d+: '{key}' has no value") as e:
        load([str(child)], {}, SECTIONS)
    assert "\n" not in str(e.value)


def test_non_utf8_yaml_is_one_line(cfg, tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"# caf\xe9\ntraining: {epochs: 1}\n")
    assert main(["--config", str(bad)]) == 2
    one_line_error(capsys, str(bad), "not UTF-8", "0xe9")


@pytest.mark.parametrize("kind", ["fifo", "folder", "loop", "dangling"])
def test_a_config_that_is_not_a_file_says_what_it_is(tmp_path, capsys, kind):
    path = _odd_path(tmp_path / "c.yaml", kind)
    assert main(["--config", str(path)]) == 2
    one_line_error(capsys, str(path), WHAT[kind])


WHAT = {"fifo": "a FIFO", "folder": "a folder", "loop": "a symbolic link loop", "dangling": "a symbolic link to nothing"}


def _odd_path(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        os.symlink(path.name, path)
    else:
        os.symlink(path.name + ".missing", path)
    return path


# ----------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "loop", "dangling"])
def test_a_dataset_that_is_not_a_file_says_what_it_is(cfg, tmp_path, capsys, split, kind):
    path = _odd_path(tmp_path / "d.beton", kind)
    assert main(["--config", cfg, f"--data.{split}_dataset={path}"]) == 2
    one_line_error(capsys, str(path), WHAT[kind])
    from fastvit_reduce.data import inspect as inspect_cmd
    assert inspect_cmd.main([str(path)]) == 2
    one_line_error(capsys, str(path), WHAT[kind])


def _write_fields(path: Path, fields: list[str]) -> Path:
    """A .beton with ffcv's writer and the given fields, in this order ('image', 'label', 'extra')."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastvit_reduce.data.synthetic import make_images
    make = {"image": lambda: RGBImageField(write_mode="raw", max_resolution=16), "label": IntField,
            "extra": IntField}
    samples = [{"image": im, "label": lab, "extra": 7} for im, lab in make_images(8, 4, size=16)]

    class Samples:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return tuple(samples[i][f] for f in fields)

    DatasetWriter(str(path), {f: make[f]() for f in fields}, num_workers=1).from_indexed_dataset(Samples())
    return path


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case", ["order", "extra", "empty"])
def test_a_beton_of_another_layout_or_empty_is_one_line(cfg, tmp_path, capsys, split, case):
    path = tmp_path / f"{case}.beton"
    if case == "order":
        _write_fields(path, ["label", "image"])
        words = ["expected the fields image (RGBImageField), label (IntField) in that order",
                 "found label (IntField), image (RGBImageField)"]
    elif case == "extra":
        _write_fields(path, ["image", "label", "extra"])
        words = ["found image (RGBImageField), label (IntField), extra (IntField)"]
    else:
        write_beton(path, n=8, size=16)
        with open(path, "r+b") as f:  # the header's sample count (ffcv/types.py: u2 u2 u4 | u8)
            f.seek(8)
            f.write(np.uint64(0).tobytes())
        words = ["holds no samples"]
    capsys.readouterr()  # the writer's progress bar
    assert main(["--config", cfg, f"--data.{split}_dataset={path}"]) == 2
    one_line_error(capsys, str(path), *words)


# ----------------------------------------------------------------------------- run folders
@pytest.mark.parametrize("where", ["experiment", "folder"])
def test_a_run_folder_name_that_is_not_utf8_is_one_line(cfg, tmp_path, capsys, where):
    arg = (f"--logging.experiment=x{NOT_UTF8}" if where == "experiment"
           else f"--logging.folder={tmp_path / NOT_UTF8}")
    assert main(["--config", cfg, arg]) == 2
    one_line_error(capsys, "not valid UTF-8", "caf\\xe9")


def test_a_300_character_experiment_name_is_one_line(cfg, capsys):
    assert main(["--config", cfg, "--logging.experiment=" + "x" * 300]) == 2
    one_line_error(capsys, "logging.experiment is 300 bytes long", "at most 255")


@pytest.mark.parametrize("folder, name", [("/proc", "self"), ("/proc", "fvr-test"), ("/sys", "kernel"),
                                          ("/sys/fvr-test", "x")])
def test_a_logging_folder_where_nothing_can_be_written_is_one_line(cfg, capsys, folder, name):
    """os.access says yes to root in /proc and /sys, where nothing can be created."""
    assert main(["--config", cfg, f"--logging.folder={folder}", f"--logging.experiment={name}"]) == 2
    one_line_error(capsys, f"{folder}/{name}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes through folder permissions")
def test_a_logging_folder_without_permission_is_one_line(cfg, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)  # not even stat() may look inside: Path.exists() raises
    assert main(["--config", cfg, f"--logging.folder={locked / 'sub'}", "--logging.experiment=x"]) == 2
    one_line_error(capsys, str(locked))


def _run_folder(root: Path, name: str = "run", final=None) -> Path:
    """A finished-looking run folder as the trainer writes it, ``final`` replacing final.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "params.json").write_text(json.dumps({"config": {"reduction.strategy": "baseline"}}))
    (run / "log.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "eval_top1": 5.0}) + "\n")
    good = {"experiment": name, "strategy": "baseline", "top_1": 5.0, "best_top_1": 5.0, "final_top_1": 5.0,
            "completed": True, "weights_hash": "ab", "epochs_done": 1}
    data = final if isinstance(final, bytes) else json.dumps(good if final is None else final).encode()
    (run / "final.json").write_bytes(data)
    return run


@pytest.mark.parametrize("final, words", [
    (b'{"experiment": "caf\xe9"}', ["final.json", "not UTF-8"]),
    ([1, 2, 3], ["final.json", "expected a JSON object, found a list"]),
    ({"top_1": "high", "completed": True}, ["final.json", "'top_1' is 'high', expected int or float or null"]),
    ({"completed": "yes"}, ["'completed' is 'yes', expected bool"]),
    ({"paired_with": [1]}, ["'paired_with' is not a list of names"]),
])
@pytest.mark.parametrize("command", ["report", "compare", "resume"])
def test_final_json_that_is_not_utf8_or_of_another_shape_is_one_line(cfg, tmp_path, capsys, final, words, command):
    run = _run_folder(tmp_path / "runs", "run", final)
    if command == "report":
        assert report.main([str(run), "--out", str(tmp_path / "out")]) == 2
    elif command == "compare":
        other = _run_folder(tmp_path / "runs", "other")
        assert runs.main([str(run), str(other)]) == 2
    else:
        assert main(["--config", cfg, f"--logging.folder={tmp_path / 'runs'}", "--logging.experiment=run"]) == 2
    one_line_error(capsys, str(run), *words)


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_run_folder_whose_name_is_not_utf8_is_one_line(tmp_path, capsys, command):
    run = _run_folder(tmp_path / "runs", f"run-{NOT_UTF8}")
    other = _run_folder(tmp_path / "runs", "other")
    if command == "report":
        assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    else:
        assert runs.main([str(run), str(other)]) == 2
    one_line_error(capsys, "not valid UTF-8", "run-caf\\xe9")


def test_a_log_row_of_another_shape_is_named(tmp_path, capsys):
    run = _run_folder(tmp_path / "runs")
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "eval_top1": "high"}) + "\n")
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "log.jsonl line 2", "'eval_top1' is 'high'")


@pytest.mark.parametrize("command", ["report", "sweep"])
def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys, command):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    if command == "report":
        assert report.main([str(_run_folder(tmp_path / "runs")), "--out", str(out)]) == 2
    else:
        (tmp_path / "a.yaml").write_text("{}\n")
        assert sweep.main([str(tmp_path / "a.yaml"), "--out", str(out)]) == 2
    one_line_error(capsys, f"--out {out} is a file, not a folder")
    assert out.read_text() == "not a folder"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("form", ["zip", 0, 1, 2, 3, 4, 5])
def test_a_hostile_pickle_is_called_unsafe_whatever_its_protocol(tmp_path, form):
    """torch words its refusal differently per pickle protocol; the file's own opcodes say unsafe."""
    import pickle
    marker, path = tmp_path / "PWNED", tmp_path / "last.pt"
    payload = {"format": 2, "model": Touch(marker), "epoch": 0}
    if form == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=form))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path)
    assert e.value.kind == "unsafe" and "unsafe pickle: refused" in str(e.value)
    assert "system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def stopped_run(cfg):
    """A run stopped (SIGTERM, as a scheduler sends it) after its first epoch: last.pt and best.pt."""
    import fastvit_reduce.data.ffcv_patch  # noqa: F401
    from ffcv.pipeline.compiler import Compiler
    before, original = Compiler.is_enabled, trainer.Trainer.end_epoch

    def end_epoch(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    Compiler.set_enabled(False)
    trainer.Trainer.end_epoch = end_epoch
    try:
        assert main(["--config", cfg, "--logging.experiment=stopped"]) == 124
    finally:
        trainer.Trainer.end_epoch = original
        Compiler.set_enabled(before)
    return Path(cfg).parent / "runs" / "stopped"


def _copy_run(stopped_run: Path, name: str) -> Path:
    import shutil
    return Path(shutil.copytree(stopped_run, stopped_run.parent / name))


@pytest.mark.usefixtures("no_jit")
def test_best_pt_copied_over_last_pt_is_named_with_what_to_do(cfg, stopped_run, capsys):
    run = _copy_run(stopped_run, "best_over_last")
    (run / "last.pt").write_bytes((run / "best.pt").read_bytes())
    capsys.readouterr()
    assert main(["--config", cfg, "--logging.experiment=best_over_last"]) == 2
    one_line_error(capsys, "this is a best.pt", "not a last.pt", "--checkpoint.on_damaged=best")
    assert main(["--config", cfg, "--logging.experiment=best_over_last", "--checkpoint.on_damaged=best"]) == 0
    assert json.loads((run / "final.json").read_text())["completed"]


@pytest.mark.usefixtures("no_jit")
def test_last_pt_of_another_format_is_named(cfg, stopped_run, capsys):
    run = _copy_run(stopped_run, "old_format")
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "format": 1}, run / "last.pt")
    capsys.readouterr()
    assert main(["--config", cfg, "--logging.experiment=old_format"]) == 2
    one_line_error(capsys, "checkpoint format 1", "reads format 2", "--checkpoint.on_damaged=fresh")


@pytest.mark.usefixtures("no_jit")
def test_resuming_into_another_dataset_is_refused_and_a_moved_one_is_not(cfg, stopped_run, tmp_path, capsys):
    run = _copy_run(stopped_run, "data_change")
    train = Path(cfg).parent / "train.beton"
    other = write_beton(tmp_path / "other.beton", n=48, size=40, seed=5)  # fewer updates per epoch
    argv = ["--config", cfg, "--logging.experiment=data_change"]
    capsys.readouterr()
    assert main([*argv, f"--data.train_dataset={other}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert f"data.train_dataset: {train}" in err and f"-> {other} (48 samples" in err

    moved = tmp_path / "copied_to_local_disk.beton"
    moved.write_bytes(train.read_bytes())
    assert main([*argv, f"--data.train_dataset={moved}"]) == 0
    assert "moved from" in (run / "train.log").read_text()
    capsys.readouterr()
    assert main([*argv, f"--data.train_dataset={other}"]) == 2  # finished: judged on the data too
    assert "finished run with a different configuration" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ctrl-C
SLOW_RUNNER = """import sys, time
import fastvit_reduce.data.ffcv_patch  # the fast ffcv import
from ffcv.pipeline.compiler import Compiler
Compiler.set_enabled(False)  # why: tests skip ffcv's numba JIT
from fastvit_reduce import trainer
step = trainer.Variant.micro_step
def slow(self, *args, **kwargs):  # a step long enough for a signal to land inside an epoch
    time.sleep(0.15)
    return step(self, *args, **kwargs)
trainer.Variant.micro_step = slow
from fastvit_reduce.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_stop_signal_counts_ctrl_c_and_a_second_one_raises():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a shell's background job
    stop = runtime.StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow  # two trainer processes, two runs here
def test_ctrl_c_saves_the_step_and_a_second_one_stops_at_once(cfg, tmp_path, no_jit):
    """Ctrl-C used to end in a raw KeyboardInterrupt traceback, exit 130 and no save. The two runs
    that get Ctrl-C are processes; the re-run that finishes and the reference run that is never
    stopped run here (``main``: the same code without a process start)."""
    import subprocess
    import sys
    import time
    runner = tmp_path / "runner.py"
    runner.write_text(SLOW_RUNNER)
    args = ["--config", cfg, "--logging.experiment=ctrl_c", "--training.epochs=3",
            f"--logging.folder={tmp_path / 'runs'}", "--logging.every_steps=1000", "--checkpoint.every_minutes=0"]
    argv = [sys.executable, str(runner), *args]
    run = tmp_path / "runs" / "ctrl_c"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def interrupt(times: int, after: str) -> subprocess.CompletedProcess:
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120  # a liveness limit, not a timing assertion
        while after not in (run / "train.log").read_text() if (run / "train.log").is_file() else True:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # a few steps into the epoch
        for _ in range(times):
            p.send_signal(signal.SIGINT)
            time.sleep(0.02)
        out, err = p.communicate(timeout=120)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    once = interrupt(1, "training ctrl_c")
    assert once.returncode == 130 and "Traceback" not in once.stderr, once.stderr
    assert "stopped by Ctrl-C (SIGINT); last.pt holds the state" in once.stdout
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 8 and state["updates"] == state["step_in_epoch"]

    log_lines = len((run / "train.log").read_text().splitlines())
    twice = interrupt(2, "resuming from last.pt")
    assert twice.returncode == 130 and "Traceback" not in twice.stderr + twice.stdout
    assert twice.stderr.count("\n") == 1 and twice.stderr.startswith("error: interrupted (Ctrl-C)")
    ckpt.load(run / "last.pt")  # the old one or a new one, never half of one
    assert not list(run.glob(".last.pt.tmp*"))

    assert main(args) == 0  # resumes from whichever last.pt the second Ctrl-C left
    assert (run / "train.log").read_text().splitlines()[log_lines:]  # the log goes on
    assert main([*args, "--logging.experiment=unbroken"]) == 0
    fin = json.loads((run / "final.json").read_text())
    assert fin["completed"] and fin["weights_hash"] == json.loads(
        (tmp_path / "runs" / "unbroken" / "final.json").read_text())["weights_hash"]


def test_a_paired_variant_stopped_inside_its_own_save_goes_back_to_prev():
    """b's last.pt had become prev.pt and its new one was being written: all go back, none restart."""
    assert runs.resume_position({"a": (1, 4), "b": None, "c": (1, 3)}, {"a": (1, 3), "b": (1, 3)}) == \
        ((1, 3), {"a": "prev", "b": "prev", "c": "last"})


# ----------------------------------------------------------------------------- printed commands
@pytest.mark.parametrize("name", ["with space", "it's", "$(touch PWNED)", "a;b|c&d", "`x`"])
def test_every_path_printed_as_a_command_is_quoted(tmp_path, monkeypatch, capsys, name):
    """'submit them with: sbatch PATH' printed a config's name unquoted: paste-able injection."""
    folder = tmp_path / name
    folder.mkdir()
    config = folder / f"{name}.yaml"
    config.write_text("{}\n")
    out = folder / "out"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: the scripts are written and printed
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(config), "--slurm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    [script] = (out / "slurm").iterdir()
    assert printed_commands(printed, "sbatch") == [["sbatch", str(script.resolve())]]
    assert printed_commands(printed, "fastvit-reduce") == [["fastvit-reduce", "report", str(out)]]
    assert not (tmp_path / "PWNED").exists()
