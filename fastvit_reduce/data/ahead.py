"""Helper threads that prepare batches beside the model step, and the queue hand-off they share.

* ``Ahead`` runs an iterator one item ahead in a thread (the trainer's batch-ahead thread:
  batch i+1 is augmented while step i computes; torch ops release the GIL).
* ``InPlace`` is the same interface without a thread (``training.overlap=decode|none``).
* ``put_until`` / ``get_polling``: the bounded-queue hand-off of ``Ahead`` and of the loaders'
  decode thread (``loaders._WatchedEpochIterator``): the producer gives up when told to stop,
  the consumer never waits blind (a ``poll`` callable runs while it waits and may raise).
* ``one_torch_thread``: a helper thread's torch ops run on one intra-op thread.
* ``on_stream`` / ``hand_over``: a batch prepared on a CUDA side stream reaches the consumer's
  stream through an event, never through the host.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable

import torch

POLL_S = 0.5  # s between checks of a producer (and calls of poll) while a consumer waits


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
    decode thread (idle after one batch) existed (docs/results/speed.md)."""
    torch.set_num_threads(1)


def on_stream(stream):
    """``torch.cuda.stream(stream)``, or nothing for None (the CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def hand_over(x: torch.Tensor, y: torch.Tensor, ready) -> None:
    """The consumer's side of a batch made on another stream: its stream waits for ``ready`` (an
    event, not the host) and the allocator keeps the batch until this stream is done with it."""
    if ready is None:
        return
    stream = torch.cuda.current_stream(x.device)
    stream.wait_event(ready)
    for t in (x, y):  # allocated on the side stream, used on this one
        t.record_stream(stream)


def put_until(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into the bounded queue ``q``, waiting for room; False once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def get_polling(q: queue.Queue, poll: Callable[[], None]):
    """The next item of ``q``; ``poll()`` runs every ``POLL_S`` while it waits (and may raise)."""
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            poll()


class Ahead:
    """Runs ``make()``'s iterator one item ahead in a thread. Items and exceptions arrive in order;
    ``poll`` is called every ``POLL_S`` while the consumer waits (it may raise to stop the wait)."""

    _DONE = object()

    def __init__(self, make, poll=None):
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.poll = poll or (lambda: None)
        torch.get_num_threads()  # fixes this thread's count before the helper sets 1 (one_torch_thread)
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="batch-ahead")
        self.thread.start()

    def _run(self, make):
        one_torch_thread()  # the step's OpenMP team stays the only one
        try:
            for item in make():
                if not put_until(self.q, (True, item), self.stopped):
                    return
            put_until(self.q, (True, self._DONE), self.stopped)
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            put_until(self.q, (False, e), self.stopped)

    def __iter__(self):
        return self

    def __next__(self):
        ok, item = get_polling(self.q, self.poll)
        if not ok:
            raise item
        if item is self._DONE:
            raise StopIteration
        return item

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=10)


class InPlace:
    """``Ahead``'s interface without the thread (``training.overlap=decode`` or ``none``)."""

    def __init__(self, iterator):
        self.it = iter(iterator)

    def __next__(self):
        return next(self.it)

    def close(self):
        close = getattr(self.it, "close", None)
        if close:
            close()
