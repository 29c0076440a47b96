"""bench parity: the recipe as timm train.py's flags, the timm data path (b) against what train.py
builds from those flags, and the whole bench on a tiny sample folder (with a stand-in for timm's
train.py, which the suite does not have).

train.py is in no timm wheel: these tests parse the flags with a stand-in of its argparse (the flags
and defaults of timm v1.0.22's train.py, the seed's). With ``FASTVIT_REDUCE_TIMM_TRAIN=PATH/train.py``
they use that file's own parser instead, and check the stand-in's defaults against it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import sample_photos

from fastvit_reduce.bench.parity import (
    OURS,
    OURS_TIMM_DATA,
    TIMM,
    TIMM_FLAG,
    format_report,
    main,
    resolve,
    scores,
    summary,
    timm_flags,
)
from fastvit_reduce.config import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 3, 8, 4, 8
# the parity recipe on timm's test_vit at 32 px (8 px patches), batch 8: seconds per epoch
TINY = {"model.arch": "test_vit", "model.img_size": 32, "model.patch_size": 8, "resolution.min_res": 32,
        "resolution.max_res": 32, "resolution.step": 8, "training.batch_size": BATCH,
        "training.global_batch": BATCH, "validation.batch_size": 12, "model.num_classes": CLASSES}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sample_photos(tmp_path_factory.mktemp("parity"), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS)


def recipe(**changes) -> dict:
    """rn_configs/parity.yaml resolved, on the tiny model, with ``changes`` (dotted keys)."""
    return resolve(["--config", str(REPO / "rn_configs" / "parity.yaml"),
                    *[f"--{k}={v}" for k, v in {**TINY, **changes}.items()]])


# ----------------------------------------------------------------------------- train.py's parser
def stand_in_parser() -> argparse.ArgumentParser:
    """The flags of timm v1.0.22's train.py that timm_flags writes or its loader reads, with its defaults."""
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser()
    for flags, kw in [
        (["--model"], dict(default="resnet50")), (["--img-size"], dict(type=int)),
        (["--model-kwargs"], dict(nargs="*", default={}, action=ParseKwargs)), (["--num-classes"], dict(type=int)),
        (["--drop-path"], dict(type=float)), (["--initial-checkpoint"], dict(default="")),
        (["--seed"], dict(type=int, default=42)), (["-b", "--batch-size"], dict(type=int, default=128)),
        (["-vb", "--validation-batch-size"], dict(type=int)), (["--grad-accum-steps"], dict(type=int, default=1)),
        (["--epochs"], dict(type=int, default=300)), (["--opt"], dict(default="sgd")), (["--lr"], dict(type=float)),
        (["--weight-decay"], dict(type=float, default=2e-5)), (["--opt-eps"], dict(type=float)),
        (["--opt-betas"], dict(type=float, nargs="+")), (["--clip-grad"], dict(type=float)),
        (["--sched"], dict(default="cosine")), (["--sched-on-updates"], dict(action="store_true")),
        (["--warmup-epochs"], dict(type=int, default=5)), (["--warmup-lr"], dict(type=float, default=1e-5)),
        (["--min-lr"], dict(type=float, default=0)), (["--warmup-prefix"], dict(action="store_true")),
        (["--cooldown-epochs"], dict(type=int, default=0)), (["--lr-cycle-mul"], dict(type=float, default=1.0)),
        (["--lr-cycle-decay"], dict(type=float, default=0.5)), (["--lr-cycle-limit"], dict(type=int, default=1)),
        (["--lr-k-decay"], dict(type=float, default=1.0)), (["--model-ema"], dict(action="store_true")),
        (["--model-ema-decay"], dict(type=float, default=0.9998)), (["--aa"], dict()),
        (["--aug-repeats"], dict(type=float, default=0)),
        (["--scale"], dict(type=float, nargs="+", default=[0.08, 1.0])),
        (["--ratio"], dict(type=float, nargs="+", default=[3. / 4., 4. / 3.])),
        (["--hflip"], dict(type=float, default=0.5)), (["--vflip"], dict(type=float, default=0.)),
        (["--color-jitter"], dict(type=float, default=0.4)), (["--color-jitter-prob"], dict(type=float)),
        (["--grayscale-prob"], dict(type=float)), (["--gaussian-blur-prob"], dict(type=float)),
        (["--train-interpolation"], dict(default="random")), (["--mixup"], dict(type=float, default=0.0)),
        (["--cutmix"], dict(type=float, default=0.0)), (["--cutmix-minmax"], dict(type=float, nargs="+")),
        (["--mixup-prob"], dict(type=float, default=1.0)), (["--mixup-switch-prob"], dict(type=float, default=0.5)),
        (["--mixup-mode"], dict(default="batch")), (["--smoothing"], dict(type=float, default=0.1)),
        (["--reprob"], dict(type=float, default=0.)), (["--remode"], dict(default="pixel")),
        (["--recount"], dict(type=int, default=1)), (["--resplit"], dict(action="store_true")),
        (["--no-prefetcher"], dict(action="store_true")), (["--crop-pct"], dict(type=float)),
        (["--amp"], dict(action="store_true")), (["--amp-dtype"], dict(default="float16")),
        (["--channels-last"], dict(action="store_true")),
        (["--torchcompile"], dict(nargs="?", const="inductor")), (["--device"], dict(default="cuda")),
        (["-j", "--workers"], dict(type=int, default=4)), (["--pin-mem"], dict(action="store_true")),
        (["--train-crop-mode"], dict()), (["--no-aug"], dict(action="store_true")),
        (["--worker-seeding"], dict(default="all")), (["--use-multi-epochs-loader"], dict(action="store_true")),
    ]:
        p.add_argument(*flags, **kw)
    return p


def train_py_parser() -> argparse.ArgumentParser:
    """train.py's own parser when ``FASTVIT_REDUCE_TIMM_TRAIN`` names a checkout, else the stand-in."""
    path = os.environ.get("FASTVIT_REDUCE_TIMM_TRAIN")
    return runpy.run_path(path, run_name="timm_train_py")["parser"] if path else stand_in_parser()


@pytest.mark.skipif(not os.environ.get("FASTVIT_REDUCE_TIMM_TRAIN"), reason="FASTVIT_REDUCE_TIMM_TRAIN not set")
def test_stand_in_parser_has_train_pys_defaults():
    real, mine = train_py_parser(), stand_in_parser()
    for action in mine._actions[1:]:
        assert real.get_default(action.dest) == action.default, action.dest


# ----------------------------------------------------------------------------- the flags
def test_timm_flags_follow_the_recipe_table():
    """Every row of docs/recipe.md that names a train.py flag and our key: timm_flags writes that flag."""
    rows = 0
    for line in (REPO / "docs" / "recipe.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 5 or not cells[2].startswith("`"):
            continue
        flags, key = re.findall(r"`(--[a-z0-9-]+)`", cells[0]), cells[2].strip("`")
        if flags and "." in key:
            rows += 1
            assert TIMM_FLAG.get(key) in flags, f"docs/recipe.md: {key} is {flags}; bench parity: {TIMM_FLAG.get(key)}"
    assert rows >= 40


@pytest.mark.parametrize("changes", [
    {},  # the parity recipe: per-epoch lr, prefetcher (erasing after the mix), EMA
    {"lr.step_on": "update", "training.amp": "fp16", "augment.erase_order": "before_mix", "training.clip_grad": 1.0,
     "ema.decay": 0.0, "training.global_batch": 2 * BATCH, "data.crop_pct": 0.875, "augment.randaugment": "",
     "lr.cooldown_epochs": 2, "training.epochs": 14, "data.hflip": 0, "optim.betas": [0.8, 0.99]},
])
def test_timm_flags_give_train_py_the_recipe(changes):
    cfg = recipe(**changes)
    args = train_py_parser().parse_args(timm_flags(cfg, "cpu", 3))
    expected = {
        "model": cfg["model.arch"], "img_size": 32, "model_kwargs": {"img_size": 32, "patch_size": 8},
        "num_classes": CLASSES, "drop_path": cfg["model.drop_path"], "seed": cfg["training.seed"],
        "batch_size": BATCH, "grad_accum_steps": cfg["training.global_batch"] // BATCH,
        "validation_batch_size": cfg["validation.batch_size"], "opt": "adamw", "lr": cfg["optim.lr"],
        "weight_decay": cfg["optim.weight_decay"], "opt_eps": cfg["optim.eps"], "opt_betas": cfg["optim.betas"],
        "clip_grad": cfg["training.clip_grad"] or None, "sched": "cosine",
        "sched_on_updates": cfg["lr.step_on"] == "update", "warmup_epochs": 1, "warmup_lr": cfg["lr.warmup_lr"],
        "min_lr": cfg["lr.min_lr"], "cooldown_epochs": cfg["lr.cooldown_epochs"],
        "epochs": cfg["training.epochs"] - cfg["lr.cooldown_epochs"],  # timm adds the cooldown itself
        "model_ema": cfg["ema.decay"] > 0, "aa": cfg["augment.randaugment"] or None,
        "scale": cfg["data.rrc_scale"], "ratio": cfg["data.rrc_ratio"], "hflip": 0.5 if cfg["data.hflip"] else 0.0,
        "train_interpolation": "random", "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
        "mixup_mode": "batch", "smoothing": 0.1, "reprob": 0.25, "remode": "pixel", "recount": 1,
        "no_prefetcher": cfg["augment.erase_order"] == "before_mix", "crop_pct": cfg["data.crop_pct"] or None,
        "amp": cfg["training.amp"] != "off", "device": "cpu", "workers": 3, "aug_repeats": 0,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    if cfg["ema.decay"]:
        assert args.model_ema_decay == cfg["ema.decay"]
    if args.amp:
        assert args.amp_dtype == "float16"
    # timm's scheduler trains training.epochs with these flags (its num_epochs adds the cooldown)
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    _, num_epochs = create_scheduler_v2(opt, sched=args.sched, num_epochs=args.epochs,
                                        warmup_epochs=args.warmup_epochs, cooldown_epochs=args.cooldown_epochs,
                                        step_on_epochs=not args.sched_on_updates, updates_per_epoch=10)
    assert num_epochs == cfg["training.epochs"]


@pytest.mark.parametrize("changes,message", [
    ({"augment.aug_repeats": 3}, "refuses --aug-repeats in one process"),
    ({"reduction.strategy": "thin"}, "no MLP reductions"),
    ({"resolution.min_res": 16}, "no progressive resizing"),
    ({"validation.every_n_epochs": 2}, "after every epoch"),
    ({"lr.warmup_epochs": 0.5}, "--warmup-epochs is an integer"),
])
def test_what_timm_cannot_express_is_refused(changes, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        timm_flags(recipe(**changes), "cpu", 1)


# ----------------------------------------------------------------------------- path (b) vs train.py
def train_py_loaders(args, train_dir: Path, val_dir: Path):
    """timm's loaders exactly as v1.0.22's train.py builds them from ``args`` (its lines 536, 683-697,
    700-714, 718-757, 762-843, 846-876), in one process on the CPU; and the data config."""
    import timm
    from timm.data import (
        FastCollateMixup,
        create_dataset,
        create_loader,
        resolve_data_config,
    )
    with torch.device("meta"):
        model = timm.create_model(args.model, num_classes=args.num_classes, drop_path_rate=args.drop_path,
                                  **args.model_kwargs)
    data_config = resolve_data_config(vars(args), model=model)
    train_set = create_dataset("", root=str(train_dir), split="train", is_training=True,
                               batch_size=args.batch_size, seed=args.seed)
    val_set = create_dataset("", root=str(val_dir), split="validation", is_training=False,
                             batch_size=args.batch_size)
    prefetcher = not args.no_prefetcher
    collate_fn = None
    if (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None) and prefetcher:
        collate_fn = FastCollateMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                      cutmix_minmax=args.cutmix_minmax,
                                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    common = dict(mean=data_config["mean"], std=data_config["std"], pin_memory=args.pin_mem, img_dtype=torch.float32,
                  device=torch.device(args.device), distributed=False, use_prefetcher=prefetcher)
    train = create_loader(
        train_set, input_size=data_config["input_size"], collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader, batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=0, interpolation=args.train_interpolation, num_workers=args.workers,
        worker_seeding=args.worker_seeding, **common)
    val = create_loader(val_set, input_size=data_config["input_size"], batch_size=args.validation_batch_size,
                        is_training=False, interpolation=data_config["interpolation"], num_workers=args.workers,
                        crop_pct=data_config["crop_pct"], **common)
    return train, val, data_config


def describe(transform) -> list:
    """A transform pipeline as comparable values: each step's repr, RandAugment op by op."""
    from timm.data.auto_augment import RandAugment
    out = []
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            out.append(("RandAugment", step.num_layers, step.choice_weights,
                        [(op.name, op.aug_fn, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max, op.hparams,
                          op.kwargs) for op in step.ops]))
        else:
            out.append(repr(step))
    return out


def test_timm_data_path_is_train_pys_augmentation(folder):
    """(b) gets timm's own objects with the recipe's parameters, in timm's order: RandomResizedCrop
    (scale, ratio, random bilinear/bicubic), hflip, RandAugment (the recipe's spec) per image;
    FastCollateMixup (mixup/cutmix/prob/switch/mode/smoothing) in the collate; the prefetcher's
    normalise, then RandomErasing (probability/mode/count) on the mixed batch."""
    from timm.data import FastCollateMixup
    from timm.data.auto_augment import RandAugment
    from timm.data.loader import PrefetchLoader
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from fastvit_reduce.bench.timm_path import TimmSource, guard_posterize
    cfg = recipe(**{"data.num_workers": 1})
    guard_posterize()  # before either side builds RandAugment, as in train.py's wrapper
    ref_train, ref_val, data_config = train_py_loaders(train_py_parser().parse_args(timm_flags(cfg, "cpu", 1)),
                                                       folder / "train", folder / "val")
    src = TimmSource(cfg, torch.device("cpu"), mean=data_config["mean"], std=data_config["std"],
                     train_dir=str(folder / "train"), val_dir=str(folder / "val"))
    ours = src.loader
    assert isinstance(ours, PrefetchLoader) and isinstance(ref_train, PrefetchLoader)
    # mixup in the collate, with the recipe's parameters
    mix, ref_mix = ours.loader.collate_fn, ref_train.loader.collate_fn
    assert isinstance(mix, FastCollateMixup) and vars(mix) == vars(ref_mix)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.mode, mix.label_smoothing,
            mix.num_classes) == (0.8, 1.0, 1.0, 0.5, "batch", 0.1, CLASSES)
    # erasing in the prefetcher (after the collate's mix), not in the per-image transform
    erase = ours.random_erasing
    assert isinstance(erase, RandomErasing) and vars(erase) == vars(ref_train.random_erasing)
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count, erase.num_splits) == \
        (0.25, "pixel", 1, 1, 0)
    assert torch.equal(ours.mean, ref_train.mean) and torch.equal(ours.std, ref_train.std)
    # per image: crop, flip, RandAugment, to tensor (uint8: the prefetcher normalises)
    steps = src.dataset.transform.transforms
    assert describe(src.dataset.transform) == describe(ref_train.loader.dataset.transform)
    assert not any(isinstance(s, RandomErasing) for s in steps)
    crop, flip, ra = steps[:3]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.size == (32, 32)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3)) and len(crop.interpolation) == 2
    assert flip.p == 0.5 and isinstance(ra, RandAugment) and ra.num_layers == 2
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ra.ops} == {(9, 0.5, 0.5)}
    assert "PosterizeIncreasing" in [op.name for op in ra.ops]  # inc1: the increasing ops
    assert describe(src.val_loader.loader.dataset.transform) == describe(ref_val.loader.dataset.transform)
    assert src.val_loader.random_erasing is None


def test_timm_data_path_erases_after_mixing(folder):
    """Behaviour: with erasing 'const' on every image after mixup, the batch holds exact zeros in
    boxes; a mixed uint8 image normalised by 127.5 never is exactly 0, so the zeros were written
    after both the mix and the normalisation."""
    from fastvit_reduce.bench.timm_path import TimmSource
    cfg = recipe(**{"data.num_workers": 1, "augment.reprob": 1.0, "augment.remode": "const", "augment.cutmix": 0.0})
    src = TimmSource(cfg, torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3,
                     train_dir=str(folder / "train"), val_dir=None)
    x, target, _ = next(iter(src.epoch(0)))
    assert target.shape == (BATCH, CLASSES)  # soft, mixed targets
    boxes = 0
    for img in x:
        zero = (img == 0).all(0)  # (H, W)
        if zero.any():
            rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
            assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one solid box
            boxes += 1
    assert boxes >= BATCH // 2  # timm gives up after 10 tries on a box that does not fit


# ----------------------------------------------------------------------------- scores and the table
def test_scores_and_paired_differences():
    rows = [{"epoch": 0, "eval_top1": 40.0, "lr": 1e-5}, {"epoch": 1, "eval_top1": 60.0, "lr": 5e-4},
            {"epoch": 2, "eval_top1": 55.0, "lr": 1e-4}]
    assert scores(rows) == {"final": 55.0, "peak": 60.0, "peak_epoch": 1, "epochs": 3, "lr": [1e-5, 5e-4, 1e-4]}
    lever = "(d) augment.erase_order=before_mix"

    def run(path, seed, final, rc=0):
        return {"path": path, "seed": seed, "rc": rc, "final": final, "peak": final + 1, "wall_s": 10.0,
                "lr": [1e-5, 5e-4], "log": "x.out"}
    runs = [run(TIMM, 1, 80.0), run(OURS_TIMM_DATA, 1, 79.0), run(OURS, 1, 78.0), run(lever, 1, 77.0),
            run(TIMM, 2, 84.0), run(OURS_TIMM_DATA, 2, 81.0), run(OURS, 2, 83.0), run(lever, 2, 80.0),
            run(TIMM, 3, 82.0), run(OURS_TIMM_DATA, 3, 80.0), run(OURS, 3, 10.0, rc=1), run(lever, 3, 81.0)]
    labels = [TIMM, OURS_TIMM_DATA, OURS, lever]
    out = summary(runs, [1, 2, 3], labels, [lever])
    diffs = {d["name"] + d["a"]: d for d in out["differences"]}
    b_a = diffs["(b)-(a)" + OURS_TIMM_DATA]["final"]
    assert b_a["n"] == 3 and b_a["mean"] == pytest.approx(-2.0) and b_a["seeds"] == [1, 2, 3]
    c_a = diffs["(c)-(a)" + OURS]["final"]  # seed 3's (c) failed: two pairs
    assert c_a["n"] == 2 and c_a["mean"] == pytest.approx(-1.5) and c_a["spans_zero"] is True
    assert diffs["(d)-(c)" + lever]["final"]["mean"] == pytest.approx(-2.0)
    assert out["paths"][OURS]["runs_ok"] == 2 and out["paths"][OURS]["final"] == pytest.approx(80.5)
    assert out["lr_check"]["max_rel_diff"] == 0.0 and out["lr_check"]["first_difference"] is None
    text = format_report({"config": "parity.yaml", "epochs": 2, "seeds": [1, 2, 3], "num_classes": 12,
                          "device": "cpu", "threads": 1, "workers": 2, "timm_train": None, "store_res": 512,
                          "beton_write_s": 1.0, "labels": labels, "runs": runs, "summary": out,
                          "lr_step_on": "epoch"})
    assert "failed" in text and "FAILED: seed 3 (c) ours (rc 1)" in text
    assert "-1.50 [" in text and "lr of each epoch, (a) vs (c): equal" in text


# ----------------------------------------------------------------------------- the whole command
FAKE_TRAIN_PY = """\
# a stand-in for timm's train.py: what bench parity passes, and a summary.csv as train.py writes it
import argparse, json, os, sys
from timm.data import auto_augment
p = argparse.ArgumentParser()
for flag in ("--output", "--experiment"):
    p.add_argument(flag)
p.add_argument("--epochs", type=int)
p.add_argument("--seed", type=int)
args, _ = p.parse_known_args()
out = os.path.join(args.output, args.experiment)
os.makedirs(out)
with open(os.path.join(out, "summary.csv"), "w") as f:
    f.write("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\\n")
    for e in range(args.epochs):
        f.write(f"{e},2.0,1.9,{40 + args.seed}.0,90.0,1e-05\\n")
open(os.path.join(out, "last.pth.tar"), "w").close()
seen = {"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"), "has_path": "PATH" in os.environ,
        "guarded": getattr(auto_augment.posterize, "guarded", False)}
json.dump(seen, open(os.path.join(args.output, "seen.json"), "w"))
"""


@pytest.mark.slow  # 8 trainer and train.py processes, then the bench again
def test_bench_runs_end_to_end(folder, tmp_path, capsys):
    """(a) through a stand-in of timm's train.py, then (b), (c) and one lever (d), for 2 seeds x
    1 epoch, interleaved seed by seed; then the bench without --timm-train, with --resume."""
    fake = tmp_path / "train.py"
    fake.write_text(FAKE_TRAIN_PY)
    argv = ["--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"), "--seeds", "1,2",
            "--epochs", "1", "--store-res", "96", "--workers", "1", "--out", str(tmp_path / "out"), "--json",
            "--lever", "augment.erase_order=before_mix", "--timm-train", str(fake),
            *[a for k, v in TINY.items() if k != "model.num_classes" for a in ("--set", f"{k}={v}")]]
    rc = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, [(r["path"], r["log"]) for r in out["runs"] if r["rc"]]
    lever = "(d) augment.erase_order=before_mix"
    assert out["labels"] == [TIMM, OURS_TIMM_DATA, OURS, lever] and out["num_classes"] == CLASSES
    assert [(r["seed"], r["path"]) for r in out["runs"]] == [(s, p) for s in (1, 2) for p in out["labels"]]
    for r in out["runs"]:
        assert 0 <= r["final"] <= 100 and r["peak"] >= r["final"] and r["epochs"] == 1 and r["wall_s"] > 0, r
        assert not [*Path(r["folder"]).glob("*.pt"), *Path(r["folder"]).glob("*.pth.tar")]  # deleted once read
    assert [r["final"] for r in out["runs"] if r["path"] == TIMM] == [41.0, 42.0]  # summary.csv read back
    seen = json.loads((tmp_path / "out" / "seed2" / "seen.json").read_text())
    assert seen["omp"] == "1" and seen["has_path"] and seen["guarded"]  # the environment, and the guard
    flags = seen["argv"]
    assert flags[flags.index("--seed") + 1] == "2" and flags[flags.index("--model") + 1] == "test_vit"
    assert flags[flags.index("--val-split") + 1] == "val" and flags[flags.index("--num-classes") + 1] == "3"
    assert [d["name"] for d in out["summary"]["differences"]] == ["(b)-(a)", "(c)-(b)", "(c)-(a)", "(d)-(c)"]
    assert all(d["final"]["n"] == 2 for d in out["summary"]["differences"])
    assert out["summary"]["lr_check"]["first_difference"] is None  # epoch 0 at warmup_lr on both sides
    assert (tmp_path / "out" / "parity.json").is_file()
    assert "(c)-(b) data path" in (tmp_path / "out" / "parity.txt").read_text()
    # without --timm-train and with --resume: (a) is left out, and (b), (c), (d) are read back, not trained again
    i = argv.index("--timm-train")
    assert main([*argv[:i], *argv[i + 2:], "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["labels"] == [OURS_TIMM_DATA, OURS, lever] and again["timm_train"] is None
    assert all(r["resumed"] for r in again["runs"]) and again["summary"]["lr_check"] is None
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in out["runs"] if r["path"] != TIMM]
    assert [d["name"] for d in again["summary"]["differences"]] == ["(c)-(b)", "(d)-(c)"]


def test_class_folders_must_agree(folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    shutil.rmtree(next((data / "val").iterdir()))
    rc = main(["--train-dir", str(data / "train"), "--val-dir", str(data / "val"), "--epochs", "1",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "hold different class folders (3 and 2)" in capsys.readouterr().err
