"""The seed's recipe as timm's own ``train.py`` runs it: each piece checked against timm's objects.

* lr: ``recipe.lr_at`` equals timm's ``create_scheduler_v2`` driven the way train.py drives it
  (``step(epoch + 1)`` after each epoch, ``step_update(num_updates)`` after each update), for every
  update of the seed's 300 epochs at 1,251 updates per epoch, per epoch and per update;
* random erasing comes after mixup, as timm's prefetcher path (the seed's) does it;
* ``ema.shared_tensors=per_name`` is timm's ``ModelEmaV3`` (decay**2 on a shared tensor);
* ``--dry-run`` shows the seed's erase order, lr stepping and the lr of epochs 0..6.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.scheduler import create_scheduler_v2

from fastvit_reduce.augment.batch import BatchAugment
from fastvit_reduce.config import load_config, resolved
from fastvit_reduce.recipe import check_schedule, cosine_epochs, lr_at
from fastvit_reduce.settings import SECTIONS

REPO = Path(__file__).resolve().parent.parent
UPDATES_PER_EPOCH = 1251  # ImageNet's 1,281,167 images at the seed's global batch 1024


def seed_config(**changes) -> dict:
    load_config(["--config", str(REPO / "rn_configs" / "baseline.yaml"),
                 *[f"--{k}={v}" for k, v in changes.items()]], SECTIONS)
    return resolved(SECTIONS)


def timm_lrs(cfg: dict, on_updates: bool, per_epoch: int):
    """(epoch, update, lr) of every update, from timm's scheduler driven as train.py drives it."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["optim.lr"])
    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg["lr.schedule"], num_epochs=cfg["training.epochs"], warmup_epochs=cfg["lr.warmup_epochs"],
        warmup_lr=cfg["lr.warmup_lr"], min_lr=cfg["lr.min_lr"], warmup_prefix=bool(cfg["lr.warmup_prefix"]),
        cooldown_epochs=cfg["lr.cooldown_epochs"], cycle_mul=cfg["lr.cycle_mul"], cycle_decay=cfg["lr.cycle_decay"],
        cycle_limit=cfg["lr.cycle_limit"], k_decay=cfg["lr.k_decay"], step_on_epochs=not on_updates,
        updates_per_epoch=per_epoch)
    assert num_epochs == cfg["training.epochs"]  # no cooldown, no prefix: timm trains --epochs
    num_updates = 0
    for epoch in range(num_epochs):
        for u in range(per_epoch):
            yield epoch, u, opt.param_groups[0]["lr"]
            num_updates += 1
            sched.step_update(num_updates=num_updates)
        sched.step(epoch + 1)


@pytest.mark.parametrize("step_on", ["epoch", "update"])
def test_lr_of_every_update_equals_timms_scheduler(step_on):
    cfg = seed_config(**{"lr.step_on": step_on})
    assert cfg["training.epochs"] == 300 and cfg["lr.warmup_epochs"] == 5 and cfg["optim.lr"] == 1e-3
    ours = np.array([lr_at(cfg, 1e-3, e, u, UPDATES_PER_EPOCH) for e in range(300) for u in range(UPDATES_PER_EPOCH)])
    theirs = np.array([lr for _, _, lr in timm_lrs(cfg, step_on == "update", UPDATES_PER_EPOCH)])
    assert len(ours) == len(theirs) == 300 * UPDATES_PER_EPOCH
    assert np.array_equal(ours, theirs), np.flatnonzero(ours != theirs)[:5]


def test_seed_lr_by_epoch_holds_warmup_lr_through_epoch_0():
    cfg = seed_config()
    first = [lr_at(cfg, 1e-3, e, 0, UPDATES_PER_EPOCH) for e in range(7)]
    assert first[0] == 1e-5 and lr_at(cfg, 1e-3, 0, UPDATES_PER_EPOCH - 1, UPDATES_PER_EPOCH) == 1e-5
    assert first[1:5] == pytest.approx([2.08e-4, 4.06e-4, 6.04e-4, 8.02e-4])
    assert first[5:] == pytest.approx([9.99315e-4, 9.99013e-4], rel=1e-5)  # the cosine counts the warm-up


@pytest.mark.parametrize("changes", [{"lr.warmup_prefix": 1, "training.epochs": 12, "lr.warmup_epochs": 2},
                                     {"lr.cooldown_epochs": 3, "training.epochs": 13, "lr.min_lr": 1e-6},
                                     {"lr.cycle_limit": 2, "lr.cycle_mul": 2.0, "training.epochs": 30},
                                     {"lr.cycle_limit": 3, "lr.cycle_decay": 0.5, "training.epochs": 12},
                                     {"lr.k_decay": 2.0, "training.epochs": 10},
                                     {"lr.schedule": "constant", "training.epochs": 10}])
@pytest.mark.parametrize("step_on", ["epoch", "update"])
def test_lr_knobs_follow_timm(changes, step_on):
    cfg = seed_config(**{"lr.step_on": step_on, **changes})
    per_epoch = 7
    # timm's --epochs is the first cosine cycle; ours counts every epoch trained (cycles, cooldown, prefix)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg["lr.schedule"], num_epochs=cosine_epochs(cfg), warmup_epochs=cfg["lr.warmup_epochs"],
        warmup_lr=cfg["lr.warmup_lr"], min_lr=cfg["lr.min_lr"], warmup_prefix=bool(cfg["lr.warmup_prefix"]),
        cooldown_epochs=cfg["lr.cooldown_epochs"], cycle_mul=cfg["lr.cycle_mul"], cycle_decay=cfg["lr.cycle_decay"],
        cycle_limit=cfg["lr.cycle_limit"], k_decay=cfg["lr.k_decay"], step_on_epochs=step_on == "epoch",
        updates_per_epoch=per_epoch)
    if cfg["lr.schedule"] == "cosine":
        assert num_epochs == cfg["training.epochs"]
    n = 0
    for epoch in range(cfg["training.epochs"]):
        for u in range(per_epoch):
            assert lr_at(cfg, 1e-3, epoch, u, per_epoch) == opt.param_groups[0]["lr"], (epoch, u)
            n += 1
            sched.step_update(num_updates=n)
        sched.step(epoch + 1)


def test_a_schedule_without_whole_epochs_is_refused():
    from fastvit_reduce.config import ConfigError
    with pytest.raises(ConfigError, match="first cosine cycle of 0 epochs"):
        check_schedule(seed_config(**{"training.epochs": 5, "lr.cooldown_epochs": 5}))
    with pytest.raises(ConfigError, match=r"first cosine cycle of 3.33333 epochs over lr.cycle_limit=3"):
        check_schedule(seed_config(**{"training.epochs": 10, "lr.cycle_limit": 3}))


# ----------------------------------------------------------------------------- erasing order
def _zero_box(img: torch.Tensor) -> bool:
    """True when ``img``'s exact zeros (in every channel) fill one axis-aligned box of >= 2 % of it."""
    zero = (img == 0).all(0)  # (H, W)
    if zero.sum() < 0.02 * zero.numel():
        return False
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return bool(box.all())


def test_erasing_comes_after_mixup_as_in_timms_prefetcher(tmp_path):
    from PIL import Image
    from timm.data import FastCollateMixup, create_dataset, create_loader

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(20, 235, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / f"c{c}" / f"{i}.png")
    mean = std = (0.5, 0.5, 0.5)
    dataset = create_dataset("", root=str(tmp_path / "train"), split="train", is_training=True)
    torch.manual_seed(0)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=8, is_training=True, use_prefetcher=True,
                           re_prob=1.0, re_mode="const", re_count=1, mean=mean, std=std, num_workers=0,
                           device=torch.device("cpu"), collate_fn=FastCollateMixup(
                               mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0, num_classes=2))
    timm_x, timm_y = next(iter(loader))
    assert (timm_y.max(1).values < 1).any()  # some images really are mixed
    assert all(_zero_box(img) for img in timm_x)  # timm: every erased box intact, i.e. erased after the mix

    images = torch.from_numpy(rng.integers(20, 235, (8, 3, 32, 32), dtype=np.uint8))
    labels = torch.tensor([0, 1] * 4)
    common = dict(mixup=1.0, cutmix=0.0, reprob=1.0, remode="const", label_smoothing=0.0)
    after = BatchAugment(2, mean, std, **common)  # the default order: the seed's
    x, y = after(images, labels, seed=3)
    assert (y.max(1).values < 1).any() and all(_zero_box(img) for img in x)
    before = BatchAugment(2, mean, std, erase_order="before_mix", **common)  # timm's --no-prefetcher
    x, _ = before(images, labels, seed=3)
    assert not all(_zero_box(img) for img in x)  # boxes blended with the partner image


# ----------------------------------------------------------------------------- EMA of shared tensors
@pytest.mark.parametrize("mode, moved", [("once", 0.5), ("per_name", 0.75)])
def test_ema_shared_tensors_once_or_like_timm(mode, moved):
    from fastvit_reduce import create_model
    from fastvit_reduce.ema import ModelEma

    model = create_model("vit_tiny_patch16_224", strategy="grouped", img_size=32, patch_size=8, embed_dim=64,
                         depth=4, num_heads=2, num_classes=4)
    ema = ModelEma(model, decay=0.5, shared_tensors=mode)
    shared, alone = model.blocks[0].mlp.fc1.weight, model.blocks[0].norm1.weight
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        shared.add_(1.0)
        alone.add_(1.0)
    ema.update(model)
    after = ema.module.state_dict()
    assert torch.allclose(after["blocks.0.mlp.fc1.weight"] - before["blocks.0.mlp.fc1.weight"],
                          torch.full_like(shared, moved))  # timm's zip over state_dict: twice, 1 - 0.5**2
    assert torch.allclose(after["blocks.0.norm1.weight"] - before["blocks.0.norm1.weight"], torch.full_like(alone, 0.5))


# ----------------------------------------------------------------------------- the plan
def test_dry_run_shows_the_seeds_erase_order_and_lr_stepping(capsys):
    from fastvit_reduce.train import main

    assert main(["--config", str(REPO / "rn_configs" / "thin.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out.split("plan (JSON):", 1)[1])[0]
    assert plan["erase_order"] == "after_mix" and plan["lr_step_on"] == "epoch"
    cfg = seed_config()
    timm = {e: lr for e, u, lr in timm_lrs(cfg, False, 1) if e < 7}
    assert plan["lr_by_epoch"] == [timm[e] for e in range(7)]
    for word in ("erase_order", "after_mix", "lr_step_on", "lr_by_epoch"):
        assert word in out.split("plan (JSON):")[0]


# ----------------------------------------------------------------------------- the knob table
def _first_value(cell: str):
    """The YAML value of a cell's first `...` span (None when the cell has none)."""
    import yaml
    if "`" not in cell:
        return None
    return yaml.safe_load(cell.split("`")[1])


def knob_table() -> list[dict]:
    """Rows of docs/recipe.md's knob table: flag, seed, key, ours, status, why."""
    text = (REPO / "docs" / "recipe.md").read_text()
    body = text.split("| timm `train.py` |", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines()[2:]:
        if not line.startswith("|"):
            continue
        flag, seed, key, ours, status, why = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append(dict(flag=flag, seed=seed, key=key.strip("`"), ours=ours, status=status, why=why))
    return rows


def _timm_defaults() -> dict:
    """timm train.py flag -> the default of the timm (or torch) function that holds it."""
    import inspect

    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from timm.data.transforms_factory import transforms_imagenet_train
    from timm.utils import ModelEmaV3

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    return {"`--warmup-lr`": default(create_scheduler_v2, "warmup_lr"),
            "`--min-lr`": default(create_scheduler_v2, "min_lr"),
            "`--warmup-prefix`": int(default(create_scheduler_v2, "warmup_prefix")),
            "`--cooldown-epochs`": default(create_scheduler_v2, "cooldown_epochs"),
            "`--lr-cycle-mul`": default(create_scheduler_v2, "cycle_mul"),
            "`--lr-cycle-limit`": default(create_scheduler_v2, "cycle_limit"),
            "`--lr-k-decay`": default(create_scheduler_v2, "k_decay"),
            "`--mixup-prob`": default(Mixup, "prob"), "`--mixup-switch-prob`": default(Mixup, "switch_prob"),
            "`--mixup-mode`": default(Mixup, "mode"), "`--smoothing`": default(Mixup, "label_smoothing"),
            "`--recount`": default(RandomErasing, "min_count"),
            "`--scale`": list(default(RandomResizedCropAndInterpolation, "scale")),
            "`--ratio`": list(default(RandomResizedCropAndInterpolation, "ratio")),
            "`--hflip`": default(transforms_imagenet_train, "hflip"),
            "`--vflip`": default(transforms_imagenet_train, "vflip"),
            "`--opt-eps`": default(torch.optim.AdamW, "eps"), "`--opt-betas`": list(default(torch.optim.AdamW, "betas")),
            "`--model-ema-warmup`": default(ModelEmaV3, "use_warmup")}


def test_the_knob_table_is_our_config_and_timms_defaults():
    cfg = seed_config()
    rows = knob_table()
    assert len(rows) >= 60 and {r["status"] for r in rows} == {"MATCH", "DIFFERS"}
    checked = 0
    for r in rows:
        if r["key"] != "—" and r["ours"]:  # the "ours" column is what rn_configs/base.yaml resolves to
            want = _first_value(r["ours"])
            assert cfg[r["key"]] == pytest.approx(want) if isinstance(want, (int, float, list)) and not \
                isinstance(want, bool) else cfg[r["key"]] == want, r
            checked += 1
        if r["status"] == "DIFFERS":
            assert r["why"], r  # every difference says why
    assert checked >= 45
    defaults = _timm_defaults()
    table = {r["flag"]: r for r in rows}
    for flag, value in defaults.items():
        seed = _first_value(table[flag]["seed"])
        if flag in ("`--hflip`", "`--model-ema-warmup`", "`--vflip`"):
            assert value == {"`--hflip`": 0.5, "`--vflip`": 0.0, "`--model-ema-warmup`": False}[flag], flag
            continue
        same = seed == value if isinstance(value, str) else seed == pytest.approx(value, rel=1e-7)
        assert same, (flag, seed, value)  # a timm default moved: the table (and maybe ours) must follow
    # MATCH rows whose two sides are plain values agree, except where ours spells it another way
    spelled_otherwise = {"`--hflip`", "`--crop-pct`", "`--workers`, `--pin-mem`"}
    for r in rows:
        a, b = _first_value(r["seed"]), _first_value(r["ours"])
        if r["status"] == "MATCH" and r["flag"] not in spelled_otherwise and None not in (a, b):
            assert a == pytest.approx(b) if isinstance(a, (float, list)) else a == b, r
    import timm
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224")
    assert vit.pretrained_cfg["crop_pct"] == 0.9 and tuple(vit.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
