"""The recipe's arithmetic: pure functions of the resolved config (no torch, no ffcv).

Batch plan (per-GPU batch, accumulation, global batch, peak lr), the lr of every update (timm's
scheduler, reproduced as a function),
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


def timm_cosine(t: float, *, base: float, t_initial: float, lr_min: float = 0.0, warmup_t: float = 0,
                warmup_lr_init: float = 0.0, warmup_prefix: bool = False, cycle_mul: float = 1.0,
                cycle_decay: float = 1.0, cycle_limit: int = 1, k_decay: float = 1.0) -> float:
    """timm's ``CosineLRScheduler._get_lr(t)`` for one base lr, with timm's arithmetic step by step
    (so the values are equal to the last bit): linear warm-up from ``warmup_lr_init`` over
    ``warmup_t``, then cosine cycles of length ``t_initial`` (the warm-up counted inside the first
    unless ``warmup_prefix``), ``lr_min`` after ``cycle_limit`` cycles."""
    if t < warmup_t:
        return warmup_lr_init + t * ((base - warmup_lr_init) / warmup_t)
    if warmup_prefix:
        t = t - warmup_t
    if cycle_mul != 1:
        i = math.floor(math.log(1 - t / t_initial * (1 - cycle_mul), cycle_mul))
        t_i = cycle_mul ** i * t_initial
        t_curr = t - (1 - cycle_mul ** i) / (1 - cycle_mul) * t_initial
    else:
        i = t // t_initial
        t_i = t_initial
        t_curr = t - (t_initial * i)
    lr_max = base * cycle_decay ** i
    if i < cycle_limit:
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr ** k_decay / t_i ** k_decay))
    return lr_min


def timm_constant(t: float, *, base: float, warmup_t: float = 0, warmup_lr_init: float = 0.0, **_) -> float:
    """timm's ``sched='constant'`` (a ``StepLRScheduler`` with decay 1): warm-up, then ``base``."""
    if t < warmup_t:
        return warmup_lr_init + t * ((base - warmup_lr_init) / warmup_t)
    return base * 1.0 ** (t // 1)


def cosine_epochs(cfg: dict) -> float:
    """timm's ``--epochs`` for this config: the first cosine cycle's length in epochs.
    ``training.epochs`` counts every epoch trained: the cycles (``lr.cycle_limit``, each
    ``lr.cycle_mul`` times the last), ``lr.cooldown_epochs`` and, with ``lr.warmup_prefix``, the warm-up."""
    warmup = cfg["lr.warmup_epochs"] if cfg["lr.warmup_prefix"] else 0
    span = cfg["training.epochs"] - cfg["lr.cooldown_epochs"] - warmup
    mul, n = cfg["lr.cycle_mul"], cfg["lr.cycle_limit"]
    first = span / (n if mul == 1 else (mul ** n - 1) / (mul - 1))
    return int(first) if first == int(first) else first


def check_schedule(cfg: dict) -> None:
    """``ConfigError`` when the lr schedule leaves no epoch for the cosine, or its first cycle would
    not be a whole number of epochs (timm's ``--epochs`` is an integer)."""
    first = cosine_epochs(cfg)
    if first <= 0 or first != int(first):
        raise ConfigError(f"training.epochs={cfg['training.epochs']} minus lr.cooldown_epochs="
                          f"{cfg['lr.cooldown_epochs']}" + (f" and the prefixed warm-up ({cfg['lr.warmup_epochs']})"
                                                            if cfg["lr.warmup_prefix"] else "")
                          + f" gives a first cosine cycle of {first:g} epochs over lr.cycle_limit="
                          f"{cfg['lr.cycle_limit']} cycles (lr.cycle_mul={cfg['lr.cycle_mul']}); it must be a "
                          "whole number of epochs > 0")


def updates_per_epoch(batches: int, accum: int) -> int:
    """Optimizer updates per epoch: a short last group at the epoch end is an update too (timm)."""
    return (batches + accum - 1) // accum


def lr_at(cfg: dict, peak: float, epoch: int, update: int, per_epoch: int) -> float:
    """The lr of update ``update`` (0-based, within ``epoch``) when an epoch has ``per_epoch`` updates.

    timm's ``train.py`` semantics: the scheduler is ``create_scheduler_v2``'s, stepped once per
    epoch (``lr.step_on=epoch``: the whole epoch at ``f(epoch)``, t in epochs) or after every update
    (``lr.step_on=update``, its ``--sched-on-updates``: update u of the run at ``f(u)``, t in updates).
    ``cosine_epochs`` converts ``training.epochs`` (every epoch trained) into timm's ``--epochs``.
    A pure function of where we are, so a resumed run gets exactly the lr of an unbroken one.
    """
    scale = 1 if cfg["lr.step_on"] == "epoch" else per_epoch
    t = epoch if cfg["lr.step_on"] == "epoch" else epoch * per_epoch + update
    shape = timm_cosine if cfg["lr.schedule"] == "cosine" else timm_constant
    return shape(t, base=peak, t_initial=cosine_epochs(cfg) * scale, lr_min=cfg["lr.min_lr"],
                 warmup_t=cfg["lr.warmup_epochs"] * scale,
                 warmup_lr_init=cfg["lr.warmup_lr"], warmup_prefix=bool(cfg["lr.warmup_prefix"]),
                 cycle_mul=cfg["lr.cycle_mul"], cycle_decay=cfg["lr.cycle_decay"],
                 cycle_limit=cfg["lr.cycle_limit"], k_decay=cfg["lr.k_decay"])


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


def check_determinism(cfg: dict, device_type: str) -> None:
    """``ConfigError`` for ``training.deterministic=1`` on CUDA with a resolution that resamples the
    position embedding: timm resizes it with bicubic interpolation, whose CUDA backward has no
    deterministic kernel (torch would raise at the first backward)."""
    if cfg["training.deterministic"] and device_type == "cuda" and needs_dynamic_size(cfg):
        raise ConfigError(
            "training.deterministic=1 on CUDA cannot train at a resolution other than model.img_size "
            f"({cfg['model.img_size']} px; train {sorted(train_resolutions(cfg))}, val {val_res(cfg)}): timm "
            "resamples the position embedding bicubically, and that backward has no deterministic CUDA "
            "kernel; train at model.img_size only (resolution.min_res = max_res = validation.resolution) "
            "or set training.deterministic=0")


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
