"""FFCV train/val loaders: batch format, labels and pixels as written, epoch controls, errors.

One train and one val loader run with ffcv's numba JIT (shared by the module, ~10 s of compile);
the other loaders run ffcv's ops as plain Python (``no_jit``), instant on 16-48 px images.
"""
from __future__ import annotations

import json
import types
import shutil

import numpy as np
import pytest
import torch
from conftest import make_images, write_beton

from fastvit_reduce.config import ConfigError, load_config, resolved
from fastvit_reduce.data.loaders import (RandomFlipInPlace, check_beton, check_datasets,
                                         create_train_loader, create_val_loader, get_resolution,
                                         set_epoch, set_train_resolution)

# why: numba's dispatcher finalizer can raise a harmless KeyError when an ffcv loader's JIT-compiled
# ops are garbage-collected; pytest would report it as a warning on an unrelated test
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N, SIZE = 40, 48  # images in the module's .beton; label == sample index
CPU = torch.device("cpu")


def train_loader(path, batch_size=8, **overrides):
    kw = dict(res=32, num_workers=2, in_memory=1, batches_ahead=2, drop_last=True, order="random",
              aug_repeats=1, seed=0, distributed=False, rrc_scale=[0.08, 1.0],
              rrc_ratio=[0.75, 4 / 3], hflip=1)
    kw.update(overrides)
    return create_train_loader(path, batch_size, CPU, **kw)


def val_loader(path, batch_size=16, **overrides):
    kw = dict(res=SIZE, crop_pct=1.0, num_workers=2, in_memory=1, distributed=False)
    kw.update(overrides)
    return create_val_loader(path, batch_size, CPU, **kw)


def epoch_labels(loader) -> list[int]:
    return [i for _, y in loader for i in y.tolist()]  # tolist: ffcv reuses batch buffers


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("loaders") / "data.beton", n=N, num_classes=N, size=SIZE)


@pytest.fixture(scope="module")
def jit_train(beton):
    return train_loader(beton)


# ----------------------------------------------------------------------------- batches
def test_train_batches_uint8_channels_last_on_device(jit_train):
    assert len(jit_train) == N // 8
    batches = 0
    for images, labels in jit_train:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
        assert images.device == CPU and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (8,) and labels.dtype == torch.int64
        batches += 1
    assert batches == N // 8


def test_train_epoch_is_a_permutation_and_set_epoch_repeats_it(jit_train):
    set_epoch(jit_train, 3)
    first = epoch_labels(jit_train)
    assert sorted(first) == list(range(N))  # every written label once (drop_last: N % 8 == 0)
    set_epoch(jit_train, 3)
    assert epoch_labels(jit_train) == first
    assert epoch_labels(jit_train) != first  # the loader moved on to epoch 4
    with pytest.raises(ValueError, match="epoch"):
        set_epoch(jit_train, -1)


def test_progressive_resize_changes_output_size(jit_train):
    set_train_resolution(jit_train, 48)
    images, _ = next(iter(jit_train))
    assert images.shape == (8, 3, 48, 48)
    set_train_resolution(jit_train, 16)
    assert next(iter(jit_train))[0].shape == (8, 3, 16, 16)
    set_train_resolution(jit_train, 32)
    with pytest.raises(ValueError, match="resolution"):
        set_train_resolution(jit_train, 0)


def test_val_sequential_keeps_last_batch_and_pixels_match(beton):
    loader = val_loader(beton, batch_size=16)  # JIT, sharing the train loader's compiled ops
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    assert [len(y) for y in labels] == [16, 16, 8]
    assert torch.cat(labels).tolist() == list(range(N))
    written = np.stack([img for img, _ in make_images(N, N, SIZE)])  # (N, H, W, 3)
    got = torch.cat(images).permute(0, 2, 3, 1).numpy()  # crop_pct=1 at full size: no resampling
    assert np.array_equal(got, written)


def test_channels_first_option_and_batch_of_one(beton, no_jit):
    images, labels = next(iter(val_loader(beton, batch_size=1, res=24, channels_last=False)))
    assert images.shape == (1, 3, 24, 24) and images.is_contiguous()
    assert labels.shape == (1,)  # not squeezed to a 0-d tensor


def test_repeat_aug_and_quasi_random_train_orders(beton, no_jit):
    loader = train_loader(beton, batch_size=6, aug_repeats=4, res=16, drop_last=False)
    labels = epoch_labels(loader)
    assert len(labels) == N and len(loader) == 7  # epoch length = dataset size
    counts = np.bincount(labels, minlength=N)
    assert set(counts.tolist()) == {0, 4}  # N / 4 images, each 4 times
    quasi = train_loader(beton, order="quasi_random", in_memory=0, res=16)
    assert sorted(epoch_labels(quasi)) == list(range(N))


def test_flip_in_place_mirrors_about_half(no_jit):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(64, 5, 7, 3), dtype=np.uint8)  # odd width: middle stays
    np.random.seed(0)
    out = RandomFlipInPlace().generate_code()(batch.copy(), None)
    mirrored = [np.array_equal(o, b[:, ::-1]) for o, b in zip(out, batch)]
    unchanged = [np.array_equal(o, b) for o, b in zip(out, batch)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 16 < sum(mirrored) < 48


# ----------------------------------------------------------------------------- errors
def test_bad_dataset_paths(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        check_beton(tmp_path / "missing.beton")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton" * 100)
    with pytest.raises(ConfigError, match="not a readable"):
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
    with pytest.raises(ConfigError, match="expected fields image"):
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


def test_argument_errors(beton):
    with pytest.raises(RuntimeError, match="init_process_group"):
        train_loader(beton, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        val_loader(beton, distributed=True)
    with pytest.raises(ValueError, match="crop_pct"):
        val_loader(beton, crop_pct=0.0)
    with pytest.raises(ValueError, match="aug_repeats"):
        train_loader(beton, aug_repeats=0)
    with pytest.raises(ValueError, match="rrc_scale"):
        train_loader(beton, rrc_scale=[0.5, 0.1])


# ----------------------------------------------------------------------------- config
def test_get_resolution_ramp():
    got = [get_resolution(e, 160, 224, start_ramp=2, end_ramp=6, step=16) for e in range(9)]
    assert got == [160, 160, 160, 176, 192, 208, 224, 224, 224]
    assert get_resolution(3, 160, 224, 2, 6, step=32) == 192  # 176 rounds to a multiple of 32
    assert get_resolution(5, 224, 224, 0, 0, 16) == 224
    with pytest.raises(ValueError, match="min_res"):
        get_resolution(0, 256, 224, 0, 0, 16)


def test_config_sections():
    load_config(["--data.order=quasi_random", "--resolution.step=8", "--data.rrc_scale=0.25,1"],
                sections=["data", "resolution"])
    values = resolved(["data", "resolution"])
    assert values["data.order"] == "quasi_random" and values["resolution.step"] == 8
    assert values["data.rrc_scale"] == [0.25, 1.0] and values["data.in_memory"] is True
    with pytest.raises(ConfigError, match="data.order"):
        load_config(["--data.order=sequential"], sections=["data"])


# ----------------------------------------------------------------------------- benchmark helpers
def test_bench_posterize_guard_and_table(tmp_path):
    from PIL import Image

    from fastvit_reduce.bench import loader as bench

    ra = bench.timm_randaugment("rand-m10-n2-inc1", 32)
    posterize = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0),) * 3  # Pillow < 13: black, no raise
    assert posterize.aug_fn(image, 8) is image
    result = dict(torchvision_img_s=100.0, ffcv_img_s=400.0, torchvision_randaug_img_s=80.0,
                  ffcv_randaug_img_s=None, ceiling_img_s=500.0, images=10, res=32, workers=2)
    args = types.SimpleNamespace(batch_size=4, max_res=64, epochs=1, randaug="rand-m9")
    text = bench.table(result, args, "header")
    assert "4.00x" in text and "0.80x" in text and "n/a" in text
    assert bench.main(["--data", str(tmp_path / "missing")]) == 2


def test_bench_ceiling_pool_empty_shard_and_dead_worker(tmp_path):
    """More workers than images is fine; a worker that dies is an error, not a hang."""
    from fastvit_reduce.bench.loader import CeilingPool

    pool = CeilingPool(write_beton(tmp_path / "one.beton", n=1, size=24, write_mode="jpg"), res=16, workers=2)
    try:
        images, seconds = pool.run_epoch()  # worker 1 has an empty shard
        assert images == 1 and seconds > 0
        pool.procs[1].kill()
        pool.procs[1].join(10)
        with pytest.raises(RuntimeError, match="ceiling worker 1 exited with code -9"):
            pool.run_epoch()
    finally:
        pool.close()
