"""ffcv decoders of the .beton images: the seeded random-resized crop and flip of training, and
timm's eval crop.

Determinism: each sample's crop box and flip are a pure function of (seed, epoch, dataset index,
copy), where copy numbers the repeats of an image within an epoch (repeated augmentation); they do
not depend on num_workers, batches_ahead, batch size or the rank that decodes the sample
(``loaders.FfcvLoader`` writes the per-sample seeds).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — before any ffcv module
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from .jit import libffcv


def _flip_in_place(image) -> None:
    """Mirror one (H, W, 3) uint8 image left-right, in place (compiled by numba in the decoder).

    Why not ffcv's RandomHorizontalFlip: it copies every image, flipped or not, into a new buffer
    through a strided slice; on our 2-core machine that cost 54 ms per 64x224x224 batch, as much
    as decoding at max_res 256. Swapping pixels in place touches only the flipped half.
    """
    last = image.shape[1] - 1
    for r in range(image.shape[0]):
        for c in range((last + 1) // 2):
            for k in range(image.shape[2]):
                left = image[r, c, k]
                image[r, c, k] = image[r, last - c, k]
                image[r, last - c, k] = left


def timm_center_crop(height, width, out_size, crop_pct):
    """``(top, left, h, w)``: the box of the stored image that timm's eval transform shows.

    timm (``transforms_imagenet_eval``) resizes the short side to ``scale = floor(out_size /
    crop_pct)`` (the long side to ``int(scale * long / short)``, torchvision's arithmetic) and
    centre-crops ``out_size`` at ``round((resized - out_size) / 2)``. We map that box back to
    stored pixels and round each edge to the nearest pixel (ffcv's resize takes integer boxes).
    Why each edge and not a square: a box shifted by half a pixel cost up to 3.6 grey levels of
    mean difference on photos with fine texture, a one-pixel change of side 0.2-1.0.
    (ffcv's ``get_center_crop`` takes ``int(crop_pct * short)``: 0.9 of the short side where timm
    shows 224/248 = 0.903 at 224.)
    """
    scale = np.floor(out_size / crop_pct)
    if height <= width:
        resized_h, resized_w = scale, np.floor(scale * width / height)
    else:
        resized_h, resized_w = np.floor(scale * height / width), scale
    top = np.round((resized_h - out_size) / 2) * height / resized_h  # stored px
    left = np.round((resized_w - out_size) / 2) * width / resized_w
    bottom = top + out_size * height / resized_h
    right = left + out_size * width / resized_w
    # nearest pixel edges; a tie (x.5) widens the box rather than shifting it
    i0, j0 = min(max(0, int(np.ceil(top - 0.5))), height - 1), min(max(0, int(np.ceil(left - 0.5))), width - 1)
    i1, j1 = min(height, int(np.floor(bottom + 0.5))), min(width, int(np.floor(right + 0.5)))
    # at least one pixel: the box of a 64x1 image rounds to 0 px wide, and OpenCV's resize of an
    # empty box aborts the process (SIGABRT, no Python error)
    return i0, j0, max(i1 - i0, 1), max(j1 - j0, 1)


def _image_reader(mem_read):
    """Compiled ``read(field, storage_state, temp) -> ((H, W, 3) uint8 view, failed)`` of one
    stored image: JPEGs are decoded into ``temp`` (libjpeg-turbo, as ffcv does); raw images are
    viewed in place. ``failed``: libjpeg-turbo returned an error (ffcv ignores it); the image is
    then black, as the buffer would otherwise hold a partial decode over another image's pixels."""
    imdecode_c = libffcv("imdecode")
    jpg = IMAGE_MODES["jpg"]

    def read(field, storage_state, temp):
        data = mem_read(field["data_ptr"], storage_state)
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == jpg:
            failed = imdecode_c(data, temp, height, width, height, width, 0, 0, 1, 1, False, False) != 0
            image = temp[:3 * height * width].reshape(height, width, 3)
            if failed:
                image[:] = 0
            return image, failed
        # a truncated file makes this reshape fail: the loader reports it as a LoaderError
        return data.reshape(height, width, 3), False

    return Compiler.compile(read)


class ReportsDecodeErrors:
    """A decoder whose memory holds one flag per sample (uint8, 1 = its JPEG failed to decode), at
    index ``errors_at`` of its allocations; ``loaders.FfcvLoader`` reads them after each batch."""

    errors_at: int


def _error_flags() -> AllocationQuery:
    return AllocationQuery((), np.dtype("<u1"))  # (B,): 1 where the sample's JPEG failed


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder, ReportsDecodeErrors):
    """ffcv's random-resized crop (timm's RandomResizedCrop: 10 tries, then a centre fallback) and
    a horizontal flip, both drawn after ``np.random.seed(sample seed)``, right before the draws.

    Why not ffcv's ``RandomResizedCropRGBImageDecoder``: it draws from numba's unseeded per-thread
    RNG, so two runs crop differently. ffcv compiles the pipeline once and numba freezes closure
    values, so the seeds cannot come from Python state: ``FfcvLoader`` writes each batch's seeds
    into this decoder's third buffer (one uint32 per sample) right before decoding the batch.
    Numba's RNG is per thread, so seeding per sample makes prange scheduling irrelevant.
    """

    errors_at = 3

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: bool = True):
        super().__init__(output_size)
        self.scale, self.ratio, self.hflip = scale, ratio, bool(hflip)

    @property
    def get_crop_generator(self):
        return get_random_crop

    def declare_state_and_memory(self, previous_state):
        state, (output, temp) = super().declare_state_and_memory(previous_state)
        return state, (output, temp, AllocationQuery((), np.dtype("<u4")), _error_flags())  # + seeds (B,), flags

    def generate_code(self) -> Callable:
        read = _image_reader(self.memory_read)
        my_range = Compiler.get_iterator()
        crop_c = Compiler.compile(get_random_crop)
        resize_crop_c = libffcv("resize_crop")
        flip_c = Compiler.compile(_flip_in_place)
        scale, ratio, hflip = np.array(self.scale), np.array(self.ratio), self.hflip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, seeds, errors = my_storage
            for dst_ix in my_range(len(batch_indices)):
                image, failed = read(metadata[batch_indices[dst_ix]], storage_state, temp_storage[dst_ix])
                errors[dst_ix] = failed
                np.random.seed(seeds[dst_ix])  # numba: this thread's RNG; crop, then flip
                i, j, h, w = crop_c(image.shape[0], image.shape[1], scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                if hflip and np.random.random() < 0.5:
                    flip_c(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class TimmCenterCropDecoder(ResizedCropRGBImageDecoder, ReportsDecodeErrors):
    """Validation decoder with timm's eval geometry (``timm_center_crop``), resized by ffcv's cv2
    INTER_AREA (ffcv's only resize) where timm uses PIL bicubic: tests/test_decoders.py measures
    the difference on photos."""

    errors_at = 2

    def __init__(self, output_size, crop_pct: float):
        super().__init__(output_size)
        self.scale, self.ratio = None, float(crop_pct)

    def declare_state_and_memory(self, previous_state):
        state, (output, temp) = super().declare_state_and_memory(previous_state)
        return state, (output, temp, _error_flags())
    @property
    def get_crop_generator(self):
        return timm_center_crop

    def generate_code(self) -> Callable:
        read = _image_reader(self.memory_read)
        my_range = Compiler.get_iterator()
        crop_c = Compiler.compile(timm_center_crop)
        resize_crop_c = libffcv("resize_crop")
        crop_pct = self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, errors = my_storage
            out_size = destination.shape[1]  # (B, res, res, 3)
            for dst_ix in my_range(len(batch_indices)):
                image, failed = read(metadata[batch_indices[dst_ix]], storage_state, temp_storage[dst_ix])
                errors[dst_ix] = failed
                i, j, h, w = crop_c(image.shape[0], image.shape[1], out_size, crop_pct)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
