"""fastvit_reduce.data.decoders: validation pixels against timm's own eval transform.

Real photos (scikit-image's bundled data images) are written to a raw-mode .beton at
max_resolution 512, as ImageNet is stored; each is loaded through ``create_val_loader`` at 224 and
compared with ``timm.data.create_transform(224, is_training=False, crop_pct=0.9,
interpolation='bicubic')`` applied to the same stored pixels as a PIL image. The geometry is
timm's exactly (up to half a stored pixel); the resize is ffcv's cv2 INTER_AREA where timm uses PIL
bicubic, which is what the remaining difference measures.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvit_reduce.data.decoders import timm_center_crop
from fastvit_reduce.data.loaders import create_val_loader

skimage_data = pytest.importorskip("skimage.data")

# why: numba's dispatcher finalizer can raise a harmless KeyError when an ffcv loader's JIT-compiled
# ops are garbage-collected; pytest would report it as a warning on an unrelated test
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

RES, CROP_PCT, MAX_RES = 224, 0.9, 512
MAD_LIMIT = 2.0  # grey levels (0..255), the bar


def photos() -> list[np.ndarray]:
    """(H, W, 3) uint8 photos of different shapes: square, landscape and portrait."""
    images = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(),
              skimage_data.rocket()]
    return images + [np.ascontiguousarray(images[1].transpose(1, 0, 2))]  # a portrait cat


def stored_pixels(path: str) -> list[np.ndarray]:
    """The (H, W, 3) pixels a raw-mode .beton holds, read straight from the file."""
    from ffcv.reader import Reader

    meta = Reader(path).metadata["f0"]
    return [np.fromfile(path, np.uint8, count=int(m["height"]) * int(m["width"]) * 3,
                        offset=int(m["data_ptr"])).reshape(int(m["height"]), int(m["width"]), 3)
            for m in meta]


@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> str:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = str(tmp_path_factory.mktemp("parity") / "photos.beton")
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=MAX_RES), "label": IntField()}
    DatasetWriter(path, fields, num_workers=1).from_indexed_dataset(
        [(img, i) for i, img in enumerate(photos())])
    return path


def mean_abs_diffs(beton: str) -> list[float]:
    from PIL import Image
    from timm.data import create_transform

    # mean 0, std 1: timm's own pipeline up to a float tensor in [0, 1]
    timm_eval = create_transform(RES, is_training=False, crop_pct=CROP_PCT, interpolation="bicubic",
                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    loader = create_val_loader(beton, 8, "cpu", res=RES, crop_pct=CROP_PCT, num_workers=1,
                               in_memory=1, distributed=False, channels_last=False)
    ours = torch.cat([x.clone() for x, _ in loader]).float()  # (N, 3, RES, RES), 0..255
    stored = stored_pixels(beton)
    assert len(stored) == len(ours) == len(photos())
    return [float((timm_eval(Image.fromarray(img)) * 255 - mine).abs().mean())
            for img, mine in zip(stored, ours)]


def test_val_loader_matches_timm_eval_transform(beton, capsys):
    # numba JIT on (no no_jit): the compiled pipeline is the one training uses (~3 s to compile)
    diffs = mean_abs_diffs(beton)
    with capsys.disabled():  # the measurement is the point: show it with -s or not
        print(f"\nval loader vs timm eval transform, MAD per photo (grey levels): "
              f"{', '.join(f'{d:.2f}' for d in diffs)}")
    assert max(diffs) <= MAD_LIMIT


def test_train_crop_resize_against_timms_interpolations(beton, capsys):
    """The train crop's resize: ffcv's decoder resizes with cv2 INTER_AREA and cannot be told
    otherwise (``resize_crop`` in libffcv); timm's RandomResizedCrop picks PIL bilinear or bicubic
    at random. Same boxes (timm's own ``get_params``, seeded), same stored pixels: the mean
    absolute difference per interpolation, split into crops that shrink and crops that enlarge."""
    import random

    from ffcv.libffcv import resize_crop
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)
    rrc = RandomResizedCropAndInterpolation(RES)
    diffs = {(kind, way): [] for kind in ("bilinear", "bicubic") for way in ("shrink", "enlarge")}
    for img in stored_pixels(beton):
        pil = Image.fromarray(img)
        for _ in range(12):
            i, j, h, w = rrc.get_params(pil, rrc.scale, rrc.ratio)
            ours = np.zeros((RES, RES, 3), np.uint8)
            resize_crop(np.ascontiguousarray(img), i, i + h, j, j + w, ours)
            way = "shrink" if h * w >= RES * RES else "enlarge"
            for kind, mode in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
                theirs = np.asarray(pil.crop((j, i, j + w, i + h)).resize((RES, RES), mode))
                diffs[kind, way].append(float(np.abs(theirs.astype(float) - ours).mean()))
    with capsys.disabled():
        print("\ntrain crop: ffcv INTER_AREA vs PIL, MAD in grey levels (mean, max over crops):")
        for (kind, way), d in diffs.items():
            print(f"  {kind:8s} {way:7s} n={len(d):3d} mean {np.mean(d):.2f} max {np.max(d):.2f}")
    assert all(d for d in diffs.values())  # both kinds of crop were drawn
    # the bound this test keeps: a change to the resize (or to the boxes) shows up here
    assert max(np.mean(d) for d in diffs.values()) <= 3.0


def test_crop_box_is_timms_geometry():
    # 512 x 512 at 224 / 0.9: timm resizes to 248 and keeps [12, 236), i.e. [24.8, 487.2) stored
    assert timm_center_crop(512, 512, 224, 0.9) == (25, 25, 462, 462)
    # 341 x 512 -> 248 x 372; rows [12, 236) x 1.375 = [16.5, 324.5): a tie widens the box
    assert timm_center_crop(341, 512, 224, 0.9) == (16, 102, 309, 308)
    assert timm_center_crop(512, 341, 224, 0.9) == (102, 16, 308, 309)
    # crop_pct 1 at the stored size keeps every pixel
    assert timm_center_crop(48, 48, 48, 1.0) == (0, 0, 48, 48)
