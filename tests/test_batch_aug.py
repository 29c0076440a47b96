"""normalize, BatchAugment (RandAugment → normalise → timm Mixup/CutMix → timm RandomErasing)
and augment_from_config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvit_reduce.augment import BatchAugment, augment_from_config, normalize
from fastvit_reduce.config import ConfigError, load_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet defaults
C = 10  # classes


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for small tensors


def batch(b: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(0, C, (b,), generator=g)


def test_normalize():
    images, _ = batch(4)
    x = normalize(images, MEAN, STD)
    want = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, want, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images, MEAN, STD, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mean needs 3"):
        normalize(images, (0.5,), STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize(images, MEAN, (0.2, 0.0, 0.2))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_soft_targets_sum_to_one_even_and_odd(mode):
    aug = BatchAugment(C, MEAN, STD, mixup=0.8, cutmix=1.0, mixup_mode=mode, label_smoothing=0.1,
                       dtype=torch.bfloat16)
    assert aug.soft_targets
    for b in (1, 2, 7, 8):
        images, labels = batch(b, seed=b)
        before = images.clone()
        x, t = aug(images, labels)
        assert x.shape == images.shape and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert t.shape == (b, C) and t.dtype == torch.float32
        assert torch.allclose(t.sum(1), torch.ones(b), atol=1e-5)
        assert torch.equal(images, before)  # ffcv reuses its buffers: never write into them
        if b % 2:  # the odd one out: not mixed, its own smoothed one-hot (0.1 spread over C)
            last = torch.full((C,), 0.1 / C)
            last[labels[-1]] += 0.9
            assert torch.allclose(t[-1], last)
            assert torch.equal(x[-1], normalize(images[-1:], MEAN, STD, torch.bfloat16)[0])


def test_mixup_mixes_pairs_i_and_last_minus_i():
    """Batch-mode mixup with lam in (0, 1): image 0 = lam * x0 + (1 - lam) * x_last, as timm."""
    np.random.seed(0)  # timm's Mixup draws lambda from numpy's global RNG
    aug = BatchAugment(C, MEAN, STD, mixup=1.0, label_smoothing=0.0)
    images, labels = batch(6)
    labels = torch.arange(6)
    x, t = aug(images, labels)
    lam = t[0, 0].item()  # smoothing 0: the target of image 0 is lam on class 0
    assert 0 < lam < 1 and t[0, 5].item() == pytest.approx(1 - lam)
    clean = normalize(images, MEAN, STD)
    assert torch.allclose(x[0], lam * clean[0] + (1 - lam) * clean[5], atol=1e-5)


def test_mixup_off_returns_hard_labels():
    aug = BatchAugment(C, MEAN, STD, mixup=0.0, cutmix=0.0, randaugment="rand-m9-mstd0.5-inc1")
    assert not aug.soft_targets
    images, labels = batch(5)
    x, y = aug(images, labels)
    assert y is labels and x.shape == images.shape and x.dtype == torch.float32


def test_random_erasing_runs_after_normalisation():
    """remode const writes 0 into the *normalised* batch (= the mean colour); erasing before
    normalisation would leave -mean/std instead. Unerased pixels are never exactly 0 here,
    since 255 * mean is not an integer."""
    aug = BatchAugment(C, MEAN, STD, reprob=1.0, remode="const", recount=1)
    images, labels = batch(8, size=48)
    x, _ = aug(images, labels)
    clean = normalize(images, MEAN, STD)
    assert not clean.eq(0).any()
    erased = x.eq(0).all(1)  # (B, H, W) boxes of zeros across all channels
    assert erased.flatten(1).any(1).all()  # reprob 1: every image has a box
    assert torch.equal(x[:, :, ~erased.any(0)], clean[:, :, ~erased.any(0)])  # the rest untouched
    pixel = BatchAugment(C, MEAN, STD, reprob=1.0, remode="pixel", dtype=torch.float16)
    out, _ = pixel(images, labels)
    assert out.dtype == torch.float16 and not torch.equal(out.float(), clean.half().float())


def test_augment_from_config():
    load_config(["--augment.mixup=0", "--augment.cutmix=0", "--augment.reprob=0",
                 "--augment.randaugment=rand-m7-n1"], sections=["augment"])
    aug = augment_from_config(C, MEAN, STD, 0.1, torch.device("cpu"), torch.float32)
    assert not aug.soft_targets and aug.erasing is None
    assert aug.randaugment.n == 1 and aug.randaugment.magnitude == 7
    assert aug.randaugment.fill == (124.0, 116.0, 104.0)  # timm's img_mean for ImageNet
    load_config([], sections=["augment"])  # defaults: the DeiT recipe
    aug = augment_from_config(C, MEAN, STD, 0.1, "cpu", torch.bfloat16)
    assert aug.soft_targets and aug.mixup.mixup_alpha == 0.8 and aug.mixup.cutmix_alpha == 1.0
    assert aug.mixup.label_smoothing == 0.1 and aug.erasing.probability == 0.25
    x, t = aug(*batch(3))
    assert x.dtype == torch.bfloat16 and t.shape == (3, C)
    for bad in ("--augment.randaugment=rand-m9-bogus", "--augment.mixup_mode=pairs",
                "--augment.aug_repeats=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0][2:]):
            load_config([bad], sections=["augment"])
    load_config(["--augment.randaugment="], sections=["augment"])
    assert augment_from_config(C, MEAN, STD, 0.1, "cpu").randaugment is None
