"""fastvit_reduce.augment.batch: normalize, BatchAugment (RandAugment → normalise → erasing → Mixup/CutMix), its seeding and
thread safety, and augment_from_cfg."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from fastvit_reduce.augment.batch import BatchAugment, normalize
from fastvit_reduce.augment.batch import BatchRandomErasing, SeededMixup, augment_from_cfg
from fastvit_reduce.config import ConfigError, load_config, resolved

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
        x, t = aug(images, labels, seed=b)
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
    aug = BatchAugment(C, MEAN, STD, mixup=1.0, label_smoothing=0.0)
    images, labels = batch(6)
    labels = torch.arange(6)
    x, t = aug(images, labels, seed=0)
    lam = t[0, 0].item()  # smoothing 0: the target of image 0 is lam on class 0
    assert 0 < lam < 1 and t[0, 5].item() == pytest.approx(1 - lam)
    clean = normalize(images, MEAN, STD)
    assert torch.allclose(x[0], lam * clean[0] + (1 - lam) * clean[5], atol=1e-5)


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_elem_and_pair_modes_mix_each_image_as_its_target_says(mode):
    """Per image: a mixup image is lam * x_i + (1 - lam) * x_{B-1-i}; a cutmix image takes a box
    from x_{B-1-i} whose area fraction is 1 - lam; pair mode mirrors the parameters."""
    mixer = SeededMixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, label_smoothing=0.0,
                        num_classes=8)
    x = torch.randn(8, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    out, t = mixer.mix(x, torch.arange(8), np.random.default_rng(4))
    lam = t[torch.arange(8), torch.arange(8)]
    assert torch.allclose(t.sum(1), torch.ones(8)) and (lam < 1).any()
    if mode == "pair":
        assert torch.equal(lam, lam.flip(0))
    for i in range(8):
        j = 7 - i
        from_j = (out[i] == x[j]).all(0) & (x[i] != x[j]).all(0)  # (H, W) pixels taken from j
        if from_j.any():  # cutmix: a box from j, lam = the area kept
            assert from_j.float().mean().item() == pytest.approx(1 - lam[i].item(), abs=1e-6)
            assert torch.equal(out[i][:, ~from_j], x[i][:, ~from_j])
        else:
            assert torch.allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * x[j], atol=1e-5)


def test_same_seed_same_output_different_seed_different_output():
    aug = BatchAugment(C, MEAN, STD, randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                       reprob=0.5, remode="pixel")
    images, labels = batch(8, seed=1)
    x1, t1 = aug(images, labels, seed=123)
    x2, t2 = aug(images, labels, seed=123)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)  # bit-identical on CPU
    x3, _ = aug(images, labels, seed=124)
    assert not torch.equal(x1, x3)
    torch.manual_seed(0)  # the global RNG plays no part
    np.random.seed(0)
    before = torch.get_rng_state()
    x4, _ = aug(images, labels, seed=123)
    assert torch.equal(x1, x4) and torch.equal(before, torch.get_rng_state())
    with pytest.raises(ValueError, match="seed must be"):
        aug(images, labels, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        aug(images, labels)  # the seed is required: no silent global RNG


def test_threads_give_the_sequential_results():
    """The trainer augments one batch ahead in a background thread: two threads augmenting at
    once must give exactly what one thread gives."""
    aug = BatchAugment(C, MEAN, STD, randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                       mixup_mode="elem", reprob=0.5)
    images, labels = batch(6, seed=2)
    seeds = list(range(12))
    want = [aug(images, labels, seed=s) for s in seeds]
    got = {}

    def work(part):
        for s in part:
            got[s] = aug(images, labels, seed=s)
            torch.rand(100)  # the main thread's drop-path draws meanwhile use the global RNG

    threads = [threading.Thread(target=work, args=(seeds[k::2],)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in seeds:
        assert torch.equal(got[s][0], want[s][0]) and torch.equal(got[s][1], want[s][1]), s


def test_erase_order_before_mix_erases_each_image_then_mixes():
    """``erase_order=before_mix`` (timm's --no-prefetcher order): erase each normalised image,
    then mix. Rebuilt from the parts with the same seed (torch generator for erasing, numpy
    Generator for mixup)."""
    aug = BatchAugment(C, MEAN, STD, mixup=1.0, cutmix=0.0, reprob=1.0, remode="const", erase_order="before_mix")
    images, labels = batch(6, size=40)
    x, t = aug(images, labels, seed=9)
    erased = aug.erasing(normalize(images, MEAN, STD), torch.Generator().manual_seed(9))
    want_x, want_t = aug.mixup.mix(erased, labels, np.random.default_rng(9))
    assert torch.equal(x, want_x) and torch.equal(t, want_t)
    assert erased.eq(0).all(1).flatten(1).any(1).all()  # every image had a box before mixing


def test_erase_order_after_mix_is_the_default_and_erases_the_mixed_batch():
    """``erase_order=after_mix`` (the default: timm's prefetcher, the seed's command): mix first,
    then erase the mixed images, from the same seeded draws."""
    aug = BatchAugment(C, MEAN, STD, mixup=1.0, cutmix=0.0, reprob=1.0, remode="const")
    images, labels = batch(6, size=40)
    x, t = aug(images, labels, seed=9)
    mixed, want_t = aug.mixup.mix(normalize(images, MEAN, STD), labels, np.random.default_rng(9))
    want_x = aug.erasing(mixed, torch.Generator().manual_seed(9))
    assert torch.equal(x, want_x) and torch.equal(t, want_t)
    before = BatchAugment(C, MEAN, STD, mixup=1.0, cutmix=0.0, reprob=1.0, remode="const", erase_order="before_mix")
    assert not torch.equal(before(images, labels, seed=9)[0], x)
    with pytest.raises(ValueError, match="erase_order"):
        BatchAugment(C, MEAN, STD, erase_order="sometimes")


def test_erasing_box_statistics_follow_timm():
    """Area fraction in [0.02, 1/3], aspect ratio in [0.3, 3.3] (within rounding), probability."""
    er = BatchRandomErasing(probability=0.5, mode="const")
    x = torch.ones(400, 3, 64, 64)
    out = er(x, torch.Generator().manual_seed(0))
    boxes = out.eq(0).all(1)  # (B, H, W)
    hit = boxes.flatten(1).any(1)
    assert 0.42 < hit.float().mean().item() < 0.58
    frac = boxes.flatten(1).float().mean(1)[hit]
    assert frac.min() >= 0.015 and frac.max() <= 1 / 3 + 0.02
    h = boxes.any(2).sum(1)[hit].float()
    w = boxes.any(1).sum(1)[hit].float()
    assert torch.equal(h * w, boxes.flatten(1).sum(1)[hit].float())  # one rectangle each
    ratio = h / w
    assert ratio.min() >= 0.3 * 0.7 and ratio.max() <= (1 / 0.3) / 0.7
    assert abs(ratio.log().mean().item()) < 0.15  # log-uniform, symmetric about 1
    assert torch.equal(x, torch.ones_like(x))  # the input is untouched
    many = BatchRandomErasing(probability=1.0, mode="rand", max_count=3)
    out = many(torch.zeros(50, 3, 32, 32), torch.Generator().manual_seed(1))
    assert out.ne(0).all(1).flatten(1).any(1).all()  # 'rand' boxes: a normal colour per channel
    assert math.isclose(many.log_aspect_ratio[1], -math.log(0.3))


def test_mixup_off_returns_hard_labels():
    aug = BatchAugment(C, MEAN, STD, mixup=0.0, cutmix=0.0, randaugment="rand-m9-mstd0.5-inc1")
    assert not aug.soft_targets
    images, labels = batch(5)
    x, y = aug(images, labels, seed=0)
    assert y is labels and x.shape == images.shape and x.dtype == torch.float32


def test_random_erasing_runs_after_normalisation():
    """remode const writes 0 into the *normalised* batch (= the mean colour); erasing before
    normalisation would leave -mean/std instead. Unerased pixels are never exactly 0 here,
    since 255 * mean is not an integer."""
    aug = BatchAugment(C, MEAN, STD, reprob=1.0, remode="const", recount=1)
    images, labels = batch(8, size=48)
    x, _ = aug(images, labels, seed=0)
    clean = normalize(images, MEAN, STD)
    assert not clean.eq(0).any()
    erased = x.eq(0).all(1)  # (B, H, W) boxes of zeros across all channels
    assert erased.flatten(1).any(1).all()  # reprob 1: every image has a box
    assert torch.equal(x[:, :, ~erased.any(0)], clean[:, :, ~erased.any(0)])  # the rest untouched
    pixel = BatchAugment(C, MEAN, STD, reprob=1.0, remode="pixel", dtype=torch.float16)
    out, _ = pixel(images, labels, seed=0)
    assert out.dtype == torch.float16 and not torch.equal(out.float(), clean.half().float())


def test_augment_from_cfg():
    load_config(["--augment.mixup=0", "--augment.cutmix=0", "--augment.reprob=0",
                 "--augment.randaugment=rand-m7-n1"], sections=["augment"])
    aug = augment_from_cfg(resolved(["augment"]), C, MEAN, STD, 0.1, torch.device("cpu"), torch.float32)
    assert not aug.soft_targets and aug.erasing is None
    assert aug.randaugment.n == 1 and aug.randaugment.magnitude == 7
    assert aug.randaugment.fill == (124.0, 116.0, 104.0)  # timm's img_mean for ImageNet
    load_config([], sections=["augment"])  # defaults: the DeiT recipe
    aug = augment_from_cfg(resolved(["augment"]), C, MEAN, STD, 0.1, "cpu", torch.bfloat16)
    assert aug.soft_targets and aug.mixup.mixup_alpha == 0.8 and aug.mixup.cutmix_alpha == 1.0
    assert aug.mixup.label_smoothing == 0.1 and aug.erasing.probability == 0.25
    x, t = aug(*batch(3), seed=1)
    assert x.dtype == torch.bfloat16 and t.shape == (3, C)
    with pytest.raises(KeyError, match="augment.reprob"):
        augment_from_cfg({"augment.mixup": 0.8}, C, MEAN, STD, 0.1, "cpu")
    for bad in ("--augment.randaugment=rand-m9-bogus", "--augment.mixup_mode=pairs",
                "--augment.aug_repeats=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0][2:]):
            load_config([bad], sections=["augment"])
    load_config(["--augment.randaugment="], sections=["augment"])
    assert augment_from_cfg(resolved(["augment"]), C, MEAN, STD, 0.1, "cpu").randaugment is None
