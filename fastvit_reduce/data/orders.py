"""FFCV traversal orders that ffcv 1.0.2 lacks, and the way to install them.

* ``RepeatAugOrder`` — repeated augmentation with timm ``RepeatAugSampler`` semantics.
* ``ShardedSequentialOrder`` — validation order: every image exactly once across ranks
  (ffcv's distributed SEQUENTIAL uses torch's ``DistributedSampler``, which pads with duplicates).
* ``sample_copies(order, epoch, length)`` — which copy of its image each entry of an epoch is (the
  loader seeds crops by it, so repeated copies are augmented differently).
* ``install_order(loader, order)`` — why: ``Loader(order=MyOrder)`` fails in ffcv 1.0.2 for both
  a class and an instance (fixed only on ffcv's unreleased main), so we build the loader with a
  built-in order and swap ours in afterwards.

An order only needs ``loader.indices``, ``loader.seed`` and ``loader.distributed``, so tests can
drive one with a stand-in object and a fake ``rank``/``world_size``.
"""
from __future__ import annotations

import math

import numpy as np
import torch.distributed as dist
import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — before any ffcv module
from ffcv.traversal_order.base import TraversalOrder

from fastvit_reduce.recipe import repeat_aug_selected


def _rank_and_world(loader, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit (rank, world_size) if given, else the process group's when the loader is
    distributed, else (0, 1)."""
    if rank is None and world_size is None:
        if not loader.distributed:
            return 0, 1
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed order needs an initialised torch.distributed "
                               "process group (call init_process_group first)")
        return dist.get_rank(), dist.get_world_size()
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return int(rank), int(world_size)


class RepeatAugOrder(TraversalOrder):
    """Repeated augmentation (DeiT), with the semantics of timm's ``RepeatAugSampler``.

    Each epoch: shuffle the dataset with seed ``seed + epoch``, repeat every index ``repeats``
    times in a row (``[a, a, a, b, b, b, ...]``), and deal the positions round-robin to the ranks,
    so the copies of one image land on different ranks (in one process: in the same batch).
    Each rank takes ``num_selected`` positions, which keeps the epoch length at the dataset size
    (rounded down to a multiple of ``selected_round`` when the dataset has at least that many
    images, as timm does), so only about ``N / repeats`` distinct images are seen per epoch.
    All ranks get the same length, so DDP steps stay in lock-step.
    """

    def __init__(self, loader, repeats: int = 3, *, rank: int | None = None,
                 world_size: int | None = None, selected_round: int = 256):
        super().__init__(loader)
        if int(repeats) != repeats or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        self.repeats = int(repeats)
        self.rank, self.world_size = _rank_and_world(loader, rank, world_size)
        n = len(self.indices)
        if n == 0:
            raise ValueError("RepeatAugOrder needs a non-empty dataset")
        self.num_samples = math.ceil(n * self.repeats / self.world_size)  # per rank, padded
        self.num_selected = repeat_aug_selected(n, self.world_size, self.repeats, selected_round)

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for ``epoch`` (length ``num_selected``)."""
        return self.order_and_copies(epoch)[0]

    def sample_copies(self, epoch: int) -> np.ndarray:
        """Which copy (0 .. repeats-1) of its image each entry of ``sample_order(epoch)`` is.

        The loader seeds each sample's crop and flip by (seed, epoch, index, copy), so the copies
        of one image get different augmentations, whichever rank they land on.
        """
        return self.order_and_copies(epoch)[1]

    def order_and_copies(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, copies)`` of this rank for ``epoch``, both of length ``num_selected``."""
        rng = np.random.default_rng(self.seed + epoch)
        permutation = rng.permutation(len(self.indices))
        # position q of the repeated list [a, a, a, b, b, b, ...] holds copy q % repeats of
        # permutation[q // repeats]; positions past its end wrap around (timm pads the same way)
        total = self.num_samples * self.world_size
        positions = np.arange(self.rank, total, self.world_size)[:self.num_selected]
        positions %= len(permutation) * self.repeats
        indices = np.asarray(self.indices)[permutation[positions // self.repeats]]
        return indices, positions % self.repeats


class ShardedSequentialOrder(TraversalOrder):
    """Sequential order split into contiguous shards, one per rank, without padding.

    Shard lengths differ by at most one (a rank may even get none when there are fewer images
    than ranks), so ranks may see different numbers of batches: run no collective per batch,
    reduce (sum of correct, count) once at the end.
    """

    def __init__(self, loader, *, rank: int | None = None, world_size: int | None = None):
        super().__init__(loader)
        self.rank, self.world_size = _rank_and_world(loader, rank, world_size)

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's contiguous slice of the dataset (the same every epoch)."""
        return np.array_split(np.asarray(self.indices), self.world_size)[self.rank]


def sample_copies(order: TraversalOrder, epoch: int, length: int) -> np.ndarray:
    """Copy number of each of the ``length`` entries of ``order.sample_order(epoch)``: the order's
    own ``sample_copies`` when it repeats images on purpose (``RepeatAugOrder``), else zeros."""
    if hasattr(order, "sample_copies"):
        copies = np.asarray(order.sample_copies(epoch), dtype=np.uint64)
        if len(copies) != length:
            raise RuntimeError(f"{type(order).__name__}: {len(copies)} copy numbers for an "
                               f"epoch of {length} samples")
        return copies
    return np.zeros(length, dtype=np.uint64)


def install_order(loader, order: TraversalOrder):
    """Make ``order`` drive ``loader`` from its next epoch on; returns the loader.

    Why: ffcv 1.0.2's ``Loader(order=...)`` hook is broken for custom orders. The loader must have
    been built with a built-in order; ``len(loader)`` reads ``first_traversal_order``, so refresh it.
    """
    if not isinstance(order, TraversalOrder):
        raise TypeError(f"expected an ffcv TraversalOrder instance, got {type(order).__name__}")
    loader.traversal_order = order
    loader.first_traversal_order = loader.next_traversal_order()
    return loader
