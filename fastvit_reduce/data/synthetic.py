"""Learnable synthetic images and tiny ``.beton`` files, for tests and the GPU check.

Class ``c`` is a noisy image whose dominant colour and stripe direction depend on ``c``, so a tiny
ViT's loss falls within a couple of epochs and a broken pipeline shows up as a flat loss.
"""
from __future__ import annotations

import numpy as np


def make_images(n: int, num_classes: int, size: int = 48, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``n`` (HxWx3 uint8 image, label) pairs, with class-dependent colour and stripes."""
    rng = np.random.default_rng(seed)
    stripes = (np.arange(size) // 6) % 2 == 0
    out = []
    for i in range(n):
        label = i % num_classes
        img = rng.integers(0, 60, size=(size, size, 3), dtype=np.int32)
        img[..., label % 3] += 150
        if label // 3 % 2:
            img[:, stripes] += 40
        else:
            img[stripes, :] += 40
        out.append((np.clip(img, 0, 255).astype(np.uint8), label))
    return out


def write_beton(path, n: int = 64, num_classes: int = 4, size: int = 48, seed: int = 0,
                write_mode: str = "raw", num_workers: int = 1) -> str:
    """Write ``n`` synthetic samples with ffcv's own DatasetWriter (fields image + label)."""
    import fastvit_reduce.data.ffcv_patch  # noqa: F401 — before any ffcv module
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=write_mode, max_resolution=size),
                                       "label": IntField()}, num_workers=num_workers)
    writer.from_indexed_dataset(make_images(n, num_classes, size, seed))
    return str(path)
