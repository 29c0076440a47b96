"""fastvit_reduce.bench.timm_path: the timm data path of ``bench e2e`` (timm's own loaders on an
ImageFolder) and the Pillow-13 guard.

A tiny sample ImageFolder (4 classes, 64-96 px photos), 32 px batches, no worker processes.
"""
from __future__ import annotations

import pytest
import torch
from conftest import sample_photos
from PIL import Image

from fastvit_reduce.bench.timm_path import TimmSource, guard_posterize

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 4, 6, 2, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sample_photos(tmp_path_factory.mktemp("e2e"), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS)


def cfg(**changes) -> dict:
    """The keys TimmSource reads, at the seed recipe on a tiny ViT (what the trainer's resolved dict holds)."""
    base = {"model.arch": "vit_tiny_patch16_224", "model.num_classes": CLASSES, "model.img_size": 32,
            "model.patch_size": 8, "model.drop_path": 0.0, "reduction.strategy": "baseline",
            "resolution.min_res": 32, "resolution.max_res": 32, "validation.resolution": 0,
            "validation.batch_size": BATCH, "training.batch_size": BATCH, "training.seed": 0,
            "training.label_smoothing": 0.1, "data.num_workers": 0, "data.crop_pct": 0.0,
            "data.rrc_scale": [0.08, 1.0], "data.rrc_ratio": [0.75, 4 / 3], "data.hflip": True,
            "augment.randaugment": "rand-m9-mstd0.5-inc1", "augment.mixup": 0.8, "augment.cutmix": 1.0,
            "augment.mixup_prob": 1.0, "augment.mixup_switch_prob": 0.5, "augment.mixup_mode": "batch",
            "augment.reprob": 0.25, "augment.remode": "pixel", "augment.recount": 1, "augment.aug_repeats": 1}
    return {**base, **changes}


def source(folder, **changes) -> TimmSource:
    return TimmSource(cfg(**changes), torch.device("cpu"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                      train_dir=str(folder / "train"), val_dir=str(folder / "val"))


def test_posterize_guard_gives_black_for_zero_bits():
    from timm.data import auto_augment
    guard_posterize()
    guard_posterize()  # idempotent
    img = Image.new("RGB", (9, 7), (200, 100, 50))
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        out = auto_augment.NAME_TO_OP[name](img, 0)
        assert out.size == img.size and out.getextrema() == ((0, 0),) * 3, name
        assert auto_augment.NAME_TO_OP[name](img, 4).getpixel((0, 0)) == (192, 96, 48)  # bits > 0: PIL's own
    # the seed's spec at the magnitude that used to ask for bits=0
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(img).size == img.size


def test_seed_recipe_batches(folder):
    src = source(folder)
    assert src.soft_targets and len(src) == CLASSES * TRAIN_PER_CLASS // BATCH  # drop_last, as timm trains
    batches = list(src.epoch(0))
    assert len(batches) == len(src)
    for x, target, ready in batches:
        assert ready is None
        assert x.dtype == torch.float32 and x.shape == (BATCH, 3, 32, 32) and x.device.type == "cpu"
        assert target.shape == (BATCH, CLASSES) and target.dtype == torch.float32
        torch.testing.assert_close(target.sum(1), torch.ones(BATCH))  # soft rows (mixup + smoothing)
        assert target.min() > 0  # label smoothing reaches every class
    xs, labels = zip(*src.val())
    assert sum(len(y) for y in labels) == CLASSES * VAL_PER_CLASS
    assert all(y.dtype == torch.int64 for y in labels) and xs[0].shape[1:] == (3, 32, 32)
    assert abs(torch.cat(xs).mean().item()) < 1.0  # normalised (raw 0-255 would be ~100)


def test_without_mixup_targets_are_labels(folder):
    src = source(folder, **{"augment.mixup": 0.0, "augment.cutmix": 0.0, "augment.randaugment": ""})
    assert not src.soft_targets
    x, y, _ = next(iter(src.epoch(0)))
    assert y.dtype == torch.int64 and y.shape == (BATCH,) and y.max() < CLASSES


def test_progressive_resizing_is_refused(folder):
    from fastvit_reduce.config import ConfigError
    with pytest.raises(ConfigError, match="no progressive resizing"):
        source(folder, **{"resolution.min_res": 24})
