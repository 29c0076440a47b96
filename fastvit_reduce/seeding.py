"""Counter-based seeds: every random draw of a run is a pure function of integer keys.

    derive(seed, epoch, index)      # the crop and flip of one sample in one epoch
    derive(seed, epoch, step)       # one batch's RandAugment / Mixup / CutMix / erasing draws
    derive(seed, "model", variant)  # one variant's init

Why not one generator that runs through the whole training: its state depends on how many draws
came before, so a resumed run, a different number of decode threads or a different prefetch depth
would see different numbers. A hash of the keys gives each draw the same stream whatever ran
before it (the same idea as JAX's ``fold_in`` and ffcv's ``np.random.seed(index)`` example).
"""
from __future__ import annotations

import zlib

import numpy as np

MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scrambles every bit."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _key(k) -> int:
    if isinstance(k, str):
        return zlib.crc32(k.encode())  # stable across processes, unlike hash()
    return int(k) & MASK64


def derive(*keys) -> int:
    """A 63-bit seed that depends on every key (ints or strings), in order."""
    z = 0
    for k in keys:
        z = _mix(z ^ _key(k))
    return z >> 1  # fits torch.Generator.manual_seed and numpy's SeedSequence


def derive32(*keys) -> int:
    """A 32-bit seed (numba's ``np.random.seed`` takes uint32)."""
    return derive(*keys) & 0xFFFFFFFF


def derive_many(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """``derive32(seed, epoch, i)`` for every ``i`` in ``indices``, vectorised (uint32 array)."""
    base = np.uint64(_mix(_mix(0 ^ _key(seed)) ^ _key(epoch)))
    z = np.asarray(indices, dtype=np.uint64) ^ base
    with np.errstate(over="ignore"):  # why: the mix is arithmetic modulo 2**64
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(1)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
