"""The loaders and traversal orders in one real 2-process gloo run: padding-free val shards (every
image once, uneven batch counts that do not hang), repeated augmentation across ranks, and
quasi_random falling back to random when distributed. Rank 1 is a spawned process, rank 0 runs
in this one (one interpreter start, ~6 s of imports, instead of two)."""
from __future__ import annotations

import collections
import datetime
import warnings

import pytest
import torch


def _two_rank_worker(rank, world, path, init_file, out):
    import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — the spawned rank's first ffcv import
    import torch.distributed as dist
    from ffcv.pipeline.compiler import Compiler

    from fastvit_reduce.data.loaders import create_train_loader, create_val_loader

    Compiler.set_enabled(False)
    # a timeout: a rank that dies must fail the other, not hang it (rank 0 is the test process)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    cpu = torch.device("cpu")
    val = create_val_loader(path, 5, cpu, res=16, crop_pct=1.0, num_workers=1, in_memory=1,
                            distributed=True)
    labels = [y.clone() for _, y in val]
    # why all_reduce after the loop: shards differ in length, a per-batch collective would hang
    stats = torch.tensor([float(sum(len(y) for y in labels)), float(len(labels))])
    dist.all_reduce(stats[:1])
    train = create_train_loader(path, 4, cpu, res=16, num_workers=1, in_memory=1, batches_ahead=1,
                                drop_last=True, order="quasi_random", aug_repeats=2, seed=0,
                                distributed=True, rrc_scale=[0.5, 1], rrc_ratio=[0.75, 1.33], hflip=1)
    train_labels = torch.cat([y.clone() for _, y in train])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quasi = create_train_loader(path, 4, cpu, res=16, num_workers=1, in_memory=1,
                                    batches_ahead=1, drop_last=True, order="quasi_random",
                                    aug_repeats=1, seed=0, distributed=True, rrc_scale=[0.5, 1],
                                    rrc_ratio=[0.75, 1.33], hflip=0)
    fell_back = any("quasi_random" in str(w.message) for w in caught)
    out.put((rank, torch.cat(labels).tolist(), int(stats[0]), len(val), train_labels.tolist(),
             fell_back, len(quasi)))
    dist.destroy_process_group()


# why: rank 0 runs here, so the loaders' expected warning about quasi_random with aug_repeats=2 reaches pytest
@pytest.mark.filterwarnings("ignore:aug_repeats=2 uses the repeated-augmentation order")
def test_two_process_gloo_val_once_and_repeat_aug(tmp_path, tiny_beton, no_jit):
    import torch.multiprocessing as mp

    n = 21  # shards of 11 and 10 images: 3 vs 2 batches of 5, both ending in a partial batch
    path = tiny_beton(n=n, num_classes=n, size=16)  # label == sample index
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_two_rank_worker, args=(1, 2, path, tmp_path / "init", out))]
    for p in procs:
        p.start()
    try:
        _two_rank_worker(0, 2, path, tmp_path / "init", out)  # rank 0, here (no_jit restores the compiler)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():  # the worker failed half-way
            dist.destroy_process_group()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    results = sorted(out.get() for _ in range(2))
    for p in procs:
        assert p.exitcode == 0
    val_seen = results[0][1] + results[1][1]
    assert sorted(val_seen) == list(range(n))  # every image once, no padding duplicates
    assert results[0][2] == results[1][2] == n  # all-reduced count is the true count
    assert (results[0][3], results[1][3]) == (3, 2)  # uneven batch counts did not hang
    train0, train1 = results[0][4], results[1][4]
    assert len(train0) == len(train1) == 8  # 11 positions per rank, drop_last with batch 4
    counts = collections.Counter(train0 + train1)
    assert max(counts.values()) <= 2
    assert results[0][5] and results[1][5]  # quasi_random warned and fell back to random
    assert results[0][6] == results[1][6] == 11 // 4  # DistributedSampler: ceil(21 / 2) each
