"""The run folder (fastvit_reduce.runs): one writer, plain names, resumes that cannot lie."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_config
from fastvit_reduce import runs, trainer
from fastvit_reduce.config import ConfigError
from fastvit_reduce.runs import RunFolder
from fastvit_reduce.train import main


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("runs"))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, cfg, capsys):
    folder = runs.RunFolder(Path(cfg).parent / "runs" / "locked")
    folder.create()
    # another process (as a requeued job's old copy would) holds the lock while we start
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from fastvit_reduce.runs import RunFolder
f = RunFolder({str(folder.path)!r}); f.lock(); print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["--config", cfg, "--logging.experiment=locked"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use by another trainer" in err
    finally:
        holder.kill()
        holder.wait()
    assert folder.lock() is None  # the OS dropped the dead holder's lock
    folder.unlock()


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", ".", "a/b", "bad\nname"])
def test_experiment_names_must_stay_below_the_folder(cfg, capsys, name):
    assert main(["--config", cfg, f"--logging.experiment={name}"]) == 2
    assert "must be a plain folder name" in capsys.readouterr().err


def test_a_logging_folder_that_is_a_file_is_a_one_line_error(cfg, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--config", cfg, f"--logging.folder={tmp_path / 'file'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def stop_after_first_epoch(monkeypatch):
    """SIGTERM to ourselves right after epoch 0 is saved, as a scheduler would send it."""
    original = trainer.Trainer.end_epoch

    def end_epoch(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(trainer.Trainer, "end_epoch", end_epoch)


@pytest.mark.usefixtures("no_jit")
def test_resume_needs_no_log_jsonl_and_a_damaged_last_pt_is_named_then_moved_aside(cfg, capsys, monkeypatch):
    run = Path(cfg).parent / "runs" / "resume"
    argv = ["--config", cfg, "--logging.experiment=resume"]
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert main(argv) == 124
    (run / "log.jsonl").unlink()  # the rows live in last.pt too
    assert main(argv) == 0
    fin = json.loads((run / "final.json").read_text())
    assert fin["completed"] and fin["epochs_done"] == 2
    assert [r["epoch"] for r in runs.RunFolder(run).read_rows()] == [0, 1]

    bad = run.parent / "damaged"
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert main(["--config", cfg, "--logging.experiment=damaged"]) == 124
    (bad / "last.pt").write_bytes(b"\x00" * 1000)
    capsys.readouterr()
    assert main(["--config", cfg, "--logging.experiment=damaged"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "--checkpoint.on_damaged=fresh" in err and "weights_only=False" not in err
    assert main(["--config", cfg, "--logging.experiment=damaged", "--checkpoint.on_damaged=fresh"]) == 0
    assert [p.name for p in bad.iterdir() if p.name.startswith("last.pt.damaged-")]
    assert json.loads((bad / "final.json").read_text())["epochs_done"] == 2


def test_resume_position_sends_variants_ahead_back_to_prev():
    assert runs.resume_position({"a": (1, 3), "b": (1, 3)}, {}) == ((1, 3), {"a": "last", "b": "last"})
    assert runs.resume_position({"a": (1, 4), "b": (1, 3)}, {"a": (1, 3)}) == ((1, 3), {"a": "prev", "b": "last"})
    assert runs.resume_position({"a": (1, 4), "b": None}, {}) == (None, {"a": None, "b": None})
    with pytest.raises(runs.RunFolderError, match="no prev.pt matches"):
        runs.resume_position({"a": (2, 0), "b": (1, 3)}, {"a": (1, 5)})


def test_config_changes_ignore_harmless_keys():
    old = {"training.epochs": 2, "data.num_workers": 1, "logging.progress": 0}
    assert runs.config_changes(old, {**old, "data.num_workers": 8, "logging.progress": 1}) == []
    assert runs.config_changes(old, {**old, "training.epochs": 3}) == ["training.epochs: 2 -> 3"]
    with pytest.raises(ConfigError):
        runs.check_experiment_name("..")


def _fake_run(folder: Path, hashes: list[str], threads: int | None = 1, first_batch: str = "fb0") -> Path:
    """A run folder as the trainer leaves it: log.jsonl rows per epoch and final.json."""
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "train_loss": 2.0 - 0.1 * e, "eval_top1": 50.0 + e, "weights_hash": h}
            for e, h in enumerate(hashes)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"weights_hash": hashes[-1], "first_batch_hash": first_batch, "epochs_done": len(hashes),
             "completed": True}
    if threads is not None:
        final["torch_threads"] = threads
    (folder / "final.json").write_text(json.dumps(final))
    return folder


def test_compare_says_equal_or_names_the_first_differing_epoch_and_why(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", ["h0", "h1", "h2"])
    assert runs.main([str(a), str(_fake_run(tmp_path / "b", ["h0", "h1", "h2"]))]) == 0
    assert capsys.readouterr().out.startswith("equal: final weights h2 in both")
    c = _fake_run(tmp_path / "c", ["h0", "x1", "x2"], threads=2)
    assert runs.main([str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "different: final weights h2 vs x2" in out and "first differing epoch: 1 (weights_hash)" in out
    assert "torch threads differ (1 vs 2)" in out  # the usual reason two CPU runs drift apart
    d = _fake_run(tmp_path / "d", ["y0", "y1", "y2"], threads=None, first_batch="fb1")
    equal, text = runs.compare(a, d)
    assert not equal and "first batches differ" in text and "torch threads" not in text  # old run: no count
    assert runs.main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "no final.json" in capsys.readouterr().err


def test_read_rows_skips_torn_lines(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    assert RunFolder(tmp_path).read_rows() == [{"epoch": 0}, {"epoch": 1}]
    assert RunFolder(tmp_path / "missing").read_rows() == []
