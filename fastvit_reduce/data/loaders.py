"""FFCV train/val loaders: uint8 batches decoded by ffcv, moved to the device, normalised later.

Train: ``RandomResizedCropRGBImageDecoder`` → ``RandomFlipInPlace`` → ``ToTensor`` → ``ToDevice``
→ ``ToTorchImage(channels_last)``; labels ``IntDecoder`` → ``ToTensor`` → ``Squeeze`` →
``ToDevice``. For the CPU device ``ToDevice`` is left out (it would only copy).
Images stay uint8 until they are on the device; normalisation and the AMP cast happen in torch
(``fastvit_reduce.augment.batch.normalize``). Why no ffcv ``NormalizeImage``: a numba op after a
torch op makes ffcv 1.0.2's ``Graph.group_operations`` loop forever, and uint8 moves 4x fewer bytes.

Val: ``CenterCropRGBImageDecoder(ratio=crop_pct)``, sequential, no drop_last; across ranks every
image is seen exactly once (``orders.ShardedSequentialOrder``), so shards may differ in length by
one batch: compute metrics as all_reduce(sum correct) / all_reduce(count) after the loop.

Ffcv traps handled here: the device must be a ``torch.device`` (we convert strings); output
batches live in a ring of reused buffers (``batches_ahead + 2``) — ``.clone()`` anything kept
across iterations; ``Loader`` calls ``torch.set_num_threads(num_workers)`` when built and at
every epoch start.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from fastargs import Param, Section
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   ResizedCropRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from ..config import Bool01, Choice, ConfigError, FloatList, Number
from .orders import RepeatAugOrder, ShardedSequentialOrder, install_order

Section("data", "FFCV datasets and loading").params(
    train_dataset=Param(str, "train .beton path", default=""),
    val_dataset=Param(str, "validation .beton path", default=""),
    num_workers=Param(Number(int, 1), "ffcv decode threads per process", default=8),
    in_memory=Param(Bool01(), "1: OS page cache (dataset fits in RAM); 0: ffcv process cache",
                    default=1),
    batches_ahead=Param(Number(int, 1), "batches prepared in advance", default=3),
    drop_last=Param(Bool01(), "drop the last partial train batch", default=1),
    order=Param(Choice("random", "quasi_random"),
                "train order when augment.aug_repeats=1; quasi_random is single-process only "
                "(falls back to random, with a warning, when distributed)", default="random"),
    crop_pct=Param(Number(float, 0, 1), "val center-crop fraction of the short side "
                   "(0 = the model's default)", default=0.0),
    rrc_scale=Param(FloatList(2), "RandomResizedCrop area range", default=[0.08, 1.0]),
    rrc_ratio=Param(FloatList(2), "RandomResizedCrop aspect-ratio range",
                    default=[0.75, 1.3333333]),
    hflip=Param(Bool01(), "random horizontal flip", default=1),
)

Section("resolution", "progressive resizing of train images (as in ffcv-imagenet)").params(
    min_res=Param(Number(int, 1), "train resolution up to start_ramp, px", default=224),
    max_res=Param(Number(int, 1), "train resolution from end_ramp on, px", default=224),
    start_ramp=Param(Number(int, 0), "epoch the ramp starts", default=0),
    end_ramp=Param(Number(int, 0), "epoch the ramp ends", default=0),
    step=Param(Number(int, 1), "ramp resolutions are rounded to a multiple of this, px "
               "(use the patch size)", default=16),
)

# ----------------------------------------------------------------------------- dataset checks
def read_classes(beton_path: str | Path) -> list[str] | None:
    """Class names from ``<beton_path>.classes.json`` (written by the writer), or None if absent."""
    path = Path(f"{beton_path}.classes.json")
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{path}: expected a JSON list of class names")
    return classes


def check_beton(path: str | Path) -> int:
    """Number of samples in ``path``; raise ``ConfigError`` unless it is a readable .beton with
    fields image (RGBImageField) and label (IntField)."""
    if not str(path):
        raise ConfigError("no dataset given (empty .beton path)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset not found: {path}")
    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001 — ffcv raises assorted types on foreign files
        raise ConfigError(f"{path}: not a readable ffcv .beton file ({type(e).__name__}: {e})") from None
    handlers = reader.handlers
    found = ", ".join(f"{k} ({type(v).__name__})" for k, v in handlers.items())
    if not (isinstance(handlers.get("image"), RGBImageField) and isinstance(handlers.get("label"), IntField)):
        raise ConfigError(f"{path}: expected fields image (RGBImageField) and label (IntField), "
                          f"found {found or 'none'}")
    return int(reader.num_samples)


def check_datasets(train_path: str | Path, val_path: str | Path) -> None:
    """Check both files, and that their ``.classes.json`` lists match when both exist."""
    check_beton(train_path)
    check_beton(val_path)
    train_classes, val_classes = read_classes(train_path), read_classes(val_path)
    if train_classes is None or val_classes is None or train_classes == val_classes:
        return
    diff = sorted(set(train_classes) ^ set(val_classes))[:5]
    detail = f"e.g. {diff} in only one of them" if diff else "same names, different order"
    raise ConfigError(f"class lists differ between train {train_path} ({len(train_classes)} classes) "
                      f"and val {val_path} ({len(val_classes)} classes): {detail}")


class RandomFlipInPlace(Operation):
    """Horizontal flip of each (H, W, 3) uint8 image with probability 0.5, in place (numba op).

    Why not ffcv's RandomHorizontalFlip: it copies every image, flipped or not, into a new buffer
    through a strided slice; on our 2-core machine that cost 54 ms per 64x224x224 batch, as much
    as decoding at max_res 256. Swapping pixels in place touches only the flipped half.
    """

    def generate_code(self):
        my_range = Compiler.get_iterator()

        def flip(images, _):
            should_flip = np.random.rand(images.shape[0]) < 0.5
            last = images.shape[2] - 1
            for i in my_range(images.shape[0]):
                if should_flip[i]:
                    for r in range(images.shape[1]):
                        for c in range((last + 1) // 2):
                            for k in range(images.shape[3]):
                                left = images[i, r, c, k]
                                images[i, r, c, k] = images[i, r, last - c, k]
                                images[i, r, last - c, k] = left
            return images

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None  # in place: no new buffer


def _as_device(device) -> torch.device:
    # why: ffcv's ToDevice needs a torch.device, not a string
    return device if isinstance(device, torch.device) else torch.device(device)


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed.init_process_group() to have "
                           "been called before the loaders are built")


def _image_tail(device: torch.device, channels_last: bool) -> list:
    """The torch part of an image pipeline, after the numba decoder/flip."""
    # why no ToDevice for the CPU: it would copy each batch into a second ring of host buffers
    # (15 ms per 64x224x224 batch here); the decoder's own ring already gives each batch a slot
    to_device = [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]
    if channels_last:
        # ToTorchImage(channels_last) is a free permute of the NHWC buffer
        return [ToTensor(), *to_device, ToTorchImage(channels_last=True)]
    # why: ToTorchImage(channels_last=False) allocates its output on the CPU, so on CUDA it would
    # copy the batch back; make the contiguous NCHW batch on the host, then move it.
    return [ToTensor(), ToTorchImage(channels_last=False), *to_device]


def _label_pipeline(device: torch.device) -> list:
    # Squeeze(1), not Squeeze(): a batch of one must stay (1,), not become a 0-d tensor
    to_device = [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]
    return [IntDecoder(), ToTensor(), Squeeze(1), *to_device]


# ----------------------------------------------------------------------------- loaders
def create_train_loader(path, batch_size: int, device, *, res: int, num_workers: int,
                        in_memory: bool, batches_ahead: int, drop_last: bool, order: str,
                        aug_repeats: int, seed: int, distributed: bool,
                        rrc_scale: Sequence[float], rrc_ratio: Sequence[float], hflip: bool,
                        channels_last: bool = True) -> Loader:
    """ffcv Loader yielding ``(images uint8 (B,3,res,res), labels int64 (B,))`` on ``device``.

    ``aug_repeats > 1`` selects ``RepeatAugOrder`` (timm RepeatAugSampler semantics) and overrides
    ``order``; ``aug_repeats == 1`` uses ``order``: 'random', or 'quasi_random' (single process
    only — when distributed it falls back to 'random' with a warning). ``batch_size`` is per
    process. With ``distributed`` the torch process group must already exist; all ranks get the
    same number of batches. Call ``set_epoch`` before each epoch to make resumed runs see the
    same order, and ``set_train_resolution`` between epochs for progressive resizing.
    """
    check_beton(path)
    _check_batch(batch_size)
    if int(aug_repeats) != aug_repeats or aug_repeats < 1:
        raise ValueError(f"aug_repeats must be an integer >= 1, got {aug_repeats!r}")
    if order not in ("random", "quasi_random"):
        raise ValueError(f"order must be 'random' or 'quasi_random', got {order!r}")
    if distributed:
        _require_process_group()
    scale, ratio = _pair("rrc_scale", rrc_scale), _pair("rrc_ratio", rrc_ratio)
    if aug_repeats > 1 and order != "random":
        warnings.warn(f"aug_repeats={aug_repeats} uses the repeated-augmentation order; "
                      f"data.order={order} is ignored")
    if order == "quasi_random" and distributed and aug_repeats == 1:
        warnings.warn("data.order=quasi_random is single-process only in ffcv 1.0.2; "
                      "using random order for this distributed run")
        order = "random"
    device = _as_device(device)
    decoder = RandomResizedCropRGBImageDecoder((_check_res(res),) * 2, scale=scale, ratio=ratio)
    image = [decoder] + ([RandomFlipInPlace()] if hflip else []) + _image_tail(device, channels_last)
    use_quasi = order == "quasi_random" and aug_repeats == 1
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=bool(in_memory),
                    order=OrderOption.QUASI_RANDOM if use_quasi else OrderOption.RANDOM,
                    distributed=distributed, seed=int(seed), drop_last=bool(drop_last),
                    batches_ahead=batches_ahead,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    if aug_repeats > 1:
        install_order(loader, RepeatAugOrder(loader, aug_repeats))
    return loader


def create_val_loader(path, batch_size: int, device, *, res: int, crop_pct: float,
                      num_workers: int, in_memory: bool, distributed: bool,
                      channels_last: bool = True) -> Loader:
    """ffcv Loader yielding center-cropped ``(images uint8 (B,3,res,res), labels int64 (B,))``.

    ``crop_pct`` is the crop's fraction of the short side (timm's ``crop_pct``; resolve the
    config's 0 to the model's ``pretrained_cfg['crop_pct']`` before calling). Sequential, keeps the
    last partial batch, and with ``distributed`` each rank reads its own contiguous shard, without
    the padding duplicates of ffcv's distributed SEQUENTIAL order: every image counts once.
    ``check_datasets(train, val)`` checks that the two files were written with the same classes.
    """
    num_samples = check_beton(path)
    _check_batch(batch_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r} (resolve 0 to the "
                         f"model's pretrained_cfg['crop_pct'] first)")
    if distributed:
        _require_process_group()
        # why: ffcv's process cache crashes on an empty epoch (a rank gets no image when there are
        # fewer val images than ranks); the OS cache handles it
        in_memory = in_memory or num_samples < dist.get_world_size()
    device = _as_device(device)
    decoder = CenterCropRGBImageDecoder((_check_res(res),) * 2, ratio=float(crop_pct))
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=bool(in_memory),
                    order=OrderOption.SEQUENTIAL, distributed=distributed, seed=0, drop_last=False,
                    pipelines={"image": [decoder] + _image_tail(device, channels_last),
                               "label": _label_pipeline(device)})
    if distributed:
        install_order(loader, ShardedSequentialOrder(loader))
    return loader


# ----------------------------------------------------------------------------- epoch controls
def get_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                   step: int) -> int:
    """Train resolution for ``epoch``, as in ffcv-imagenet: ``min_res`` up to ``start_ramp``,
    ``max_res`` from ``end_ramp`` on, linear in between rounded to a multiple of ``step`` px
    (and kept within [min_res, max_res])."""
    if min_res > max_res:
        raise ValueError(f"resolution.min_res ({min_res}) must be <= resolution.max_res ({max_res})")
    if step < 1:
        raise ValueError(f"resolution.step must be >= 1, got {step}")
    if epoch <= start_ramp:
        return int(min_res)
    if epoch >= end_ramp:
        return int(max_res)
    res = np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
    return int(np.clip(round(res / step) * step, min_res, max_res))


def set_train_resolution(loader: Loader, res: int) -> None:
    """Make the train decoder output ``res`` x ``res`` from the next epoch on (call between
    epochs: a running epoch keeps the buffers it allocated)."""
    decoder = loader.pipeline_specs["image"].decoder
    if not isinstance(decoder, ResizedCropRGBImageDecoder):
        raise TypeError(f"loader's image decoder is {type(decoder).__name__}, not a resized-crop decoder")
    # ffcv sizes its buffers from output_size when each epoch starts; the compiled code is size-free
    decoder.output_size = (_check_res(res),) * 2


def set_epoch(loader: Loader, epoch: int) -> None:
    """Make the next iteration of ``loader`` use the order of ``epoch`` (seeded by seed + epoch),
    so a run resumed at epoch e sees the same order as an unbroken one."""
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    loader.next_epoch = int(epoch)


# ----------------------------------------------------------------------------- small checks
def _check_res(res) -> int:
    if int(res) != res or res < 1:
        raise ValueError(f"resolution must be a positive integer, got {res!r}")
    return int(res)


def _check_batch(batch_size) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _pair(name: str, values: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be two numbers 0 < lo <= hi, got {list(values)}")
    return lo, hi
