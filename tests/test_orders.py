"""fastvit_reduce.data.orders, the traversal orders: repeated augmentation (timm RepeatAugSampler
semantics) and its copy numbers, padding-free val shards, install_order on a real ffcv Loader. One
real 2-process gloo run: tests/e2e/test_distributed_loaders.py."""
from __future__ import annotations

import collections
import types

import numpy as np
import pytest
from ffcv.loader import Loader, OrderOption

from fastvit_reduce.data import orders
from fastvit_reduce.data.orders import (RepeatAugOrder, ShardedSequentialOrder, install_order,
                                        sample_copies)


def fake_loader(n: int, seed: int = 0, offset: int = 0):
    """What a TraversalOrder reads from an ffcv Loader."""
    return types.SimpleNamespace(indices=np.arange(offset, offset + n), seed=seed, distributed=False)


def rank_orders(order_cls, n, world, epoch=0, seed=0, **kw):
    loader = fake_loader(n, seed)
    return [order_cls(loader, rank=r, world_size=world, **kw).sample_order(epoch) for r in range(world)]


@pytest.mark.parametrize("n,world,repeats", [(50, 1, 3), (50, 2, 3), (37, 3, 3), (600, 4, 2), (10, 2, 1)])
def test_repeat_aug_counts_and_epoch_length(n, world, repeats):
    per_rank = rank_orders(RepeatAugOrder, n, world, repeats=repeats)
    lengths = {len(o) for o in per_rank}
    assert len(lengths) == 1, "all ranks must step in lock-step"
    expected = (n // 256 * 256) // world if n >= 256 else -(-n // world)  # timm's num_selected
    assert lengths == {expected}
    # epoch length stays at about the dataset size, over all ranks
    assert n - 256 < expected * world <= n + world - 1
    counts = collections.Counter(np.concatenate(per_rank).tolist())
    assert max(counts.values()) <= repeats
    # all but the last one or two images taken have every copy in the epoch
    assert sum(c == repeats for c in counts.values()) >= len(counts) - 2
    for o in per_rank:  # copies of one image go to different ranks first
        assert max(collections.Counter(o.tolist()).values()) <= -(-repeats // world)


def test_repeat_aug_one_copy_per_rank_when_repeats_equal_world():
    per_rank = rank_orders(RepeatAugOrder, 60, 3, repeats=3)
    for o in per_rank:
        assert len(set(o.tolist())) == len(o) == 20
    assert set(per_rank[0].tolist()) == set(per_rank[1].tolist()) == set(per_rank[2].tolist())


def test_repeat_aug_determinism_seed_and_epoch():
    a = rank_orders(RepeatAugOrder, 100, 2, epoch=5, seed=7, repeats=3)
    b = rank_orders(RepeatAugOrder, 100, 2, epoch=5, seed=7, repeats=3)
    c = rank_orders(RepeatAugOrder, 100, 2, epoch=6, seed=7, repeats=3)
    d = rank_orders(RepeatAugOrder, 100, 2, epoch=5, seed=8, repeats=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_repeat_aug_maps_positions_through_loader_indices():
    order = RepeatAugOrder(fake_loader(30, offset=1000), 3)
    assert order.sample_order(0).min() >= 1000


@pytest.mark.parametrize("n,world,repeats", [(50, 2, 3), (300, 3, 3), (1000, 4, 2), (7, 4, 3)])
def test_repeat_aug_matches_timm_sampler(monkeypatch, n, world, repeats):
    """Same dealing as timm's RepeatAugSampler once both shuffles are the identity."""
    from timm.data.distributed_sampler import RepeatAugSampler

    class Identity:
        def __init__(self, seed):
            pass

        def permutation(self, k):
            return np.arange(k)

    monkeypatch.setattr(orders.np.random, "default_rng", Identity)
    for rank in range(world):
        ours = RepeatAugOrder(fake_loader(n), repeats, rank=rank, world_size=world).sample_order(0)
        timm = RepeatAugSampler(range(n), num_replicas=world, rank=rank, shuffle=False, num_repeats=repeats)
        assert ours.tolist() == list(timm)


@pytest.mark.parametrize("n,world,repeats", [(50, 1, 3), (50, 2, 3), (37, 3, 3), (60, 3, 3), (10, 2, 1)])
def test_repeat_aug_copy_numbers_tell_copies_apart(n, world, repeats):
    """(index, copy) is unique across all ranks' epoch, so every copy can get its own crop."""
    loader = fake_loader(n, seed=4)
    pairs = []
    for rank in range(world):
        order = RepeatAugOrder(loader, repeats, rank=rank, world_size=world)
        indices, copies = order.sample_order(2), order.sample_copies(2)
        assert len(copies) == len(indices) and set(copies.tolist()) <= set(range(repeats))
        assert np.array_equal(sample_copies(order, 2, len(indices)), copies)
        pairs += list(zip(indices.tolist(), copies.tolist()))
    assert len(set(pairs)) == len(pairs)
    for index in {i for i, _ in pairs}:  # an image's copies are numbered 0, 1, ... in order
        numbers = sorted(c for i, c in pairs if i == index)
        assert numbers == list(range(len(numbers)))


def test_sample_copies_of_plain_orders_are_zero():
    order = ShardedSequentialOrder(fake_loader(9), rank=0, world_size=2)
    assert sample_copies(order, 0, 5).tolist() == [0] * 5
    with pytest.raises(RuntimeError, match="copy numbers"):
        sample_copies(RepeatAugOrder(fake_loader(9), 3), 0, 4)


@pytest.mark.parametrize("n,world", [(50, 2), (7, 3), (2, 4), (64, 1)])
def test_sharded_sequential_every_index_once(n, world):
    per_rank = rank_orders(ShardedSequentialOrder, n, world)
    assert sorted(np.concatenate(per_rank).tolist()) == list(range(n))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_order_argument_errors():
    with pytest.raises(ValueError, match="repeats"):
        RepeatAugOrder(fake_loader(10), 0)
    with pytest.raises(ValueError, match="rank"):
        ShardedSequentialOrder(fake_loader(10), rank=2, world_size=2)
    with pytest.raises(ValueError, match="both"):
        ShardedSequentialOrder(fake_loader(10), rank=0)
    distributed = types.SimpleNamespace(indices=np.arange(4), seed=0, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        ShardedSequentialOrder(distributed)


def test_install_order_drives_a_real_loader(tiny_beton, no_jit):
    path = tiny_beton(n=30, num_classes=30)  # label == sample index
    loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.RANDOM, seed=3,
                    drop_last=False, pipelines={"image": None})
    order = RepeatAugOrder(loader, 3)
    install_order(loader, order)
    assert len(loader) == 30 // 4 + 1
    for epoch in (0, 1):
        seen = [i for (label,) in loader for i in label.flatten().tolist()]  # tolist: buffers are reused
        assert seen == order.sample_order(epoch).tolist()
    with pytest.raises(TypeError):
        install_order(loader, RepeatAugOrder)
