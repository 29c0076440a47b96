"""Hostile inputs, third round: each class ends in one ``error:`` line and exit 2, or is refused,
counted and named, never a traceback, silent garbage or code run from a file.

Most cases run in this process (``train.main``, ``report.main``, ``runs.main``, ``sweep.main``);
only a signal from a terminal and a start on a planted numba cache need a real process.
"""
from __future__ import annotations

import os
import shlex

import numpy as np
import pytest
import torch

from conftest import write_beton, write_tiny_config
from fastvit_reduce import checkpoint as ckpt
from fastvit_reduce.config import ConfigError, load
from fastvit_reduce.settings import SECTIONS
from fastvit_reduce.train import main



@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny trainer config (64 train / 24 val images) in its own folder."""
    return write_tiny_config(tmp_path_factory.mktemp("hostile"))


def one_line_error(capsys, *words) -> str:
    """The captured stderr, which must be one ``error:`` line holding every word."""
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


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


def _odd_path(path, kind: str):
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


def _write_fields(path, fields: list[str]):
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


# ----------------------------------------------------------------------------- checkpoints
class _Touch:
    """Unpickling this runs ``touch <path>``: the file must never appear."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


@pytest.mark.parametrize("form", ["zip", 0, 1, 2, 3, 4, 5])
def test_a_hostile_pickle_is_called_unsafe_whatever_its_protocol(tmp_path, form):
    """torch words its refusal differently per pickle protocol; the file's own opcodes say unsafe."""
    import pickle
    marker, path = tmp_path / "PWNED", tmp_path / "last.pt"
    payload = {"format": 2, "model": _Touch(marker), "epoch": 0}
    if form == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=form))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path)
    assert e.value.kind == "unsafe" and "unsafe pickle: refused" in str(e.value)
    assert "system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
