"""Train-time batch augmentation on the device: RandAugment → normalise → Mixup/CutMix → erasing.

The loader hands over uint8 (B, 3, H, W) batches already on the device (ffcv has neither
RandAugment nor a place for per-image PIL work); this module turns them into the model's input
and targets, in the DeiT order timm uses:

1. ``BatchRandAugment`` on the uint8 images (timm's PIL RandAugment semantics, batched);
2. ``normalize`` with the model's mean/std (float32; the cast to the AMP dtype comes last);
3. timm ``Mixup`` (mixup / cutmix, switch prob, mode, label smoothing) → soft targets;
4. timm ``RandomErasing(device=...)`` on the normalised batch (its 'pixel'/'rand' modes draw
   normal noise, which is meant for normalised data).

Odd batches: timm's ``Mixup`` asserts an even batch (it pairs image i with image B-1-i). We mix
the even prefix and give the last image no mixing and its own label-smoothed one-hot target
(timm's ``mixup_target`` with lam = 1), so a short last batch trains instead of crashing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from fastargs import Param, Section
from fastargs.decorators import param
from fastargs.validation import Checker
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from ..config import Choice, Number
from .randaugment import BatchRandAugment, parse_spec


class RandAugmentSpec(Checker):
    """A timm RandAugment spec string (checked by parsing it), or '' for off."""

    def check(self, value):
        value = "" if value is None else str(value).strip()
        if value:
            parse_spec(value)  # raises ValueError naming the bad section
        return value

    def help(self):
        return "a timm RandAugment spec like rand-m9-mstd0.5-inc1, or '' for off"


Section("augment", "on-device batch augmentation (defaults: the DeiT recipe)").params(
    randaugment=Param(RandAugmentSpec(), "timm RandAugment spec; '' = off",
                      default="rand-m9-mstd0.5-inc1"),
    mixup=Param(Number(float, 0), "mixup Beta(alpha, alpha); 0 = off", default=0.8),
    cutmix=Param(Number(float, 0), "cutmix Beta(alpha, alpha); 0 = off", default=1.0),
    mixup_prob=Param(Number(float, 0, 1), "probability of mixing a batch/pair/element",
                     default=1.0),
    mixup_switch_prob=Param(Number(float, 0, 1), "probability of cutmix instead of mixup when "
                            "both are on", default=0.5),
    mixup_mode=Param(Choice("batch", "pair", "elem"), "one lambda per batch, pair or element",
                     default="batch"),
    reprob=Param(Number(float, 0, 1), "random erasing probability per image; 0 = off",
                 default=0.25),
    remode=Param(Choice("pixel", "rand", "const"), "random erasing fill: per-pixel noise, "
                 "per-box colour, or zeros", default="pixel"),
    recount=Param(Number(int, 1), "max erased boxes per image", default=1),
    aug_repeats=Param(Number(int, 1), "repeated augmentation: copies of each image per epoch "
                      "(read by the train loader's order); 1 = off", default=3),
)


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


class BatchAugment:
    """The train batch transform: ``(uint8 images, int64 labels) -> (model input, targets)``.

    ``soft_targets`` is True when mixup or cutmix is on: targets are then (B, num_classes)
    float32 rows summing to 1 (use timm's ``SoftTargetCrossEntropy``); otherwise the labels are
    returned as they are and the trainer applies ``label_smoothing`` in its loss.
    Randomness: torch's global RNG (RandAugment), numpy's (Mixup) and Python's (RandomErasing).
    """

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float], *,
                 randaugment: str = "", mixup: float = 0.0, cutmix: float = 0.0,
                 mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 mixup_mode: str = "batch", label_smoothing: float = 0.1, reprob: float = 0.0,
                 remode: str = "pixel", recount: int = 1, device="cpu",
                 dtype: torch.dtype = torch.float32):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
        if mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup_mode must be batch, pair or elem, got {mixup_mode!r}")
        if remode not in ("pixel", "rand", "const"):
            raise ValueError(f"remode must be pixel, rand or const, got {remode!r}")
        self.num_classes = num_classes
        self.mean, self.std = _channel_stats(mean, "mean"), _channel_stats(std, "std")
        self.dtype, self.label_smoothing = dtype, label_smoothing
        # timm create_transform: RandAugment fills with the dataset mean in 0..255
        fill = tuple(min(255, round(255 * m)) for m in self.mean)
        self.randaugment = BatchRandAugment(randaugment, fill=fill) if randaugment else None
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, mode=mixup_mode,
                               label_smoothing=label_smoothing, num_classes=num_classes)
        self.soft_targets = self.mixup is not None
        self.erasing = None
        if reprob > 0:
            self.erasing = RandomErasing(probability=reprob, mode=remode, max_count=recount,
                                         device=torch.device(device))

    def _mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(x) - len(x) % 2
        parts, targets = [], []
        if even:
            mixed, target = self.mixup(x[:even], labels[:even])  # mixes the view in place
            parts.append(mixed)
            targets.append(target.float())
        if even < len(x):  # the odd one out: unmixed, smoothed one-hot (mixup_target, lam = 1)
            parts.append(x[even:])
            targets.append(mixup_target(labels[even:], self.num_classes, 1.0,
                                        self.label_smoothing).float())
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x, torch.cat(targets)

    def __call__(self, images_uint8: torch.Tensor, labels: torch.Tensor):
        """Augment one batch: images (B, 3, H, W) uint8, labels (B,) int64, on the device.

        Returns ``(x, targets)``: x (B, 3, H, W) normalised, in ``dtype`` and the input's memory
        format; targets (B, num_classes) float32 if ``soft_targets`` else the int64 labels.
        The input tensor is not modified (ffcv reuses its batch buffers).
        """
        if len(images_uint8) != len(labels):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
        if self.randaugment is not None:
            images_uint8 = self.randaugment(images_uint8)
        # why float32 until the end: timm's Mixup computes lambda in x's dtype, and in bf16
        # lam + (1 - lam) != 1, so the soft targets would not sum to 1
        x = normalize(images_uint8, self.mean, self.std, torch.float32)
        targets = labels
        if self.mixup is not None and len(x):
            x, targets = self._mix(x, labels)
        if self.erasing is not None:
            x = self.erasing(x)  # in place, per image, after normalisation
        return x.to(self.dtype), targets

    def __repr__(self) -> str:
        return (f"BatchAugment(randaugment={self.randaugment}, mixup={self.mixup is not None}, "
                f"erasing={self.erasing}, dtype={self.dtype})")


@param("augment.randaugment")
@param("augment.mixup")
@param("augment.cutmix")
@param("augment.mixup_prob")
@param("augment.mixup_switch_prob")
@param("augment.mixup_mode")
@param("augment.reprob")
@param("augment.remode")
@param("augment.recount")
def augment_from_config(num_classes: int, mean, std, label_smoothing: float, device,
                        dtype: torch.dtype = torch.float32, **augment) -> BatchAugment:
    """``BatchAugment`` from the current config's ``augment`` section (keys may be overridden)."""
    return BatchAugment(num_classes, mean, std, label_smoothing=label_smoothing, device=device,
                        dtype=dtype, **augment)
