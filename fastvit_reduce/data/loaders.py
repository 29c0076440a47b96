"""FFCV train/val loaders: uint8 batches decoded by ffcv, moved to the device, normalised later.

Train: ``SeededRandomResizedCropDecoder`` (crop + resize + flip) → ``ToTensor`` → ``ToDevice``
→ ``ToTorchImage(channels_last)``; labels ``IntDecoder`` → ``ToTensor`` → ``Squeeze`` →
``ToDevice``. For the CPU device ``ToDevice`` is left out (it would only copy).
Images stay uint8 until they are on the device; normalisation and the AMP cast happen in torch
(``fastvit_reduce.augment.batch``). Why no ffcv ``NormalizeImage``: a numba op after a torch op
makes ffcv 1.0.2's ``Graph.group_operations`` loop forever, and uint8 moves 4x fewer bytes.

Val: ``TimmCenterCropDecoder`` — timm's eval geometry done as one crop + resize of the stored
pixels. Sequential, no drop_last; across ranks every image is seen exactly once
(``orders.ShardedSequentialOrder``), so shards may differ in length by one batch: compute metrics
as all_reduce(sum correct) / all_reduce(count) after the loop.

Both loaders are ``FfcvLoader``s: a failure in ffcv's decode thread (e.g. a truncated .beton)
raises ``LoaderError`` in the consumer instead of hanging it, a ``poll`` hook runs while waiting
for a batch, ``close()`` ends an abandoned epoch's thread, and ``take_decode_failures()`` names
the samples whose JPEG libjpeg-turbo could not decode (ffcv ignores its return code).

ffcv traps handled here: the device must be a ``torch.device`` (we convert strings); output
batches live in a ring of reused buffers (``batches_ahead + 2``) — ``.clone()`` anything kept
across iterations. Threads: ffcv's ``Loader.__init__`` calls ``torch.set_num_threads(num_workers)``
once (we cannot avoid it without patching ffcv); epochs of an ``FfcvLoader`` set only numba's
decode thread count. The caller owns torch's intra-op count: set it after building the loaders.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Sequence

import numba
import numpy as np
import torch
import torch.distributed as dist
import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — before any ffcv module
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.graph import DecoderNode
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from ..config import ConfigError
from ..seeding import derive_many
from .ahead import POLL_S, get_polling, one_torch_thread, put_until
from .betons import check_beton
from .decoders import ReportsDecodeErrors, SeededRandomResizedCropDecoder, TimmCenterCropDecoder
from .jit import cached_compilation
from .orders import RepeatAugOrder, ShardedSequentialOrder, install_order, sample_copies


JOIN_S = 30.0  # s close() waits for a decode thread to finish its current batch


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
        self.error_flags = [  # (graph node, index of its per-sample decode-error flags)
            (node.id, node.decoder.errors_at) for node in self.graph.nodes
            if isinstance(node, DecoderNode) and isinstance(node.decoder, ReportsDecodeErrors)]
        self._failed: list[int] = []  # dataset indices whose JPEG failed to decode
        self._failed_lock = threading.Lock()

    def take_decode_failures(self) -> list[int]:
        """The dataset indices whose JPEG failed to decode (trained as black images) since the
        last call, in decode order; a sample decoded twice (a resumed epoch) counts twice."""
        with self._failed_lock:
            failed, self._failed = self._failed, []
        return failed

    def _note_failures(self, indices) -> None:
        with self._failed_lock:
            self._failed.extend(int(i) for i in indices)

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
            put_until(self.output_queue, item, self.terminate_event)

    def _decode_epoch(self) -> bool:
        """Decode every batch into the queue; False when closed before the end."""
        # why not ffcv's Compiler.set_num_threads: it also sets torch's intra-op count (data.ahead.one_torch_thread)
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
            if not put_until(self.output_queue, (slot, result), self.terminate_event):
                return False
            if IS_CUDA:
                # as ffcv: the consumer has taken the batch of slot - batches_ahead - 1, so work
                # queued on the main stream until now is all that may still read that slot
                done_slot = (slot - self.loader.batches_ahead - 1) % slots
                event = torch.cuda.Event()
                event.record(self.current_stream)
                events[done_slot] = event
        return True

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.seeds is not None:
            start = b_ix * self.loader.batch_size  # chunks() cuts the order into batches in order
            seeds = self.seeds[start:start + len(batch_indices)]
            for node_id in self.loader.seeded_node_ids:
                self.memory_allocations["operation"][node_id][2][batch_slot][:len(seeds)] = seeds
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        for node_id, k in self.loader.error_flags:  # written by the decoder for this batch
            flags = self.memory_allocations["operation"][node_id][k][batch_slot][:len(batch_indices)]
            if flags.any():
                self.loader._note_failures(np.asarray(batch_indices)[flags != 0])
        return result

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
        return get_polling(self.output_queue, self._check_while_waiting)

    def _check_while_waiting(self) -> None:
        """While the consumer waits: a dead decode thread is a ``LoaderError``, and the loader's
        ``poll`` may stop the wait (the epoch is closed first)."""
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
