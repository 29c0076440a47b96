"""Where the trainer's batches come from: the ``TrainSource`` protocol and the FFCV source.

A source yields, for every step of an epoch, ``(x, targets, ready)``: ``x`` the normalised model
input (B, 3, H, W) in the AMP dtype, ``targets`` the int64 labels or (B, num_classes) soft rows
(``soft_targets``), ``ready`` a CUDA event the model's stream must wait for (None on the CPU), and
``val()`` yields ``(x, labels)`` over this rank's shard of the validation set. ``FfcvSource``
(the .beton files, below) is the product; ``bench/timm_path.TimmSource`` is timm's own loaders,
for the benchmarks that compare the two through the same loop.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import torch

from ..augment.batch import augment_from_cfg, normalize
from ..recipe import train_res, val_res
from ..config import ConfigError
from ..runtime import decode_threads
from ..seeding import derive
from .ahead import on_stream
from .loaders import Turns, create_train_loader, create_val_loader, set_epoch, set_train_resolution


class TrainSource(Protocol):
    """What the trainer needs from a data source (``FfcvSource``; the benchmarks' ``TimmSource``)."""

    soft_targets: bool  # targets are (B, num_classes) rows summing to 1 (mixup/cutmix on)
    has_val: bool  # val() yields batches
    can_take_turns: bool  # training.overlap=none is possible (decoding only while the step waits)
    uses_ffcv: bool  # its pipelines are numba code (the numba cache is logged)

    def __len__(self) -> int: ...  # train batches per epoch on this rank

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple]: ...

    def val(self) -> Iterator[tuple]: ...

    def take_turns(self) -> None: ...

    def set_poll(self, poll: Callable[[], None]) -> None: ...

    def decode_failures(self) -> dict[str, list[int]]: ...  # {dataset: sample indices} since the last call

    def close(self) -> None: ...


def describe_failures(failed: dict[str, list[int]], shown: int = 10) -> str:
    """``'/data/train.beton: samples 17, 802'`` for ``{path: indices}`` (the first ``shown`` of each)."""
    return "; ".join(f"{path}: sample{'s' if len(ix) > 1 else ''} " + ", ".join(map(str, sorted(set(ix))[:shown]))
                     + (" ..." if len(set(ix)) > shown else "") for path, ix in failed.items())


OVERLAP_WORDS = {"ahead": "the next batch decoded and augmented beside the step",
                 "decode": "the next batch decoded beside the step, augmented in series",
                 "none": "decoding and augmentation take turns with the step, each with all the cores"}


def overlap_mode(choice: str, can_take_turns: bool) -> str:
    """``training.overlap``, checked against the data source (on 2 CPU cores ``none`` and ``ahead``
    measured the same wall time; ``ahead`` keeps the data wait low: docs/results/speed.md)."""
    if choice == "none" and not can_take_turns:
        raise ConfigError("training.overlap=none: this data source cannot take turns with the step "
                          "(only the .beton loaders can); use ahead or decode")
    return choice



class FfcvSource:
    """Train and val batches from the .beton files: decoded by ffcv, augmented on the device once
    per batch for every variant, the next batch prepared in a thread while the model steps."""

    can_take_turns = True
    uses_ffcv = True

    def __init__(self, cfg: dict, d, *, mean, std, crop_pct: float, start_epoch: int, dtype):
        self.cfg, self.d, self.mean, self.std = cfg, d, mean, std
        self.augment = augment_from_cfg(cfg, cfg["model.num_classes"], mean, std,
                                        cfg["training.label_smoothing"], d.device, dtype)
        self.soft_targets = self.augment.soft_targets
        self.loader = create_train_loader(
            cfg["data.train_dataset"], cfg["training.batch_size"], d.device, res=train_res(cfg, start_epoch),
            num_workers=decode_threads(cfg), in_memory=cfg["data.in_memory"],
            batches_ahead=cfg["data.batches_ahead"], drop_last=cfg["data.drop_last"],
            order=cfg["data.order"], aug_repeats=cfg["augment.aug_repeats"], seed=cfg["training.seed"],
            distributed=d.world > 1, rrc_scale=cfg["data.rrc_scale"], rrc_ratio=cfg["data.rrc_ratio"],
            hflip=cfg["data.hflip"], channels_last=cfg["training.channels_last"])
        self.val_loader = None
        if cfg["data.val_dataset"]:
            self.val_loader = create_val_loader(
                cfg["data.val_dataset"], cfg["validation.batch_size"], d.device,
                res=val_res(cfg), crop_pct=crop_pct,
                num_workers=decode_threads(cfg), in_memory=cfg["data.in_memory"],
                distributed=d.world > 1, channels_last=cfg["training.channels_last"])
        self.has_val = self.val_loader is not None
        self.loaders = [x for x in (self.loader, self.val_loader) if x is not None]
        self.side_stream = torch.cuda.Stream(d.device) if d.device.type == "cuda" else None
        self.turns: Turns | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def take_turns(self) -> None:
        """Decode only while the consumer waits for a batch (``training.overlap=none``); the
        augmentation then runs in the consumer's thread, inside its turn."""
        self.turns = Turns()
        for loader in self.loaders:
            loader.turns = self.turns

    def held(self):
        return self.turns.held() if self.turns is not None else contextlib.nullcontext()

    def set_poll(self, poll) -> None:
        """Called while a loader waits for its decode thread; may raise to stop the wait."""
        for loader in self.loaders:
            loader.poll = poll

    def decode_failures(self) -> dict[str, list[int]]:
        """``{dataset path: sample indices}`` whose JPEG failed to decode (and was used as a black
        image) since the last call, on this rank."""
        out = {}
        for loader in self.loaders:
            failed = loader.take_decode_failures()
            if failed:
                out.setdefault(loader.fname, []).extend(failed)
        return out

    def close(self) -> None:
        """End the decode threads of a running epoch (a stopped or finished run)."""
        for loader in self.loaders:
            loader.close()

    def epoch(self, epoch: int, skip: int = 0):
        """(x, targets, ready) for the steps ``skip``.. of ``epoch``; x normalised, in the AMP dtype.

        CUDA: the augmentation runs on a side stream and ``ready`` is an event on it; the consumer
        makes its own stream wait for it (``hand_over``). The side stream is current only while a
        batch is prepared, never across a ``yield``: with ``training.overlap=decode|none`` this
        generator runs in the stepping thread, whose model step, evaluation, EMA and checkpoints
        must stay on their own stream."""
        cfg, d, side = self.cfg, self.d, self.side_stream
        set_train_resolution(self.loader, train_res(cfg, epoch))
        set_epoch(self.loader, epoch)  # the order, crops and flips of this epoch
        with self.held():  # with turns: held while the consumer steps on each batch
            with on_stream(side):  # ffcv's iterator waits for its copies on the stream current here
                batches = iter(self.loader)
            for i, (images, labels) in enumerate(batches):
                if i < skip:  # resumed mid-epoch: these steps were trained before the stop
                    continue
                with on_stream(side):
                    # why clone: ffcv reuses its output buffers (batches_ahead + 2 slots) and this batch
                    # is used one step later; the images are copied by the augmentation anyway
                    labels = labels.clone()
                    x, y = self.augment(images, labels, seed=derive(cfg["training.seed"], "augment", epoch, i, d.rank))
                    if cfg["training.channels_last"]:
                        x = x.contiguous(memory_format=torch.channels_last)
                    ready = None
                    if side is not None:  # the model's stream waits for this batch only
                        ready = torch.cuda.Event()
                        ready.record(side)
                yield x, y, ready

    def val(self):
        """(x normalised, int64 labels) over this rank's shard of the val set."""
        dtype = self.augment.dtype
        with self.held():
            for images, labels in self.val_loader:
                yield normalize(images, self.mean, self.std, dtype=dtype), labels
