"""Train-time batch augmentation on the device: RandAugment → normalise → Mixup/CutMix → erasing.

The loader hands over uint8 (B, 3, H, W) batches already on the device (ffcv has neither
RandAugment nor a place for per-image PIL work); this module turns them into the model's input
and targets in the order of timm's ``train.py`` with its default prefetcher, which is what the
seed's command runs: ``FastCollateMixup`` mixes the batch in the collate function, then
``PrefetchLoader`` normalises it and applies ``RandomErasing`` to the mixed batch:

1. ``BatchRandAugment`` on the uint8 images (timm's PIL RandAugment semantics, batched);
2. ``normalize`` with the model's mean/std (float32; the cast to the AMP dtype comes last);
3. ``SeededMixup``: timm ``Mixup`` (mixup / cutmix, switch prob, mode, label smoothing) → soft
   targets;
4. ``BatchRandomErasing``: timm's ``RandomErasing`` per image on the normalised, mixed batch (its
   'pixel'/'rand' modes draw normal noise, which is meant for normalised data), so an erased box
   is noise in the mixed image (``augment.erase_order=after_mix``, the default).
   ``erase_order=before_mix`` erases each image before mixing instead, as timm does with
   ``--no-prefetcher`` (erasing in the per-image transform, ``Mixup`` in the train loop).

Randomness: every call is a pure function of its integer ``seed`` (the trainer passes
``seeding.derive(seed, epoch, step)``). RandAugment and erasing draw on the batch's device from a
``torch.Generator`` seeded with it; Mixup/CutMix draw their few host scalars from
``np.random.default_rng(seed)``. Nothing touches Python's ``random``, numpy's global state or
torch's global generator (the trainer draws drop-path masks from that one in another thread), and
no device value is read by the host. The same seed gives bit-identical output on the CPU.

Odd batches: timm's ``Mixup`` asserts an even batch (it pairs image i with image B-1-i). We mix
the even prefix and give the last image no mixing and its own label-smoothed one-hot target
(timm's ``mixup_target`` with lam = 1), so a short last batch trains instead of crashing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from .randaugment import BatchRandAugment


def _channel_stats(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (RGB, in 0..1 like timm's cfg), got {values}")
    return values


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x / 255 - mean) / std for a (B, 3, H, W) uint8 (or float 0..255) batch, cast to ``dtype``.

    ``mean``/``std`` are per channel in 0..1, as in timm's pretrained cfg. The arithmetic is in
    float32 and the result keeps the input's device and memory format.
    """
    mean, std = _channel_stats(mean, "mean"), _channel_stats(std, "std")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) images, got {tuple(images_uint8.shape)}")
    kw = dict(device=images_uint8.device, dtype=torch.float32)
    mean_t = torch.tensor(mean, **kw).view(1, 3, 1, 1) * 255  # in 0..255 grey levels
    std_t = torch.tensor(std, **kw).view(1, 3, 1, 1) * 255
    return ((images_uint8.float() - mean_t) / std_t).to(dtype)


class SeededMixup(Mixup):
    """timm's ``Mixup`` with every draw from a ``np.random.Generator`` passed in.

    Why not timm's ``__call__``: it draws from numpy's global RNG, which the trainer's threads
    share. The draws keep timm's semantics (``_params_per_batch``/``_params_per_elem``,
    ``rand_bbox`` + ``correct_lam``, ``mixup_target``); the mixing of 'elem' and 'pair' modes is
    vectorised on the device instead of timm's Python loop over images, with the per-image
    parameters sent in one copy (non-blocking, from pinned memory on CUDA).
    """

    def draw_batch(self, rng: np.random.Generator) -> tuple[float, bool]:
        """timm ``_params_per_batch``: (lam, use_cutmix) for the whole batch."""
        lam, use_cutmix = 1.0, False
        if self.mixup_enabled and rng.random() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(rng.random() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(rng.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                use_cutmix, lam = True, float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        return lam, use_cutmix

    def draw_elem(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """timm ``_params_per_elem``: lam (n,) float32 and use_cutmix (n,) bool."""
        lam, use_cutmix = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = rng.random(n) < self.switch_prob
                lam_mix = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, n),
                                   rng.beta(self.mixup_alpha, self.mixup_alpha, n))
            elif self.mixup_alpha > 0:
                lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, n)
            else:
                use_cutmix = np.ones(n, dtype=bool)
                lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n)
            lam = np.where(rng.random(n) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    @staticmethod
    def draw_box(rng: np.random.Generator, h: int, w: int, lam):
        """timm ``rand_bbox`` (margin 0) then ``correct_lam``: (yl, yh, xl, xh), lam for each lam
        (scalar or array); lam becomes 1 - box area / image area."""
        ratio = np.sqrt(1 - np.asarray(lam, dtype=np.float64))
        cut_h, cut_w = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
        cy, cx = rng.integers(0, h, size=ratio.shape), rng.integers(0, w, size=ratio.shape)
        yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
        xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
        return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(h * w)

    def mix(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        """Mix an even float batch ``x`` (B, 3, H, W); returns (mixed x, (B, C) soft targets)."""
        if len(x) % 2:
            raise ValueError(f"mixup pairs image i with image B-1-i: batch {len(x)} is odd")
        h, w = x.shape[-2:]
        if self.mode == "batch":
            lam, use_cutmix = self.draw_batch(rng)
            if lam != 1.0 and use_cutmix:  # host scalars: no device value is read
                (yl, yh, xl, xh), lam = self.draw_box(rng, h, w, lam)
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            elif lam != 1.0:
                x = x.mul(lam).add_(x.flip(0).mul_(1.0 - lam))  # timm's order of operations
            return x, mixup_target(labels, self.num_classes, float(lam), self.label_smoothing)
        b = len(x)
        n = b // 2 if self.mode == "pair" else b
        lam, use_cutmix = self.draw_elem(rng, n)
        cut = use_cutmix & (lam != 1)
        box = np.zeros((4, n), dtype=np.int64)
        if cut.any():
            box_cut, lam_cut = self.draw_box(rng, h, w, lam[cut])
            box[:, cut] = np.stack(box_cut)
            lam[cut] = lam_cut
        if self.mode == "pair":  # image B-1-i uses image i's parameters (timm _mix_pair)
            lam, cut, box = (np.concatenate((a, a[..., ::-1]), axis=-1) for a in (lam, cut, box))
        # one (B, 6) upload: lam, cut, yl, yh, xl, xh
        params = torch.from_numpy(np.concatenate(([lam], [cut], box)).T.astype(np.float32))
        if x.is_cuda:
            params = params.pin_memory()
        params = params.to(x.device, non_blocking=True)
        lam_t, cut_t = params[:, 0].view(b, 1, 1, 1), params[:, 1].view(b, 1, 1, 1) > 0
        rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, 1, w)
        yl, yh, xl, xh = (params[:, k].view(b, 1, 1, 1) for k in range(2, 6))
        inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # (B, 1, H, W)
        flipped = x.flip(0)
        mixed = x * lam_t + flipped * (1 - lam_t)  # lam 1: x exactly
        x = torch.where(cut_t & inside, flipped, torch.where(cut_t, x, mixed))
        return x, mixup_target(labels, self.num_classes, params[:, :1], self.label_smoothing)


class BatchRandomErasing:
    """timm's ``RandomErasing`` on a normalised (B, C, H, W) batch, per image, with every draw made
    on the batch's device from a ``torch.Generator`` (why not timm's: it draws from Python's
    global ``random``, one image at a time).

    Same semantics: each image is erased with ``probability``; it gets ``count`` boxes (uniform
    in [min_count, max_count]), each of area uniform in [min_area, max_area] of the image divided
    by ``count`` and aspect ratio exp(uniform(log 0.3, log 1/0.3)), with up to 10 attempts for
    a box that fits; the box is filled with per-pixel normal noise ('pixel'), one normal colour
    per channel ('rand') or 0 ('const'). All 10 attempts are drawn and the first that fits is
    kept, which is the distribution of timm's loop.
    """

    ATTEMPTS = 10  # timm's tries per box

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, mode: str = "const",
                 min_count: int = 1, max_count: int | None = None):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"erasing mode must be pixel, rand or const, got {mode!r}")
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.mode, self.min_count, self.max_count = mode, min_count, max_count or min_count

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Return a new (B, C, H, W) tensor with the boxes erased; ``x`` is not modified."""
        b, c, h, w = x.shape
        f64 = dict(generator=generator, device=x.device, dtype=torch.float64)
        erase = torch.rand(b, **f64) <= self.probability  # timm: skip if random() > p
        k = self.max_count
        if self.min_count == self.max_count:
            count = torch.full((b, 1), float(k), dtype=torch.float64, device=x.device)
        else:
            count = torch.randint(self.min_count, k + 1, (b, 1), generator=generator,
                                  device=x.device).double()
        shape = (b, k, self.ATTEMPTS)
        area = (self.min_area + (self.max_area - self.min_area) * torch.rand(shape, **f64)) \
            * (h * w) / count.unsqueeze(-1)
        lo, hi = self.log_aspect_ratio
        aspect = torch.exp(lo + (hi - lo) * torch.rand(shape, **f64))
        bh = torch.sqrt(area * aspect).round()  # python round() and torch: half to even
        bw = torch.sqrt(area / aspect).round()
        fits = (bw < w) & (bh < h)
        first = fits.int().argmax(-1, keepdim=True)  # the first attempt that fits
        bh, bw = bh.gather(-1, first).squeeze(-1), bw.gather(-1, first).squeeze(-1)  # (b, k)
        top = torch.floor(torch.rand((b, k), **f64) * (h - bh + 1))  # randint(0, h - bh)
        left = torch.floor(torch.rand((b, k), **f64) * (w - bw + 1))
        slots = torch.arange(k, device=x.device).view(1, k)
        active = erase.view(b, 1) & fits.any(-1) & (slots < count)  # (b, k)
        rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
        for s in range(k):
            t, l_ = top[:, s].view(b, 1, 1), left[:, s].view(b, 1, 1)
            box = (rows >= t) & (rows < t + bh[:, s].view(b, 1, 1)) \
                & (cols >= l_) & (cols < l_ + bw[:, s].view(b, 1, 1))
            box = (box & active[:, s].view(b, 1, 1)).unsqueeze(1)  # (b, 1, H, W)
            if self.mode == "pixel":
                fill = torch.empty_like(x).normal_(generator=generator)
            elif self.mode == "rand":
                fill = torch.empty((b, c, 1, 1), dtype=x.dtype, device=x.device).normal_(
                    generator=generator)
            else:
                fill = torch.zeros((), dtype=x.dtype, device=x.device)
            x = torch.where(box, fill, x)
        return x

    def __repr__(self) -> str:
        return (f"BatchRandomErasing(p={self.probability}, mode={self.mode}, "
                f"count={self.min_count}..{self.max_count})")


class BatchAugment:
    """The train batch transform: ``(uint8 images, int64 labels, seed) -> (model input, targets)``.

    ``soft_targets`` is True when mixup or cutmix is on: targets are then (B, num_classes)
    float32 rows summing to 1 (use timm's ``SoftTargetCrossEntropy``); otherwise the labels are
    returned as they are and the trainer applies ``label_smoothing`` in its loss.
    Randomness: only from the ``seed`` of each call (see the module docstring); one instance may
    be called from several threads at once.
    """

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float], *,
                 randaugment: str = "", mixup: float = 0.0, cutmix: float = 0.0,
                 mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 mixup_mode: str = "batch", label_smoothing: float = 0.1, reprob: float = 0.0,
                 remode: str = "pixel", recount: int = 1, erase_order: str = "after_mix",
                 device="cpu",
                 dtype: torch.dtype = torch.float32):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
        if mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup_mode must be batch, pair or elem, got {mixup_mode!r}")
        if remode not in ("pixel", "rand", "const"):
            raise ValueError(f"remode must be pixel, rand or const, got {remode!r}")
        if erase_order not in ("before_mix", "after_mix"):
            raise ValueError(f"erase_order must be before_mix or after_mix, got {erase_order!r}")
        self.erase_after_mix = erase_order == "after_mix"
        self.num_classes = num_classes
        self.mean, self.std = _channel_stats(mean, "mean"), _channel_stats(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        self.device = torch.device(device)
        self.dtype, self.label_smoothing = dtype, label_smoothing
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # timm create_transform: RandAugment fills with the dataset mean in 0..255
        fill = tuple(min(255, round(255 * m)) for m in self.mean)
        self.randaugment = BatchRandAugment(randaugment, fill=fill) if randaugment else None
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = SeededMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                     switch_prob=mixup_switch_prob, mode=mixup_mode,
                                     label_smoothing=label_smoothing, num_classes=num_classes)
        self.soft_targets = self.mixup is not None
        self.erasing = None
        if reprob > 0:
            self.erasing = BatchRandomErasing(probability=reprob, mode=remode, max_count=recount)

    def _mix(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        even = len(x) - len(x) % 2
        if even == len(x):
            return self.mixup.mix(x, labels, rng)
        parts, targets = [], []
        if even:
            mixed, target = self.mixup.mix(x[:even], labels[:even], rng)
            parts.append(mixed)
            targets.append(target)
        # the odd one out: unmixed, smoothed one-hot (mixup_target, lam = 1)
        parts.append(x[even:])
        targets.append(mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing))
        return torch.cat(parts), torch.cat(targets)

    def __call__(self, images_uint8: torch.Tensor, labels: torch.Tensor, *, seed: int):
        """Augment one batch: images (B, 3, H, W) uint8, labels (B,) int64, on the device.

        ``seed``: a non-negative int below 2**63, e.g. ``seeding.derive(seed, epoch, step)``;
        the output is a pure function of (images, labels, seed).
        Returns ``(x, targets)``: x (B, 3, H, W) normalised, in ``dtype`` and the input's memory
        format; targets (B, num_classes) float32 if ``soft_targets`` else the int64 labels.
        The input tensor is not modified (ffcv reuses its batch buffers).
        """
        if len(images_uint8) != len(labels):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        generator = torch.Generator(images_uint8.device).manual_seed(int(seed))
        if self.randaugment is not None:
            images_uint8 = self.randaugment(images_uint8, generator)
        # why float32 until the end: lambda is applied in x's dtype, and in bf16
        # lam + (1 - lam) != 1, so the soft targets would not sum to 1
        mean_t, std_t = self._stats(images_uint8.device)
        x = (images_uint8.float() - mean_t) / std_t  # as normalize(), with cached constants
        if self.erasing is not None and not self.erase_after_mix:
            x = self.erasing(x, generator)  # per image, before mixing (timm's --no-prefetcher order)
        targets = labels
        if self.mixup is not None and len(x):
            x, targets = self._mix(x, labels, np.random.default_rng(int(seed)))
        if self.erasing is not None and self.erase_after_mix:
            x = self.erasing(x, generator)
        return x.to(self.dtype), targets

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) float32 in grey levels on ``device``, built once per
        device (why: ``torch.tensor(list, device=cuda)`` per batch is a blocking copy)."""
        stats = self._stats_on.get(device)
        if stats is None:  # a race between two threads only builds the same tensors twice
            kw = dict(device=device, dtype=torch.float32)
            stats = self._stats_on[device] = (torch.tensor(self.mean, **kw).view(1, 3, 1, 1) * 255,
                                              torch.tensor(self.std, **kw).view(1, 3, 1, 1) * 255)
        return stats

    def __repr__(self) -> str:
        return (f"BatchAugment(randaugment={self.randaugment}, mixup={self.mixup is not None}, "
                f"erasing={self.erasing}, dtype={self.dtype})")


AUGMENT_KEYS = ("randaugment", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode",
                "reprob", "remode", "recount", "erase_order")  # the augment.* keys BatchAugment reads


def augment_from_cfg(cfg: dict, num_classes: int, mean, std, label_smoothing: float, device,
                     dtype: torch.dtype = torch.float32) -> BatchAugment:
    """``BatchAugment`` from a flat resolved config dict (``{"augment.mixup": 0.8, ...}``, as
    ``config.resolved()`` returns and a run folder saves). Raises KeyError naming a missing key."""
    missing = [f"augment.{k}" for k in AUGMENT_KEYS if f"augment.{k}" not in cfg]
    if missing:
        raise KeyError(f"config lacks {', '.join(missing)}")
    return BatchAugment(num_classes, mean, std, label_smoothing=label_smoothing, device=device,
                        dtype=dtype, **{k: cfg[f"augment.{k}"] for k in AUGMENT_KEYS})
