"""fastvit_reduce.data.loaders, the FFCV train/val loaders: batch format, labels and pixels as written, epoch controls,
deterministic crops and flips, a dead decode thread as an error, errors.

Two train loaders and one val loader run with ffcv's numba JIT (~10 s of compile in all); the
other loaders run ffcv's ops as plain Python (``no_jit``), instant on 16-48 px images.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest
import torch
from conftest import make_images, write_beton

from fastvit_reduce.config import ConfigError
from fastvit_reduce.data import loaders
from fastvit_reduce.data.loaders import (LoaderError, create_train_loader, create_val_loader, set_epoch,
                                         set_train_resolution)

# why: numba's dispatcher finalizer can raise a harmless KeyError when an ffcv loader's JIT-compiled
# ops are garbage-collected; pytest would report it as a warning on an unrelated test
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N, SIZE = 40, 48  # images in the module's .beton; label == sample index
CPU = torch.device("cpu")


def train_loader(path, batch_size=8, **overrides):
    kw = dict(res=32, num_workers=2, in_memory=1, batches_ahead=2, drop_last=True, order="random",
              aug_repeats=1, seed=0, distributed=False, rrc_scale=[0.08, 1.0],
              rrc_ratio=[0.75, 4 / 3], hflip=1)
    kw.update(overrides)
    return create_train_loader(path, batch_size, CPU, **kw)


def val_loader(path, batch_size=16, **overrides):
    kw = dict(res=SIZE, crop_pct=1.0, num_workers=2, in_memory=1, distributed=False)
    kw.update(overrides)
    return create_val_loader(path, batch_size, CPU, **kw)


def epoch_labels(loader) -> list[int]:
    return [i for _, y in loader for i in y.tolist()]  # tolist: ffcv reuses batch buffers


def epoch_digest(loader, epoch: int) -> str:
    """SHA-256 of every image and label of ``epoch``, in loader order."""
    set_epoch(loader, epoch)
    digest = hashlib.sha256()
    for images, labels in loader:
        digest.update(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()


def images_by_label(loader, epoch: int) -> dict[int, list[bytes]]:
    """Each label's images of ``epoch`` (label == sample index here), in order of appearance."""
    set_epoch(loader, epoch)
    out: dict[int, list[bytes]] = {}
    for images, labels in loader:
        for image, label in zip(images, labels.tolist()):
            out.setdefault(label, []).append(image.numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    return write_beton(tmp_path_factory.mktemp("loaders") / "data.beton", n=N, num_classes=N, size=SIZE)


@pytest.fixture(scope="module")
def jit_train(beton):
    return train_loader(beton)


# ----------------------------------------------------------------------------- batches
def test_train_batches_uint8_channels_last_on_device(jit_train):
    assert len(jit_train) == N // 8
    batches = 0
    for images, labels in jit_train:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
        assert images.device == CPU and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (8,) and labels.dtype == torch.int64
        batches += 1
    assert batches == N // 8


def test_train_epoch_is_a_permutation_and_set_epoch_repeats_it(jit_train):
    set_epoch(jit_train, 3)
    first = epoch_labels(jit_train)
    assert sorted(first) == list(range(N))  # every written label once (drop_last: N % 8 == 0)
    set_epoch(jit_train, 3)
    assert epoch_labels(jit_train) == first
    assert epoch_labels(jit_train) != first  # the loader moved on to epoch 4
    with pytest.raises(ValueError, match="epoch"):
        set_epoch(jit_train, -1)


def test_progressive_resize_changes_output_size(jit_train):
    set_train_resolution(jit_train, 48)
    images, _ = next(iter(jit_train))
    assert images.shape == (8, 3, 48, 48)
    set_train_resolution(jit_train, 16)
    assert next(iter(jit_train))[0].shape == (8, 3, 16, 16)
    set_train_resolution(jit_train, 32)
    with pytest.raises(ValueError, match="resolution"):
        set_train_resolution(jit_train, 0)


def test_val_sequential_keeps_last_batch_and_pixels_match(beton):
    loader = val_loader(beton, batch_size=16)  # JIT, sharing the train loader's compiled ops
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    assert [len(y) for y in labels] == [16, 16, 8]
    assert torch.cat(labels).tolist() == list(range(N))
    written = np.stack([img for img, _ in make_images(N, N, SIZE)])  # (N, H, W, 3)
    got = torch.cat(images).permute(0, 2, 3, 1).numpy()  # crop_pct=1 at full size: no resampling
    assert np.array_equal(got, written)


def test_channels_first_option_and_batch_of_one(beton, no_jit):
    images, labels = next(iter(val_loader(beton, batch_size=1, res=24, channels_last=False)))
    assert images.shape == (1, 3, 24, 24) and images.is_contiguous()
    assert labels.shape == (1,)  # not squeezed to a 0-d tensor


def test_repeat_aug_and_quasi_random_train_orders(beton, no_jit):
    loader = train_loader(beton, batch_size=6, aug_repeats=4, res=16, drop_last=False)
    labels = epoch_labels(loader)
    assert len(labels) == N and len(loader) == 7  # epoch length = dataset size
    counts = np.bincount(labels, minlength=N)
    assert set(counts.tolist()) == {0, 4}  # N / 4 images, each 4 times
    quasi = train_loader(beton, order="quasi_random", in_memory=0, res=16)
    assert sorted(epoch_labels(quasi)) == list(range(N))


def test_flip_is_folded_into_the_decoder(beton, no_jit):
    # scale 1, ratio 1 on square images at their own size: the crop is the whole image, so each
    # output is the written image or its mirror
    written = {label: img for label, (img, _) in enumerate(make_images(N, N, SIZE))}
    kw = dict(res=SIZE, rrc_scale=[1, 1], rrc_ratio=[1, 1], drop_last=False)
    mirrored = 0
    for images, labels in train_loader(beton, **kw):
        for image, label in zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()):
            mirror = written[label][:, ::-1]
            assert np.array_equal(image, written[label]) or np.array_equal(image, mirror)
            mirrored += not np.array_equal(image, written[label])
    assert 8 <= mirrored <= 32  # about half of 40
    for images, labels in train_loader(beton, hflip=0, **kw):
        for image, label in zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()):
            assert np.array_equal(image, written[label])


# ----------------------------------------------------------------------------- determinism
def test_jit_crops_repeat_per_epoch_and_ignore_workers_and_prefetch(beton, jit_train):
    """Compiled pipeline: (seed, epoch) fixes every pixel; workers and batches_ahead do not."""
    first = epoch_digest(jit_train, 0)  # num_workers=2, batches_ahead=2
    assert epoch_digest(jit_train, 1) != first
    assert epoch_digest(jit_train, 0) == first
    other = train_loader(beton, num_workers=1, batches_ahead=3)
    assert epoch_digest(other, 0) == first


def test_crops_depend_on_epoch_and_sample_not_on_batching(beton, no_jit):
    reference = images_by_label(train_loader(beton, num_workers=1, batches_ahead=1), 0)
    for kw in (dict(num_workers=2, batches_ahead=3), dict(batch_size=5)):
        assert images_by_label(train_loader(beton, **kw), 0) == reference
    next_epoch = images_by_label(train_loader(beton), 1)
    # new crops, not only a new order
    assert sum(next_epoch[k] != reference[k] for k in reference) >= N - 2
    reseeded = images_by_label(train_loader(beton, seed=1), 0)
    assert sum(reseeded[k] != reference[k] for k in reference) >= N - 2


def test_resumed_epoch_equals_a_fresh_loader_at_that_epoch(beton, no_jit):
    running = train_loader(beton)
    for epoch in range(3):
        digest = epoch_digest(running, epoch)
    assert epoch_digest(train_loader(beton), 2) == digest
    epoch_labels(running)  # the next epoch (3) runs without set_epoch
    assert epoch_digest(train_loader(beton), 3) != digest


def test_repeated_copies_get_their_own_crops(beton, no_jit):
    loader = train_loader(beton, batch_size=8, aug_repeats=4, drop_last=False)
    copies = list(images_by_label(loader, 0).values())
    assert {len(c) for c in copies} == {4}
    assert all(len(set(c)) == 4 for c in copies)  # 4 copies, 4 different crops/flips


def test_epochs_leave_torchs_thread_count_alone(beton, no_jit):
    loader = train_loader(beton, num_workers=2)  # ffcv's __init__ sets torch's count once
    torch.set_num_threads(1)
    epoch_labels(loader)
    assert torch.get_num_threads() == 1


# ----------------------------------------------------------------------------- turns
def decode_and_step_spans(loader, monkeypatch, step_s: float = 0.03):
    """Epoch 0 with a consumer that "steps" ``step_s`` per batch: (digest, decode spans, step spans)."""
    decodes, steps = [], []
    run_pipeline = loaders._WatchedEpochIterator.run_pipeline

    def timed(self, *args):
        t0 = time.perf_counter()
        out = run_pipeline(self, *args)
        decodes.append((t0, time.perf_counter()))
        return out

    monkeypatch.setattr(loaders._WatchedEpochIterator, "run_pipeline", timed)
    set_epoch(loader, 0)
    digest = hashlib.sha256()
    turn = loader.turns.held() if loader.turns is not None else contextlib.nullcontext()
    with turn:
        for images, labels in loader:
            t0 = time.perf_counter()
            digest.update(images.numpy().tobytes())
            digest.update(labels.numpy().tobytes())
            time.sleep(step_s)  # a decode thread free to run works during this
            steps.append((t0, time.perf_counter()))
    monkeypatch.undo()
    overlaps = [(a, b) for a in decodes for b in steps if a[0] < b[1] and b[0] < a[1]]
    return digest.hexdigest(), len(decodes), overlaps


def test_turns_decode_only_while_the_consumer_waits_and_change_no_pixel(beton, no_jit, monkeypatch):
    """training.overlap=none: no batch is decoded during the consumer's step, the epoch's pixels
    are those of the loader without turns; without turns the decode thread does overlap it."""
    plain, decoded, overlaps = decode_and_step_spans(train_loader(beton), monkeypatch)
    assert decoded == N // 8 and overlaps  # the control: batches_ahead=2 decodes during steps
    loader = train_loader(beton)
    loader.turns = loaders.Turns()
    digest, decoded, overlaps = decode_and_step_spans(loader, monkeypatch)
    assert digest == plain and decoded == N // 8
    assert overlaps == []


def test_turns_close_mid_epoch_ends_the_waiting_decode_thread(beton, no_jit):
    """The consumer stops while holding its turn: the decode thread, waiting for the turn, ends."""
    loader = train_loader(beton)
    loader.turns = turns = loaders.Turns()
    with turns.held():
        iterator = iter(loader)
        next(iterator)
        assert run_with_timeout(loader.close) is None
        assert not iterator.is_alive()
    stop = threading.Event()
    stop.set()
    assert turns.take(stop)  # free again (a held turn would make take() give up: False)
    turns.give()


def test_decode_thread_runs_torch_on_one_thread_and_leaves_the_consumers_count(beton, no_jit, monkeypatch):
    """ffcv's decode thread must not become a second OpenMP team (loaders.one_torch_thread)."""
    seen = []
    run_pipeline = loaders._WatchedEpochIterator.run_pipeline

    def spy(self, *args):
        seen.append(torch.get_num_threads())
        return run_pipeline(self, *args)

    monkeypatch.setattr(loaders._WatchedEpochIterator, "run_pipeline", spy)
    loader = train_loader(beton)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        epoch_labels(loader)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


@pytest.mark.slow  # a fresh interpreter that imports torch and ffcv
def test_a_fresh_consumer_keeps_its_thread_count_after_an_epoch(beton):
    """torch fixes a thread's count on its first use, from the last count set anywhere; the decode
    thread sets 1, so iterating must fix the consumer's count first. A fresh process: the test
    process's own count was fixed long ago."""
    code = (
        "import torch\n"
        "from fastvit_reduce.data.loaders import create_train_loader\n"
        f"loader = create_train_loader({str(beton)!r}, 8, torch.device('cpu'), res=32, num_workers=2,"
        " in_memory=1, batches_ahead=2, drop_last=True, order='random', aug_repeats=1, seed=0,"
        " distributed=False, rrc_scale=[0.08, 1.0], rrc_ratio=[0.75, 4 / 3], hflip=1)\n"
        "torch.set_num_threads(2)\n"
        "labels = [int(y) for _, ys in loader for y in ys]\n"
        "torch.ones(1 << 20).mul_(2)\n"
        "print(len(labels), torch.get_num_threads())\n")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [str(N // 8 * 8), "2"]


# ----------------------------------------------------------------------------- errors
def run_with_timeout(fn, timeout_s: float = 60.0):
    """``fn()``'s exception (or None), run in a daemon thread: a hang fails, not blocks, pytest."""
    outcome = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 — handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still waiting after {timeout_s} s: the loader hangs"
    return outcome.get("error")


def test_truncated_beton_raises_loader_error(beton, tmp_path, no_jit):
    cut = tmp_path / "cut.beton"
    shutil.copy(beton, cut)
    os.truncate(cut, os.path.getsize(cut) - 100)  # raw mode: the last 100 bytes of the file
    loader = train_loader(str(cut))
    error = run_with_timeout(lambda: epoch_labels(loader))
    assert isinstance(error, LoaderError), error
    assert str(cut) in str(error) and "decode thread failed" in str(error)
    assert not loader.epoch_iterator or not loader.epoch_iterator.is_alive()


def test_poll_hook_stops_a_wait_and_ends_the_thread(beton, no_jit, monkeypatch):
    """A stalled decode (simulated) is interrupted by whatever ``loader.poll`` raises."""
    class Stop(Exception):
        pass

    release, polls = threading.Event(), []
    run_pipeline = loaders._WatchedEpochIterator.run_pipeline

    def stalled(self, *args):
        release.wait(30)  # stands in for a decode that does not finish on its own
        return run_pipeline(self, *args)

    def poll():
        polls.append(1)
        release.set()  # so the thread can finish its batch and see the stop
        raise Stop

    monkeypatch.setattr(loaders._WatchedEpochIterator, "run_pipeline", stalled)
    loader = train_loader(beton)
    loader.poll = poll
    iterator = iter(loader)
    error = run_with_timeout(lambda: next(iterator))
    assert isinstance(error, Stop) and polls == [1]
    assert not iterator.is_alive()  # close() ended the epoch's thread
    loader.close()


def test_argument_errors(beton):
    with pytest.raises(RuntimeError, match="init_process_group"):
        train_loader(beton, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        val_loader(beton, distributed=True)
    with pytest.raises(ValueError, match="crop_pct"):
        val_loader(beton, crop_pct=0.0)
    with pytest.raises(ValueError, match="aug_repeats"):
        train_loader(beton, aug_repeats=0)
    with pytest.raises(ValueError, match="rrc_scale"):
        train_loader(beton, rrc_scale=[0.5, 0.1])
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    with pytest.raises(ConfigError, match=f"data.num_workers={too_many}"):
        train_loader(beton, num_workers=too_many)
    with pytest.raises(ConfigError, match="NUMBA_NUM_THREADS"):
        val_loader(beton, num_workers=too_many)
