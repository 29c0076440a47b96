"""FFCV train/val loaders: uint8 batches decoded by ffcv, moved to the device, normalised later.

Train: ``SeededRandomResizedCropDecoder`` (crop + resize + flip) → ``ToTensor`` → ``ToDevice``
→ ``ToTorchImage(channels_last)``; labels ``IntDecoder`` → ``ToTensor`` → ``Squeeze`` →
``ToDevice``.
For the CPU device ``ToDevice`` is left out (it would only copy).
Images stay uint8 until they are on the device; normalisation and the AMP cast happen in torch
(``fastvit_reduce.augment.batch.normalize``). Why no ffcv ``NormalizeImage``: a numba op after a
torch op makes ffcv 1.0.2's ``Graph.group_operations`` loop forever, and uint8 moves 4x fewer bytes.

Determinism: each sample's crop box and flip are a pure function of (seed, epoch, dataset index,
copy), where copy numbers the repeats of an image within an epoch (repeated augmentation). They do
not depend on num_workers, batches_ahead, batch size or the rank that decodes the sample.

Val: ``TimmCenterCropDecoder`` — timm's eval geometry (resize the short side to
``floor(res / crop_pct)``, centre-crop ``res``) done as one crop + resize of the stored pixels.
Sequential, no drop_last; across ranks every image is seen exactly once
(``orders.ShardedSequentialOrder``), so shards may differ in length by one batch: compute metrics
as all_reduce(sum correct) / all_reduce(count) after the loop.

Both loaders are ``FfcvLoader``s: a failure in ffcv's decode thread (e.g. a truncated .beton)
raises ``LoaderError`` in the consumer instead of hanging it, a ``poll`` hook runs while waiting
for a batch, and ``close()`` ends an abandoned epoch's thread.

Ffcv traps handled here: the device must be a ``torch.device`` (we convert strings); output
batches live in a ring of reused buffers (``batches_ahead + 2``) — ``.clone()`` anything kept
across iterations. Threads: ffcv's ``Loader.__init__`` calls ``torch.set_num_threads(num_workers)``
once (we cannot avoid it without patching ffcv); epochs of an ``FfcvLoader`` set only numba's
decode thread count. The caller owns torch's intra-op count: set it after building the loaders.
"""
from __future__ import annotations

import contextlib
import json
import threading
import warnings
from pathlib import Path
from queue import Empty, Full
from typing import Callable, Sequence

import numba
import numpy as np
import torch
import torch.distributed as dist
from fastargs import Param, Section
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.graph import DecoderNode
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from ..config import Bool01, Choice, ConfigError, FloatList, Number
from ..seeding import derive_many
from .jit import cached_compilation, libffcv
from .orders import RepeatAugOrder, ShardedSequentialOrder, install_order, sample_copies

Section("data", "FFCV datasets and loading").params(
    train_dataset=Param(str, "train .beton path", default=""),
    val_dataset=Param(str, "validation .beton path", default=""),
    num_workers=Param(Number(int, 0), "ffcv decode threads per process (0 = the cores this "
                      "process may use: its CPU affinity / processes on the node)", default=0),
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


# ----------------------------------------------------------------------------- decoders
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
    i0, j0 = max(0, int(np.ceil(top - 0.5))), max(0, int(np.ceil(left - 0.5)))
    i1, j1 = min(height, int(np.floor(bottom + 0.5))), min(width, int(np.floor(right + 0.5)))
    return i0, j0, i1 - i0, j1 - j0


def _image_reader(mem_read):
    """Compiled ``read(field, storage_state, temp) -> (H, W, 3) uint8`` view of one stored image:
    JPEGs are decoded into ``temp`` (libjpeg-turbo, as ffcv does); raw images are viewed in
    place."""
    imdecode_c = libffcv("imdecode")
    jpg = IMAGE_MODES["jpg"]

    def read(field, storage_state, temp):
        data = mem_read(field["data_ptr"], storage_state)
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == jpg:
            imdecode_c(data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
            return temp[:3 * height * width].reshape(height, width, 3)
        # a truncated file makes this reshape fail: the loader reports it as a LoaderError
        return data.reshape(height, width, 3)

    return Compiler.compile(read)


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """ffcv's random-resized crop (timm's RandomResizedCrop: 10 tries, then a centre fallback) and
    a horizontal flip, both drawn after ``np.random.seed(sample seed)``, right before the draws.

    Why not ffcv's ``RandomResizedCropRGBImageDecoder``: it draws from numba's unseeded per-thread
    RNG, so two runs crop differently. ffcv compiles the pipeline once and numba freezes closure
    values, so the seeds cannot come from Python state: ``FfcvLoader`` writes each batch's seeds
    into this decoder's third buffer (one uint32 per sample) right before decoding the batch.
    Numba's RNG is per thread, so seeding per sample makes prange scheduling irrelevant.
    """

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: bool = True):
        super().__init__(output_size)
        self.scale, self.ratio, self.hflip = scale, ratio, bool(hflip)

    @property
    def get_crop_generator(self):
        return get_random_crop

    def declare_state_and_memory(self, previous_state):
        state, (output, temp) = super().declare_state_and_memory(previous_state)
        return state, (output, temp, AllocationQuery((), np.dtype("<u4")))  # + seeds (B,)

    def generate_code(self) -> Callable:
        read = _image_reader(self.memory_read)
        my_range = Compiler.get_iterator()
        crop_c = Compiler.compile(get_random_crop)
        resize_crop_c = libffcv("resize_crop")
        flip_c = Compiler.compile(_flip_in_place)
        scale, ratio, hflip = np.array(self.scale), np.array(self.ratio), self.hflip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, seeds = my_storage
            for dst_ix in my_range(len(batch_indices)):
                image = read(metadata[batch_indices[dst_ix]], storage_state, temp_storage[dst_ix])
                np.random.seed(seeds[dst_ix])  # numba: this thread's RNG; crop, then flip
                i, j, h, w = crop_c(image.shape[0], image.shape[1], scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                if hflip and np.random.random() < 0.5:
                    flip_c(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class TimmCenterCropDecoder(ResizedCropRGBImageDecoder):
    """Validation decoder with timm's eval geometry (``timm_center_crop``), resized by ffcv's cv2
    INTER_AREA (ffcv's only resize) where timm uses PIL bicubic: tests/test_eval_parity.py measures
    the difference on photos."""

    def __init__(self, output_size, crop_pct: float):
        super().__init__(output_size)
        self.scale, self.ratio = None, float(crop_pct)

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
            destination, temp_storage = my_storage
            out_size = destination.shape[1]  # (B, res, res, 3)
            for dst_ix in my_range(len(batch_indices)):
                image = read(metadata[batch_indices[dst_ix]], storage_state, temp_storage[dst_ix])
                i, j, h, w = crop_c(image.shape[0], image.shape[1], out_size, crop_pct)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ----------------------------------------------------------------------------- loader
POLL_S = 0.5  # s between checks of the decode thread (and calls of loader.poll) while waiting
JOIN_S = 30.0  # s close() waits for a decode thread to finish its current batch


def one_torch_thread() -> None:
    """Run the calling helper thread's torch ops on one intra-op thread. The consumer keeps its own
    count if it has used it before the helper starts (torch fixes a thread's count on first use,
    from the last count set anywhere): ``FfcvLoader.__iter__`` and ``Ahead`` make sure of that.

    Why: a helper thread (ffcv's decode thread, whose ``ToTorchImage`` copies the batch; the
    trainer's batch-ahead thread) running a torch op at the process's count becomes the master of
    a second OpenMP team. libgomp then manages more threads than there are cores and cuts its spin
    at every barrier from 300,000 to 100 iterations, so each of the step's hundreds of parallel
    regions sleeps and wakes on a futex. Measured on 2 cores, ViT-Ti at 64 px, batch 32, 2 threads:
    forward + backward 165 ms and AdamW 22 ms before an epoch, 343 and 119 ms while an epoch's
    decode thread (idle after one batch) existed (README, speed section)."""
    torch.set_num_threads(1)


class Turns:
    """The consumer's compute and ffcv's decoding take turns on this process's cores.

    Why: on a CPU, torch's OpenMP team waits at every parallel region for its slowest thread, so a
    decode thread on one of its cores stalls the whole step (ViT-Ti at 64 px, batch 32, 2 cores,
    ``bench threads``' step: 160 ms alone, 387 ms beside one busy numpy thread). Taking turns gives the step, and
    then the decoding, all the cores. The consumer holds the turn while it computes (``held()``,
    around its whole loop over the loader); the loader's ``__next__`` hands the turn to the decode
    thread while the consumer waits for a batch; the decode thread holds it for one batch at a time.
    A plain lock: nothing depends on which thread gets it first, only that the two never overlap.
    """

    def __init__(self):
        self._lock = threading.Lock()

    def take(self, stop: threading.Event | None = None) -> bool:
        """Wait for the turn; False (without it) once ``stop`` is set."""
        while not self._lock.acquire(timeout=POLL_S):
            if stop is not None and stop.is_set():
                return False
        return True

    def give(self) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def held(self):
        """The consumer's side: its compute holds the turn; waiting in ``__next__`` lends it out."""
        self.take()
        try:
            yield
        finally:
            self.give()


class LoaderError(RuntimeError):
    """ffcv's decode thread failed (for example on a damaged .beton); the message names the file."""


_FAILED = object()  # queue sentinel: the decode thread stored an exception in .error


class FfcvLoader(Loader):
    """ffcv's ``Loader`` with per-sample seeds, a watched decode thread and numba-only threads.

    * Seeds: each epoch, the sample at each position of the order gets
      ``derive32(seed, epoch, index + copy * N)`` (copy > 0 only for repeated augmentation), which
      ``SeededRandomResizedCropDecoder`` reads from its seed buffer. The epoch is the one
      ``set_epoch`` set (``next_epoch``). A ``loader.seed`` also seeds ffcv's order, as before.
    * Failures: an exception in the decode thread raises ``LoaderError`` in ``__next__`` within
      ``POLL_S``, instead of the endless ``queue.get()`` of ffcv 1.0.2's ``EpochIterator``.
    * ``poll``: an optional callable, called every ``POLL_S`` while waiting for a batch; whatever it
      raises (e.g. the trainer's stop on SIGTERM) stops the epoch and propagates.
    * Threads: an epoch sets numba's decode thread count only (ffcv also sets torch's); ffcv's
      ``Loader.__init__`` still calls ``torch.set_num_threads(num_workers)`` once, so the caller
      sets torch's intra-op count after building its loaders.
    * ``close()`` ends the running epoch's thread; a new ``iter()`` closes the previous epoch's.
    * ``turns``: an optional ``Turns``; when set, each batch is decoded only while the consumer,
      which must iterate inside ``turns.held()``, waits in ``__next__``.
    """

    def __init__(self, *args, **kwargs):
        with cached_compilation():  # ffcv compiles the memory reader here, the pipelines later
            super().__init__(*args, **kwargs)
        self.poll: Callable[[], None] | None = None
        self.turns: Turns | None = None
        self.epoch_iterator: _WatchedEpochIterator | None = None
        self.seeded_node_ids = [  # graph nodes whose decoder reads a seed buffer
            node.id for node in self.graph.nodes
            if isinstance(node, DecoderNode)
            and isinstance(node.decoder, SeededRandomResizedCropDecoder)]

    def __iter__(self):
        self.close()
        # why: torch fixes a thread's intra-op count on its first use, from the last count set
        # anywhere; our decode threads set 1 (one_torch_thread), so the consumer fixes its own first
        torch.get_num_threads()
        epoch = self.next_epoch
        full_order = self.next_traversal_order()
        order = full_order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        seeds = None
        if self.seeded_node_ids:
            copies = sample_copies(self.traversal_order, epoch, len(full_order))[:len(order)]
            keys = np.asarray(order, dtype=np.uint64) + copies * np.uint64(self.reader.num_samples)
            seeds = derive_many(self.seed, epoch, keys)  # (len(order),) uint32
        self.epoch_iterator = _WatchedEpochIterator(self, order, seeds)
        return self.epoch_iterator

    def generate_code(self):
        with cached_compilation():
            super().generate_code()

    def close(self) -> None:
        """Stop the running epoch (if any) and wait for its decode thread to end."""
        if self.epoch_iterator is not None:
            self.epoch_iterator.close()
            self.epoch_iterator = None


class _WatchedEpochIterator(EpochIterator):
    """ffcv's ``EpochIterator`` whose thread reports failures and whose consumer never waits blind.

    ``run`` is ffcv's loop (same slots and CUDA events) inside a catch-all; ``__next__`` polls the
    queue every ``POLL_S`` and keeps ffcv's CUDA stream hand-off unchanged.
    """

    def __init__(self, loader: FfcvLoader, order, seeds: np.ndarray | None):
        # set before ffcv's __init__, which starts the thread as its last step
        self.seeds = seeds
        self.error: BaseException | None = None
        super().__init__(loader, order)

    def run(self):
        try:
            finished = self._decode_epoch()
            item = None
        except BaseException as e:  # noqa: BLE001 — any failure must reach the consumer
            self.error, finished, item = e, True, _FAILED
        if finished:
            self._put(item)

    def _decode_epoch(self) -> bool:
        """Decode every batch into the queue; False when closed before the end."""
        # why not ffcv's Compiler.set_num_threads: it also sets torch's intra-op count (issue 10)
        numba.set_num_threads(self.loader.num_workers)
        one_torch_thread()
        slots = self.loader.batches_ahead + 2
        events = [None] * len(self.cuda_streams)
        turns = self.loader.turns
        for b_ix, batch_indices in enumerate(self.iter_ixes):
            slot = self.current_batch_slot
            self.current_batch_slot = (slot + 1) % slots
            if turns is not None and not turns.take(self.terminate_event):
                return False
            try:
                result = self.run_pipeline(b_ix, batch_indices, slot, events[slot])
            finally:
                if turns is not None:
                    turns.give()
            if not self._put((slot, result)):
                return False
            if IS_CUDA:
                # as ffcv: the consumer has taken the batch of slot - batches_ahead - 1, so work
                # queued on the main stream until now is all that may still read that slot
                done_slot = (slot - self.loader.batches_ahead - 1) % slots
                event = torch.cuda.Event()
                event.record(self.current_stream)
                events[done_slot] = event
        return True

    def _put(self, item) -> bool:
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(item, block=True, timeout=POLL_S)
                return True
            except Full:
                pass
        return False

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.seeds is not None:
            start = b_ix * self.loader.batch_size  # chunks() cuts the order into batches in order
            seeds = self.seeds[start:start + len(batch_indices)]
            for node_id in self.loader.seeded_node_ids:
                self.memory_allocations["operation"][node_id][2][batch_slot][:len(seeds)] = seeds
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def __next__(self):
        turns = self.loader.turns
        if turns is not None:
            turns.give()  # the decode thread's turn while we wait
        try:
            item = self._wait()
        finally:
            if turns is not None:
                turns.take()
        if item is None:
            self.close()
            raise StopIteration()
        if item is _FAILED:
            self.close()
            raise self._failure() from self.error
        slot, result = item
        if IS_CUDA:
            stream = self.cuda_streams[slot]
            # We wait for the copy to be done (as ffcv)
            self.current_stream.wait_stream(stream)
        return result

    def _wait(self):
        while True:
            try:
                return self.output_queue.get(timeout=POLL_S)
            except Empty:
                if not self.is_alive() and self.output_queue.empty():
                    self.close()
                    if self.error is None and self.terminate_event.is_set():
                        raise StopIteration() from None  # closed by the consumer
                    raise self._failure() from self.error
                if self.loader.poll is not None:
                    try:
                        self.loader.poll()
                    except BaseException:
                        self.close()
                        raise

    def _failure(self) -> LoaderError:
        cause = (f"{type(self.error).__name__}: {self.error}" if self.error is not None
                 else "it ended without a result")
        return LoaderError(f"{self.loader.fname}: ffcv's decode thread failed ({cause}); "
                           f"is the .beton file damaged or truncated?")

    def close(self):
        """Stop the thread, wait for it (up to ``JOIN_S``), then release the epoch's memory."""
        terminate = getattr(self, "terminate_event", None)
        if terminate is None:  # ffcv's __init__ failed before the thread existed
            return
        terminate.set()
        if self.closed:
            return
        if self.is_alive() and threading.current_thread() is not self:
            self.join(JOIN_S)
        if self.is_alive():
            return  # still inside a batch: keep its memory mapped; it exits at its next put
        self.closed = True
        self.memory_context.__exit__(None, None, None)


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
                        channels_last: bool = True) -> FfcvLoader:
    """ffcv Loader yielding ``(images uint8 (B,3,res,res), labels int64 (B,))`` on ``device``.

    ``aug_repeats > 1`` selects ``RepeatAugOrder`` (timm RepeatAugSampler semantics) and overrides
    ``order``; ``aug_repeats == 1`` uses ``order``: 'random', or 'quasi_random' (single process
    only — when distributed it falls back to 'random' with a warning). ``batch_size`` is per
    process. With ``distributed`` the torch process group must already exist; all ranks get the
    same number of batches. Crops and flips are a pure function of (seed, epoch, sample index,
    copy): call ``set_epoch`` before each epoch so that a resumed run sees the same order and the
    same augmentations, and ``set_train_resolution`` between epochs for progressive resizing.
    """
    check_beton(path)
    _check_batch(batch_size)
    _check_workers(num_workers)
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
    decoder = SeededRandomResizedCropDecoder((_check_res(res),) * 2, scale=scale, ratio=ratio,
                                             hflip=bool(hflip))
    image = [decoder] + _image_tail(device, channels_last)
    use_quasi = order == "quasi_random" and aug_repeats == 1
    loader = FfcvLoader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=bool(in_memory),
                        order=OrderOption.QUASI_RANDOM if use_quasi else OrderOption.RANDOM,
                        distributed=distributed, seed=int(seed), drop_last=bool(drop_last),
                        batches_ahead=batches_ahead,
                        pipelines={"image": image, "label": _label_pipeline(device)})
    if aug_repeats > 1:
        install_order(loader, RepeatAugOrder(loader, aug_repeats))
    return loader


def create_val_loader(path, batch_size: int, device, *, res: int, crop_pct: float,
                      num_workers: int, in_memory: bool, distributed: bool,
                      channels_last: bool = True) -> FfcvLoader:
    """ffcv Loader yielding center-cropped ``(images uint8 (B,3,res,res), labels int64 (B,))``.

    ``crop_pct`` has timm's meaning: the short side is resized to ``floor(res / crop_pct)`` and
    the centre ``res`` x ``res`` is kept (resolve the config's 0 to the model's
    ``pretrained_cfg['crop_pct']`` before calling). Sequential, keeps the last partial batch,
    and with ``distributed`` each rank reads its own contiguous shard, without
    the padding duplicates of ffcv's distributed SEQUENTIAL order: every image counts once.
    ``check_datasets(train, val)`` checks that the two files were written with the same classes.
    """
    num_samples = check_beton(path)
    _check_batch(batch_size)
    _check_workers(num_workers)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r} (resolve 0 to the "
                         f"model's pretrained_cfg['crop_pct'] first)")
    if distributed:
        _require_process_group()
        # why: ffcv's process cache crashes on an empty epoch (a rank gets no image when there are
        # fewer val images than ranks); the OS cache handles it
        in_memory = in_memory or num_samples < dist.get_world_size()
    device = _as_device(device)
    decoder = TimmCenterCropDecoder((_check_res(res),) * 2, crop_pct=float(crop_pct))
    loader = FfcvLoader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=bool(in_memory), order=OrderOption.SEQUENTIAL,
                        distributed=distributed, seed=0, drop_last=False,
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
    """Make the next iteration of ``loader`` use the order and the crops/flips of ``epoch``, so a
    run resumed at epoch e sees the same samples and augmentations as an unbroken one."""
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    loader.next_epoch = int(epoch)


# ----------------------------------------------------------------------------- small checks
def _check_res(res) -> int:
    if int(res) != res or res < 1:
        raise ValueError(f"resolution must be a positive integer, got {res!r}")
    return int(res)


def _check_workers(num_workers) -> None:
    # why: numba refuses more threads than NUMBA_NUM_THREADS (the cores at import); ffcv's Loader
    # would raise a bare ValueError from numba.set_num_threads
    limit = numba.config.NUMBA_NUM_THREADS
    if num_workers > limit:
        raise ConfigError(f"data.num_workers={num_workers} is more decode threads than numba allows "
                          f"here ({limit}, NUMBA_NUM_THREADS); use at most {limit}")


def _check_batch(batch_size) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _pair(name: str, values: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be two numbers 0 < lo <= hi, got {list(values)}")
    return lo, hi
