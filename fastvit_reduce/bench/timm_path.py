"""timm's own data path, for the benchmarks that compare it with ours through the same loop.

``TimmSource`` builds timm's loaders as timm's ``train.py`` builds them (timm 1.0.x defaults, its
prefetcher on unless ``prefetcher=False``): ``create_dataset`` on the ImageFolder, ``create_loader``
with PIL transforms in worker processes (``create_transform``: RandomResizedCrop with
``interpolation='random'``, RandAugment, colour jitter 0.4 which timm itself drops when RandAugment
is on), ``FastCollateMixup`` as the collate function and the prefetcher's normalise +
``RandomErasing`` on the mixed batch (erasing after mixing, as the seed's command does); without
the prefetcher, erasing in the per-image transform and ``Mixup`` on the batch
(``--no-prefetcher``). Repeated augmentation goes through ``RepeatAugSampler``, which timm's
``create_loader`` only builds in distributed mode (and timm's ``train.py`` refuses it below two
processes): with ``augment.aug_repeats`` > 1 the process joins a one-process gloo group, which
gives timm's sampler with one replica, the copies of an image in one batch, as our single-process
order does. Eval: the model's interpolation and ``crop_pct``. ``guard_posterize`` keeps timm's
PIL RandAugment working with Pillow 13.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

def guard_posterize() -> None:
    """Make timm's PIL posterize give its old meaning for ``bits <= 0`` (an all-black image).

    why: with ``rand-m9-mstd0.5-inc1`` the magnitude noise reaches 10 and the increasing
    posterize asks for ``bits=0``; Pillow 13's ``ImageOps.posterize`` raises for that (older
    Pillow returned black), which kills a worker a few batches into an epoch. timm's
    ``AugmentOp`` looks its function up in ``timm.data.auto_augment.NAME_TO_OP`` when it is
    built, so the entries are replaced here, before ``create_transform``.
    """
    from PIL import Image
    from timm.data import auto_augment

    original = auto_augment.posterize
    if getattr(original, "guarded", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)  # all zero = black, as Pillow < 13 gave
        return original(img, bits_to_keep, **kwargs)

    posterize.guarded = True
    auto_augment.posterize = posterize
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize


def _eval_data_config(cfg: dict) -> dict:
    """timm's data config (interpolation, crop_pct, mean, std) of the configured model, from a
    ``meta``-device copy (shapes only: no memory, no init)."""
    import torch
    from timm.data import resolve_data_config

    from fastvit_reduce.models import model_from_cfg

    with torch.device("meta"):
        model = model_from_cfg(cfg)
    return resolve_data_config({}, model=model)


def timm_val_loader(cfg: dict, data_cfg: dict, val_dir: str, workers: int, **common):
    """timm's eval loader on an ImageFolder, as ``train.py`` builds it: PIL, resize the short side
    to ``img / crop_pct`` with the model's interpolation, centre crop (``create_transform``
    ``is_training=False``); ``common``: create_loader's mean, std, device, prefetcher, ..."""
    from timm.data import create_dataset, create_loader

    from fastvit_reduce.recipe import val_res as resolution

    val_res = resolution(cfg)
    val_set = create_dataset("", root=val_dir, split="validation", is_training=False,
                             batch_size=cfg["validation.batch_size"])
    return create_loader(val_set, input_size=(3, val_res, val_res), batch_size=cfg["validation.batch_size"],
                         is_training=False, interpolation=data_cfg["interpolation"], num_workers=workers,
                         crop_pct=cfg["data.crop_pct"] or data_cfg["crop_pct"], **common)


class TimmSource:
    """Train batches from timm's own loaders on an ImageFolder (``data.source.TrainSource``).

    ``epoch(e)`` yields ``(x, target, None)``: ``x`` normalised float32 ``(B, 3, H, W)`` on the
    device; ``target`` ``(B, num_classes)`` soft rows when mixup/cutmix is on (``soft_targets``),
    else int64 labels. ``val()`` yields normalised ``x`` and int64 labels (``has_val``). As a
    trainer source factory: ``functools.partial(TimmSource, train_dir=..., val_dir=...)``.
    """

    can_take_turns = False  # timm's workers decode on their own schedule
    uses_ffcv = False

    def __init__(self, cfg: dict, d, *, mean, std, train_dir: str, val_dir: str | None = None,
                 prefetcher: bool = True, **_trainer_args):
        import torch
        import torch.distributed as dist
        from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader

        from fastvit_reduce.config import ConfigError

        if cfg["resolution.min_res"] != cfg["resolution.max_res"]:
            raise ConfigError("bench e2e: timm's loader has no progressive resizing; set resolution.min_res "
                              f"= resolution.max_res (got {cfg['resolution.min_res']} and {cfg['resolution.max_res']})")
        guard_posterize()
        self.device = torch.device(getattr(d, "device", d))  # a runtime.Dist or a device
        self.prefetcher = prefetcher
        repeats = cfg["augment.aug_repeats"] if cfg["augment.aug_repeats"] > 1 else 0  # timm: 0 = off
        distributed = dist.is_available() and dist.is_initialized()
        if repeats and not distributed:
            # why: timm's create_loader builds RepeatAugSampler only when distributed (it asserts
            # otherwise); a one-process group gives its sampler with one replica
            store = Path(tempfile.mkdtemp(prefix="e2e_gloo_")) / "store"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            distributed = True
        self.distributed = distributed
        data_cfg = _eval_data_config(cfg)
        res = cfg["resolution.max_res"]
        mixup_active = cfg["augment.mixup"] > 0 or cfg["augment.cutmix"] > 0
        mixup_args = dict(mixup_alpha=cfg["augment.mixup"], cutmix_alpha=cfg["augment.cutmix"], cutmix_minmax=None,
                          prob=cfg["augment.mixup_prob"], switch_prob=cfg["augment.mixup_switch_prob"],
                          mode=cfg["augment.mixup_mode"], label_smoothing=cfg["training.label_smoothing"],
                          num_classes=cfg["model.num_classes"])
        self.soft_targets = mixup_active
        collate_fn, self.mixup_fn = None, None
        if mixup_active:  # as train.py: mixup in the collate with the prefetcher, else on the batch
            if prefetcher:
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                self.mixup_fn = Mixup(**mixup_args)
        # worker processes: as many as the FFCV path gets decode threads (0 = this process's cores)
        from fastvit_reduce.runtime import decode_threads
        workers = decode_threads(cfg)
        common = dict(mean=tuple(mean), std=tuple(std), pin_memory=False, img_dtype=torch.float32,
                      device=self.device, distributed=distributed, use_prefetcher=prefetcher)
        self.dataset = create_dataset("", root=train_dir, split="train", is_training=True,
                                      batch_size=cfg["training.batch_size"], seed=cfg["training.seed"])
        # train.py's defaults for what our config does not name: train_crop_mode None, vflip 0,
        # color_jitter 0.4 (off under RandAugment), interpolation 'random', re_split off, worker_seeding 'all'
        self.loader = create_loader(
            self.dataset, input_size=(3, res, res), batch_size=cfg["training.batch_size"], is_training=True,
            no_aug=False, re_prob=cfg["augment.reprob"], re_mode=cfg["augment.remode"],
            re_count=cfg["augment.recount"], re_split=False, scale=tuple(cfg["data.rrc_scale"]),
            ratio=tuple(cfg["data.rrc_ratio"]), hflip=0.5 if cfg["data.hflip"] else 0.0, vflip=0.0,
            color_jitter=0.4, auto_augment=cfg["augment.randaugment"] or None, num_aug_repeats=repeats,
            num_aug_splits=0, interpolation="random", num_workers=workers,
            worker_seeding="all", collate_fn=collate_fn, **common)
        self.val_loader = timm_val_loader(cfg, data_cfg, val_dir, workers, **common) if val_dir else None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def has_val(self) -> bool:
        return self.val_loader is not None

    def epoch(self, epoch: int, skip: int = 0):
        """The batches ``skip``.. of ``epoch`` (train.py: ``sampler.set_epoch`` when distributed;
        skipped batches are still loaded, as timm has no way to jump ahead)."""
        if self.distributed and hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        for i, (x, target) in enumerate(self.loader):
            if i < skip:
                continue
            if not self.prefetcher:
                x, target = x.to(self.device), target.to(self.device)
                if self.mixup_fn is not None:
                    x, target = self.mixup_fn(x, target)
            yield x, target, None

    def val(self):
        """Validation batches (normalised ``x``, int64 labels)."""
        return iter(self.val_loader)

    def take_turns(self) -> None:
        raise NotImplementedError("timm's loaders cannot take turns with the step")

    def set_poll(self, poll) -> None:
        """timm's loader has no wait hook: a stop signal is seen at the next logging point."""

    def decode_failures(self) -> dict:
        """None to report: PIL raises on an image it cannot decode."""
        return {}

    def close(self) -> None:
        """timm's workers end with the loader's iterator."""
