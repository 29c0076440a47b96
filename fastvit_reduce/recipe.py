"""The recipe's arithmetic: pure functions of the resolved config (no torch, no ffcv).

Batch plan (per-GPU batch, accumulation, global batch, peak lr), the lr at any point of training,
the resolution schedule, batches per epoch, and the checks of resolutions against the model's
patch size and the stored images. Each is a function of the config and of "where we are", so a
resumed run computes exactly what an unbroken one would.
"""
from __future__ import annotations

import math

import numpy as np

from fastvit_reduce.config import ConfigError


# ----------------------------------------------------------------------------- batch and lr
def batch_plan(cfg: dict, world: int) -> dict:
    """Per-GPU batch, accumulation, global batch and peak lr at ``world`` processes.

    ``ConfigError`` when ``training.global_batch`` is not world x batch_size x an integer; the
    message names the per-GPU batch sizes that would reach it.
    """
    per_gpu, want = cfg["training.batch_size"], cfg["training.global_batch"] or cfg["training.batch_size"] * world
    if want % (per_gpu * world):
        valid = [b for b in range(1, want // world + 1) if want % (b * world) == 0]
        near = sorted(valid, key=lambda b: (abs(b - per_gpu), -b))[:4]
        raise ConfigError(
            f"training.global_batch={want} cannot be reached with training.batch_size={per_gpu} on "
            f"{world} process(es) ({per_gpu} x {world} does not divide {want}); per-GPU sizes that do: "
            f"{', '.join(map(str, sorted(near))) or 'none (global_batch < processes)'}")
    scale = {"none": 1.0, "linear": want / cfg["lr.base_batch"],
             "sqrt": math.sqrt(want / cfg["lr.base_batch"])}[cfg["lr.scale"]]
    return {"world": world, "per_gpu_batch": per_gpu, "accum": want // (per_gpu * world),
            "global_batch": want, "peak_lr": cfg["optim.lr"] * scale}


def lr_at(progress: float, *, peak: float, epochs: int, warmup_epochs: float, warmup_lr: float,
          min_lr: float, schedule: str = "cosine") -> float:
    """Learning rate after ``progress`` epochs (a float: updates count as fractions of an epoch).

    Linear from ``warmup_lr`` to ``peak`` over ``warmup_epochs``, then cosine down to ``min_lr``
    at ``epochs`` (or constant). Why not timm's scheduler object: a pure function of progress
    needs no state of its own to survive a resume.
    """
    if progress < warmup_epochs:
        return warmup_lr + (peak - warmup_lr) * progress / warmup_epochs
    if schedule == "constant" or epochs <= warmup_epochs:
        return peak
    t = min(1.0, (progress - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t))


def lr_of(cfg: dict, peak: float, progress: float) -> float:
    """``lr_at`` with the ``lr.*`` and ``training.epochs`` keys of ``cfg``."""
    return lr_at(progress, peak=peak, epochs=cfg["training.epochs"], warmup_epochs=cfg["lr.warmup_epochs"],
                 warmup_lr=cfg["lr.warmup_lr"], min_lr=cfg["lr.min_lr"], schedule=cfg["lr.schedule"])


# ----------------------------------------------------------------------------- resolutions
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


def train_res(cfg: dict, epoch: int) -> int:
    """Train resolution of ``epoch`` (px) under the ``resolution.*`` schedule."""
    return get_resolution(epoch, cfg["resolution.min_res"], cfg["resolution.max_res"],
                          cfg["resolution.start_ramp"], cfg["resolution.end_ramp"], cfg["resolution.step"])


def val_res(cfg: dict) -> int:
    """Validation resolution (px): ``validation.resolution``, 0 meaning ``model.img_size``."""
    return cfg["validation.resolution"] or cfg["model.img_size"]


def train_resolutions(cfg: dict) -> set[int]:
    """Every train resolution of the ``resolution.*`` schedule over ``training.epochs``."""
    try:
        return {train_res(cfg, e) for e in range(cfg["training.epochs"])}
    except ValueError as e:  # e.g. min_res > max_res; the message names the keys
        raise ConfigError(str(e)) from None


def needs_dynamic_size(cfg: dict) -> bool:
    """True when some train or val resolution differs from ``model.img_size`` (timm then builds
    the ViT with ``dynamic_img_size``, interpolating the position embedding)."""
    img = cfg["model.img_size"]
    return {cfg["resolution.min_res"], cfg["resolution.max_res"], val_res(cfg)} != {img}


def check_resolutions(cfg: dict, patch_size) -> None:
    """``ConfigError`` unless every train resolution and the val resolution is a multiple of the
    model's ``patch_size`` (int or (h, w)). Why: with ``dynamic_img_size`` timm asserts this in the
    forward, so a bad size would crash the run at its first step or first evaluation."""
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),)
    fits = lambda res: all(res % p == 0 for p in patch)  # noqa: E731 — images are square
    bad = [f"train resolution {r} (resolution.min_res/max_res/step)" for r in sorted(train_resolutions(cfg))
           if not fits(r)]
    if not fits(val_res(cfg)):
        bad.append(f"val resolution {val_res(cfg)} (validation.resolution, 0 = model.img_size)")
    if bad:
        raise ConfigError(f"the model's patch size is {'x'.join(map(str, patch))} px, so image sizes "
                          f"must be multiples of it: {', '.join(bad)}")


def resolution_warnings(cfg: dict, crop_pct: float, train_store: dict | None,
                        val_store: dict | None) -> list[str]:
    """Where a stored image is smaller than what the crops need (so crops are upsampled);
    ``*_store``: ``betons.stored_size`` of the two files."""
    out = []
    if val_store:
        need = val_res(cfg) / crop_pct  # timm eval: short side resized to img / crop_pct, then centre crop
        have = val_store["median_short_side"]
        if have < need:
            out.append(f"val images are stored with a median short side of {have:.0f} px; timm's eval "
                       f"transform resizes it to {need:.0f} px, so validation upsamples by "
                       f"{need / have:.2f}x (write the .beton at a larger max resolution)")
    if train_store:
        res = cfg["resolution.max_res"]
        lo, hi = cfg["data.rrc_scale"]
        side = math.sqrt((lo + hi) / 2 * train_store["median_width"] * train_store["median_height"])
        if side < res:
            out.append(f"train crops of mean area {(lo + hi) / 2:.2f} cover ~{side:.0f} px of the median "
                       f"stored image, below the {res} px train resolution: most crops are upsampled")
    return out


# ----------------------------------------------------------------------------- epochs
def repeat_aug_selected(num_samples: int, world: int, repeats: int, selected_round: int = 256) -> int:
    """Samples per rank per epoch under repeated augmentation (timm ``RepeatAugSampler``'s
    arithmetic, ``selected_ratio`` = world size): the epoch keeps the dataset's length, rounded down
    to a multiple of ``selected_round`` when the dataset has at least that many images."""
    padded = math.ceil(num_samples * repeats / world)  # per rank
    if selected_round and num_samples >= selected_round:
        selected = (num_samples // selected_round * selected_round) // world
    else:
        selected = math.ceil(num_samples / world)
    return min(selected, padded)


def batches_per_epoch(cfg: dict, world: int, num_samples: int) -> int:
    """Train micro-batches per process per epoch, as the loader's order will give them."""
    repeats = cfg["augment.aug_repeats"]
    if repeats > 1:
        per_rank = repeat_aug_selected(num_samples, world, repeats)
    else:
        per_rank = math.ceil(num_samples / world)  # ffcv pads like torch's DistributedSampler
    b = cfg["training.batch_size"]
    return per_rank // b if cfg["data.drop_last"] else math.ceil(per_rank / b)
