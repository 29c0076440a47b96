"""Shared test fixtures: tiny synthetic ``.beton`` files and a tiny ViT name.

The images are learnable on purpose: class ``c`` is a noisy image whose dominant colour and
stripe direction depend on ``c``, so a tiny ViT's loss falls within a couple of epochs.
"""
from __future__ import annotations

import numpy as np
import pytest

TINY_VIT = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                depth=4, num_heads=2, num_classes=4)


def make_images(n: int, num_classes: int, size: int = 48, seed: int = 0):
    """``n`` (HxWx3 uint8 image, label) pairs, with class-dependent colour and stripes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % num_classes
        img = rng.integers(0, 60, size=(size, size, 3), dtype=np.int32)
        img[..., label % 3] += 150
        stripes = (np.arange(size) // 6) % 2 == 0
        if label // 3 % 2:
            img[:, stripes] += 40
        else:
            img[stripes, :] += 40
        out.append((np.clip(img, 0, 255).astype(np.uint8), label))
    return out


def write_beton(path, n: int = 64, num_classes: int = 4, size: int = 48, seed: int = 0,
                write_mode: str = "raw") -> str:
    """Write ``n`` synthetic samples with ffcv's own DatasetWriter (image + int label)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    data = make_images(n, num_classes, size, seed)
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=write_mode, max_resolution=size),
                                       "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(data)
    return str(path)


@pytest.fixture
def tiny_beton(tmp_path):
    """Factory: ``tiny_beton(name, n=64, num_classes=4, size=48, seed=0) -> path``."""
    def make(name: str = "data.beton", **kwargs) -> str:
        return write_beton(tmp_path / name, **kwargs)
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread (why: on a shared 2-core box, OpenMP threads spinning
    at barriers made small ops ~50x slower). Use per module: ``pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_jit():
    """Run ffcv pipelines as plain Python for this test: no ~5-10 s numba compile for a few tiny images."""
    from ffcv.pipeline.compiler import Compiler
    before = Compiler.is_enabled
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(before)
