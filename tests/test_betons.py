"""fastvit_reduce.data.betons: a .beton is checked before training: missing, foreign, damaged
(truncated, zeroed regions), the wrong fields, class lists that differ; labels read from the file."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import write_beton

from fastvit_reduce.config import ConfigError
from fastvit_reduce.data.betons import check_beton, check_datasets, verify_beton
from fastvit_reduce.data.loaders import create_train_loader


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("betons") / "data.beton", n=40, num_classes=40, size=48)


def train_loader(path):
    return create_train_loader(path, 8, torch.device("cpu"), res=32, num_workers=2, in_memory=1, batches_ahead=2,
                               drop_last=True, order="random", aug_repeats=1, seed=0, distributed=False,
                               rrc_scale=[0.08, 1.0], rrc_ratio=[0.75, 4 / 3], hflip=1)


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


def test_label_range_reads_labels_from_the_file_without_classes_json(tiny_beton):
    from fastvit_reduce.data.betons import label_range
    path = tiny_beton(n=30, num_classes=6)
    assert not os.path.exists(path + ".classes.json")
    assert label_range(path) == (0, 5, 30)


def test_bad_dataset_paths(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        check_beton(tmp_path / "missing.beton")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton" * 100)
    with pytest.raises(ConfigError, match="damaged .beton: format version"):
        check_beton(junk)
    with pytest.raises(ConfigError, match="not found"):
        train_loader(str(tmp_path / "missing.beton"))
    with pytest.raises(ConfigError, match="no dataset"):
        check_beton("")


def test_wrong_fields(tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "labels_only.beton"
    DatasetWriter(str(path), {"label": IntField()}, num_workers=1).from_indexed_dataset([(1,), (2,)])
    with pytest.raises(ConfigError, match="expected the fields image .RGBImageField., label .IntField. in that order.*found label .IntField.$"):
        check_beton(path)


def test_mismatched_classes(beton, tmp_path):
    train, val = tmp_path / "train.beton", tmp_path / "val.beton"
    shutil.copy(beton, train)
    shutil.copy(beton, val)
    (tmp_path / "train.beton.classes.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "val.beton.classes.json").write_text(json.dumps(["cat", "dog"]))
    check_datasets(train, val)
    (tmp_path / "val.beton.classes.json").write_text(json.dumps(["cat", "fox"]))
    with pytest.raises(ConfigError, match="class lists differ"):
        check_datasets(train, val)
    (tmp_path / "val.beton.classes.json").write_text(json.dumps({"cat": 0}))
    with pytest.raises(ConfigError, match="list of class names"):
        check_datasets(train, val)
