"""fastvit_reduce.sample, the embedded sample dataset: ImageNet layout, valid JPEGs, byte-identical for a seed."""
from __future__ import annotations

import re

import pytest
from PIL import Image

from fastvit_reduce import sample

SMALL = dict(train_per_class=3, val_per_class=2, min_size=64, max_size=96, num_classes=4)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    sample.build_sample(root / "a", seed=1, **SMALL)
    sample.build_sample(root / "b", seed=1, **SMALL)
    sample.build_sample(root / "c", seed=2, **SMALL)
    return root


def test_layout_is_imagenet_like(built):
    root = built / "a"
    train = sorted(p.name for p in (root / "train").iterdir())
    val = sorted(p.name for p in (root / "val").iterdir())
    assert train == val == sample.class_folders([n for n, _ in sample.SOURCES[:4]])
    assert all(re.fullmatch(r"n\d{8}_[a-z_]+", name) for name in train)
    for split, per_class in (("train", 3), ("val", 2)):
        for folder in train:
            images = sorted((root / split / folder).glob("*.JPEG"))
            assert len(images) == per_class
            for path in images:
                with Image.open(path) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert 64 <= max(im.size) <= 96
    assert sorted(p.name for p in root.iterdir()) == ["sample.json", "train", "val"]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(built):
    a, b, c = files(built / "a"), files(built / "b"), files(built / "c")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_val_images_are_other_crops_than_train(built):
    a = files(built / "a")
    train = {v for k, v in a.items() if k.startswith("train/")}
    val = {v for k, v in a.items() if k.startswith("val/")}
    assert len(train) == 12 and len(val) == 8 and not train & val


def test_cli_reuses_same_settings_and_refuses_others(built, capsys):
    root = str(built / "a")
    args = ["--out", root, "--seed", "1", "--train-per-class", "3", "--val-per-class", "2",
            "--min-size", "64", "--max-size", "96", "--num-classes", "4"]
    assert sample.main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert sample.main(args[:3] + ["2"] + args[4:]) == 2  # other seed, same folder
    assert "other settings" in capsys.readouterr().err
    assert sample.main(["--out", root + "_x", "--min-size", "500", "--max-size", "100"]) == 2
    assert "--min-size" in capsys.readouterr().err
    (built / "a_file").write_text("")
    assert sample.main(["--out", str(built / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err
