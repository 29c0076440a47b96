"""``fastvit-reduce bench parity``: top-1 of our trainer against timm's own ``train.py``, seed by
seed, with the gap split into the training loop and the data path.

    fastvit-reduce bench parity --train-dir D/train --val-dir D/val --seeds 1,2,3 --epochs 12 \\
        [--timm-train TIMM/train.py] [--lever KEY=VALUE ...] [--store-res 512] [--out parity_out] \\
        [--config rn_configs/parity.yaml] [--set KEY=VALUE ...] [--threads 1] [--workers N] [--resume] [--json]

Per seed, one recipe (``--config`` + ``--set``, that seed, ``--epochs``, the class count of the
folders) through four paths:

* (a) ``timm`` — timm's own ``train.py``, the checkout ``--timm-train`` names (it is in no timm
  wheel, and this repository does not copy it), with the flags ``timm_flags`` derives from the
  recipe (docs/recipe.md's table), run by ``bench.timm_train``; its ``summary.csv`` is read back
  (the EMA's top-1 with ``--model-ema``). Left out without ``--timm-train``;
* (b) ``ours+timm data`` — our trainer fed by timm's data path (``bench.timm_path.TimmSource``:
  ImageFolder, PIL transforms, ``FastCollateMixup`` in the collate, erasing after the mix);
* (c) ``ours`` — our trainer on ``.beton`` files written from the same folders at ``--store-res``;
* (d) ``KEY=VALUE`` — (c) with one ``--lever`` changed, for each lever.

The runs go seed by seed in that order (interleaved: a drift of the machine hits every path alike),
each in its own process with ``--threads`` torch threads (``OMP_NUM_THREADS`` too) and ``--workers``
loader workers / ffcv decode threads. The table gives final and peak top-1 per path and seed, and
the paired differences over seeds with 95 % t-intervals (``fastvit_reduce.stats``):

* (b)−(a): the training loop (lr stepping, loss, EMA, parameter groups, init);
* (c)−(b): the data path (storage, decode, crop interpolation, our batched RandAugment, mixup
  arithmetic, the val pipeline);
* (c)−(a): the whole; (d)−(c): each lever.

(b), (c) and (d) of one seed start from the same weights, and (c) and (d) also see the same order
and crops unless the lever changes them, so (d)−(c) is a true pairing. (a) draws from timm's own
RNG streams: (b)−(a) and (c)−(a) are paired by seed number only, and their spread is that of two
independent runs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastvit_reduce.config import ConfigError, UsageError
from fastvit_reduce.runs import RunFolder
from fastvit_reduce.stats import format_ci, paired_ci, spans_zero

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "rn_configs" / "parity.yaml")
TIMM, OURS_TIMM_DATA, OURS = "(a) timm", "(b) ours+timm data", "(c) ours"
# (minuend, subtrahend, what the difference isolates)
DIFFERENCES = [(OURS_TIMM_DATA, TIMM, "training loop"), (OURS, OURS_TIMM_DATA, "data path"),
               (OURS, TIMM, "ours vs timm")]

# our key -> timm train.py's flag for it (docs/recipe.md's table; tests/test_bench_parity.py holds
# them to it). timm_flags writes every flag through this dict.
TIMM_FLAG = {
    "model.arch": "--model", "model.img_size": "--img-size", "model.patch_size": "--model-kwargs",
    "model.num_classes": "--num-classes", "model.drop_path": "--drop-path",
    "model.pretrained_file": "--initial-checkpoint", "training.seed": "--seed",
    "training.batch_size": "--batch-size", "training.global_batch": "--grad-accum-steps",
    "training.amp": "--amp", "training.channels_last": "--channels-last", "training.compile": "--torchcompile",
    "training.clip_grad": "--clip-grad", "training.label_smoothing": "--smoothing", "training.device": "--device",
    "training.epochs": "--epochs", "optim.lr": "--lr", "optim.weight_decay": "--weight-decay",
    "optim.eps": "--opt-eps", "optim.betas": "--opt-betas", "lr.schedule": "--sched",
    "lr.step_on": "--sched-on-updates", "lr.warmup_epochs": "--warmup-epochs", "lr.warmup_lr": "--warmup-lr",
    "lr.min_lr": "--min-lr", "lr.warmup_prefix": "--warmup-prefix", "lr.cooldown_epochs": "--cooldown-epochs",
    "lr.cycle_mul": "--lr-cycle-mul", "lr.cycle_decay": "--lr-cycle-decay", "lr.cycle_limit": "--lr-cycle-limit",
    "lr.k_decay": "--lr-k-decay", "ema.eval": "--model-ema", "ema.decay": "--model-ema-decay",
    "augment.aug_repeats": "--aug-repeats", "augment.randaugment": "--aa", "data.rrc_scale": "--scale",
    "data.rrc_ratio": "--ratio", "data.hflip": "--hflip", "augment.mixup": "--mixup", "augment.cutmix": "--cutmix",
    "augment.mixup_prob": "--mixup-prob", "augment.mixup_switch_prob": "--mixup-switch-prob",
    "augment.mixup_mode": "--mixup-mode", "augment.reprob": "--reprob", "augment.remode": "--remode",
    "augment.recount": "--recount", "augment.erase_order": "--no-prefetcher", "data.crop_pct": "--crop-pct",
    "validation.batch_size": "--validation-batch-size", "data.num_workers": "--workers",
}


# ----------------------------------------------------------------------------- the recipe as timm's flags
def timm_flags(cfg: dict, device: str, workers: int) -> list[str]:
    """timm ``train.py``'s flags for the resolved recipe ``cfg`` on ``device`` ('cpu' or 'cuda')
    with ``workers`` loader workers; ``UsageError`` naming each key timm's train.py cannot express."""
    from fastvit_reduce.recipe import batch_plan, cosine_epochs

    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(cfg["reduction.strategy"] == "baseline", "reduction.strategy: timm's train.py has no MLP reductions")
    need(not cfg["model.pretrained_file"], "model.pretrained_file: the protocol trains from scratch")
    need(cfg["resolution.min_res"] == cfg["resolution.max_res"] == cfg["model.img_size"],
         "resolution.min_res = resolution.max_res = model.img_size: timm trains at --img-size, no progressive resizing")
    need(cfg["validation.resolution"] in (0, cfg["model.img_size"]),
         "validation.resolution: timm evaluates at --img-size")
    need(cfg["validation.every_n_epochs"] == 1, "validation.every_n_epochs=1: timm evaluates after every epoch")
    need(cfg["augment.aug_repeats"] == 1, "augment.aug_repeats=1: timm's train.py refuses --aug-repeats in one "
         "process (its RepeatAugSampler needs WORLD_SIZE > 1); use a --lever for repeats")
    need(cfg["ema.every"] == 1, "ema.every=1: timm updates its EMA after every optimizer update")
    need(float(cfg["lr.warmup_epochs"]).is_integer(), "lr.warmup_epochs: timm's --warmup-epochs is an integer")
    need(bool(cfg["data.drop_last"]), "data.drop_last=1: timm's train loader drops the last partial batch")
    epochs = cosine_epochs(cfg) if cfg["lr.schedule"] == "cosine" else cfg["training.epochs"]
    need(float(epochs).is_integer() and (cfg["lr.schedule"] == "cosine" or not (
        cfg["lr.cooldown_epochs"] or cfg["lr.warmup_prefix"])), "lr: timm's --epochs would not train training.epochs")
    if problems:
        raise UsageError("the recipe cannot run through timm's train.py:\n  " + "\n  ".join(problems))

    plan = batch_plan(cfg, world=1)  # one process: accumulation makes up the global batch
    flags: list[str] = []

    def put(key: str, *values) -> None:
        flags.extend([TIMM_FLAG[key], *map(str, values)])

    put("model.arch", cfg["model.arch"])
    put("model.img_size", cfg["model.img_size"])
    # why both: --img-size only sizes the data; the ViT's pos_embed follows its own img_size
    kwargs = [f"img_size={cfg['model.img_size']}"] + ([f"patch_size={cfg['model.patch_size']}"]
                                                       if cfg["model.patch_size"] else [])
    put("model.patch_size", *kwargs)
    put("model.num_classes", cfg["model.num_classes"])
    put("model.drop_path", cfg["model.drop_path"])
    put("training.seed", cfg["training.seed"])
    put("training.batch_size", plan["per_gpu_batch"])
    put("training.global_batch", plan["accum"])
    put("validation.batch_size", cfg["validation.batch_size"])
    put("training.epochs", int(epochs))
    flags += ["--opt", "adamw"]
    put("optim.lr", plan["peak_lr"])  # --lr given: timm does not rescale it
    put("optim.weight_decay", cfg["optim.weight_decay"])
    put("optim.eps", cfg["optim.eps"])
    put("optim.betas", *cfg["optim.betas"])
    if cfg["training.clip_grad"] > 0:
        put("training.clip_grad", cfg["training.clip_grad"])
    put("lr.schedule", cfg["lr.schedule"])
    if cfg["lr.step_on"] == "update":
        flags.append(TIMM_FLAG["lr.step_on"])
    put("lr.warmup_epochs", int(cfg["lr.warmup_epochs"]))
    put("lr.warmup_lr", cfg["lr.warmup_lr"])
    put("lr.min_lr", cfg["lr.min_lr"])
    if cfg["lr.warmup_prefix"]:
        flags.append(TIMM_FLAG["lr.warmup_prefix"])
    put("lr.cooldown_epochs", cfg["lr.cooldown_epochs"])
    put("lr.cycle_mul", cfg["lr.cycle_mul"])
    put("lr.cycle_decay", cfg["lr.cycle_decay"])
    put("lr.cycle_limit", cfg["lr.cycle_limit"])
    put("lr.k_decay", cfg["lr.k_decay"])
    if cfg["ema.decay"] > 0 and cfg["ema.eval"]:  # timm then reports (and keeps the best of) the EMA, as ours
        flags.append(TIMM_FLAG["ema.eval"])
        put("ema.decay", cfg["ema.decay"])
    if cfg["augment.randaugment"]:
        put("augment.randaugment", cfg["augment.randaugment"])
    put("data.rrc_scale", *cfg["data.rrc_scale"])
    put("data.rrc_ratio", *cfg["data.rrc_ratio"])
    put("data.hflip", 0.5 if cfg["data.hflip"] else 0.0)
    flags += ["--train-interpolation", "random"]  # timm's default, named: ours has no such knob
    for key in ("augment.mixup", "augment.cutmix", "augment.mixup_prob", "augment.mixup_switch_prob",
                "augment.mixup_mode", "training.label_smoothing", "augment.reprob", "augment.remode",
                "augment.recount"):
        put(key, cfg[key])
    if cfg["augment.erase_order"] == "before_mix":  # timm erases per image, then mixes the batch
        flags.append(TIMM_FLAG["augment.erase_order"])
    if cfg["data.crop_pct"]:
        put("data.crop_pct", cfg["data.crop_pct"])
    if cfg["training.amp"] != "off":
        dtype = {"fp16": "float16", "bf16": "bfloat16"}[cfg["training.amp"]]
        flags += [TIMM_FLAG["training.amp"], "--amp-dtype", dtype]
    if cfg["training.channels_last"]:
        flags.append(TIMM_FLAG["training.channels_last"])
    if cfg["training.compile"]:
        flags.append(TIMM_FLAG["training.compile"])
    put("training.device", device)
    put("data.num_workers", workers)
    if device == "cuda":
        flags.append("--pin-mem")
    return flags


def timm_command(train_py: str, cfg: dict, device: str, workers: int, train_dir: str, val_dir: str,
                 out: Path, name: str) -> list[str]:
    """The whole command of path (a): ``bench.timm_train`` running ``train_py`` on the two
    ImageFolders, writing ``out/name/summary.csv`` (one checkpoint kept, not several)."""
    train_dir, val_dir = Path(train_dir).absolute(), Path(val_dir).absolute()
    root = Path(os.path.commonpath([train_dir, val_dir]))
    # why name both splits: train.py falls back to the data root itself when no val split is found
    return [sys.executable, "-m", "fastvit_reduce.bench.timm_train", str(Path(train_py).absolute()),
            "--data-dir", str(root), "--train-split", str(train_dir.relative_to(root)),
            "--val-split", str(val_dir.relative_to(root)), *timm_flags(cfg, device, workers),
            "--checkpoint-hist", "1", "--output", str(out), "--experiment", name]


# ----------------------------------------------------------------------------- reading a run back
def read_timm_rows(folder: Path) -> list[dict]:
    """The epoch rows of timm's ``summary.csv`` (columns epoch, train_loss, eval_loss, eval_top1,
    eval_top5, lr; the eval columns are the EMA's with ``--model-ema``), as numbers."""
    path = folder / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(f)]


def scores(rows: list[dict]) -> dict:
    """Final and peak top-1, the peak's epoch, and the lr of each epoch, from epoch rows with
    timm's ``summary.csv`` columns (ours write the same in ``log.jsonl``)."""
    evaluated = [r for r in rows if r.get("eval_top1") is not None]
    if not evaluated:
        return {"final": None, "peak": None, "peak_epoch": None, "epochs": 0, "lr": []}
    best = max(evaluated, key=lambda r: r["eval_top1"])  # the first epoch reaching the peak
    return {"final": evaluated[-1]["eval_top1"], "peak": best["eval_top1"], "peak_epoch": best["epoch"],
            "epochs": len(rows), "lr": [r.get("lr") for r in rows]}


# ----------------------------------------------------------------------------- the runs
def resolve(argv: list[str]) -> dict:
    """The resolved config of a trainer command line (``UsageError`` for a bad key or value)."""
    from fastvit_reduce.train import resolve_variants
    try:
        return resolve_variants(argv)[0][0]
    except ConfigError as e:
        raise UsageError(str(e)) from None


def resolve_device(choice: str) -> str:
    """``training.device`` as timm's ``--device``: auto = cuda when torch sees one."""
    if choice != "auto":
        return choice
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_one(args, path: str, label: str, seed: int, cmd_or_argv: list[str], run_dir: Path, env: dict) -> dict:
    """One run of ``path`` ('timm': ``cmd_or_argv`` is the command; 'ours' / 'timm-data': our
    trainer's argv), its row: rc, wall and CPU s, scores. With ``--resume``, a run already done with
    the same command is read back instead of run again."""
    from fastvit_reduce.bench.e2e import run_children
    from fastvit_reduce.procs import run_logged

    done = run_dir.parent / f"{run_dir.name}.done.json"
    row = {"path": label, "seed": seed, "folder": str(run_dir), "log": str(run_dir.parent / f"{run_dir.name}.out"),
           "command": cmd_or_argv}
    previous = json.loads(done.read_text()) if args.resume and done.is_file() else None
    if previous and previous.get("command") == cmd_or_argv:
        row.update(rc=previous["rc"], wall_s=previous["wall_s"], cpu_s=previous["cpu_s"], resumed=True)
    else:
        done.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: timm would make name-1, ours would resume
        if path == "timm":
            rc, wall, cpu = run_logged(cmd_or_argv, row["log"], env={**os.environ, **env})
        else:
            child = run_children("ours" if path == "ours" else "timm", [(cmd_or_argv, run_dir)], args, [[]],
                                 jit_dir=Path(args.out) / "jit_cache", env_extra=env)[0]
            rc, wall, cpu = child["rc"], child["wall_s"], child["cpu_s"]
        row.update(rc=rc, wall_s=wall, cpu_s=cpu, resumed=False)
        if rc == 0:
            done.write_text(json.dumps({k: row[k] for k in ("command", "rc", "wall_s", "cpu_s")}))
    rows = read_timm_rows(run_dir) if path == "timm" else RunFolder(run_dir).read_rows()
    row.update(scores(rows))
    if row["rc"] == 0 and row["epochs"] != args.epochs:
        row["rc"] = 1  # exited 0 without every epoch: not a result
    if not args.keep_checkpoints:  # ViT-Ti: ~70-90 MB a file, a few per run; the bench reads none
        for pattern in ("*.pth.tar", "*.pt"):
            for f in run_dir.glob(pattern):
                f.unlink()
    print(f"seed {seed} {label}: rc {row['rc']}, {row['wall_s']:.1f} s, final {row['final']}, "
          f"peak {row['peak']}{' (resumed)' if row['resumed'] else ''}; log {row['log']}", file=sys.stderr)
    return row


def summary(runs: list[dict], seeds: list[int], labels: list[str], levers: list[str]) -> dict:
    """Per path: mean final and peak; the paired differences with their 95 % intervals."""
    def values(label: str, key: str) -> dict:
        return {r["seed"]: r[key] for r in runs if r["path"] == label and r["rc"] == 0 and r[key] is not None}

    def mean(label: str, key: str):
        got = values(label, key)
        return sum(got.values()) / len(got) if got else None

    out = {"paths": {label: {"final": mean(label, "final"), "peak": mean(label, "peak"),
                             "wall_s": mean(label, "wall_s"), "runs_ok": len(values(label, "final"))}
                     for label in labels}, "differences": []}
    pairs = [(a, b, what) for a, b, what in DIFFERENCES if a in labels and b in labels]
    pairs += [(lever, OURS, "lever") for lever in levers]
    for a, b, what in pairs:
        diff = {"name": f"{a.split()[0]}-{b.split()[0]}", "a": a, "b": b, "isolates": what}
        for key in ("final", "peak"):
            va, vb = values(a, key), values(b, key)
            both = [s for s in seeds if s in va and s in vb]
            ci = paired_ci([va[s] for s in both], [vb[s] for s in both]) if both else None
            diff[key] = ci and {**ci, "spans_zero": spans_zero(ci), "seeds": both}
        out["differences"].append(diff)
    out["lr_check"] = lr_check(runs)
    return out


def lr_check(runs: list[dict]) -> dict | None:
    """(a) against (c): the largest relative difference of the lr of each epoch over the seeds
    where both finished (timm's ``summary.csv`` lr is the lr during that epoch when it is stepped per
    epoch; ours is the epoch's mean), and the first (seed, epoch) where they differ by > 1e-6."""
    by = {(r["path"], r["seed"]): r["lr"] for r in runs if r["rc"] == 0}
    worst, first = 0.0, None
    seeds = [s for p, s in by if p == TIMM and (OURS, s) in by]
    for seed in seeds:
        for epoch, (a, c) in enumerate(zip(by[(TIMM, seed)], by[(OURS, seed)])):
            rel = abs(a - c) / max(abs(a), 1e-30)
            worst = max(worst, rel)
            if rel > 1e-6 and first is None:
                first = {"seed": seed, "epoch": epoch, "timm": a, "ours": c}
    return {"seeds": seeds, "max_rel_diff": worst, "first_difference": first} if seeds else None


def format_report(result: dict) -> str:
    """The text tables: final, peak and wall per path and seed; then the paired differences."""
    seeds, labels, runs = result["seeds"], result["labels"], result["runs"]
    cell = {(r["path"], r["seed"]): r for r in runs}
    width = max(len(label) for label in labels) + 2
    lines = [(f"bench parity: {result['config']}, {result['epochs']} epoch(s), seeds "
              f"{','.join(map(str, seeds))}; {result['num_classes']} classes; device {result['device']}, "
              f"{result['threads']} torch thread(s) and {result['workers']} loader worker(s) per run")]
    if result["timm_train"]:
        t = result["timm_train"]
        lines.append(f"(a) timm's train.py: {t['path']} (sha256 {t['sha256'][:12]}), timm {t['timm_version']}")
    lines.append(f"(c) .beton files stored at {result['store_res']} px, written in {result['beton_write_s']:.1f} s")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for key, title, spec in (("final", "final top-1 %", ".1f"), ("peak", "peak top-1 %", ".1f"),
                             ("wall_s", "wall s", ".0f")):
        lines.append("")
        lines.append(f"{title:{width}}" + "".join(f"{f'seed {s}':>9}" for s in seeds) + f"{'mean':>9}")
        for label in labels:
            vals = []
            for s in seeds:
                r = cell.get((label, s))
                vals.append("failed" if r and r["rc"] != 0 and key != "wall_s" else fmt(r and r[key], spec))
            mean = result["summary"]["paths"][label][key]
            lines.append(f"{label:{width}}" + "".join(f"{v:>9}" for v in vals) + f"{fmt(mean, spec):>9}")
    lines.append("")
    lines.append("paired differences in points, mean [95 % interval] over the seeds both paths finished:")
    name_w = max([len(f"{d['name']} {d['a'] if d['isolates'] == 'lever' else d['isolates']}")
                  for d in result["summary"]["differences"]] + [10]) + 2
    lines.append(f"{'':{name_w}}{'final top-1':>26}{'peak top-1':>26}  zero inside (final)")
    for d in result["summary"]["differences"]:
        what = d["a"].split(" ", 1)[1] if d["isolates"] == "lever" else d["isolates"]
        cis = [format_ci(d[k]) if d[k] else "-" for k in ("final", "peak")]
        zero = d["final"] and d["final"]["spans_zero"]
        lines.append(f"{d['name'] + ' ' + what:{name_w}}{cis[0]:>26}{cis[1]:>26}  "
                     f"{'-' if zero is None else ('yes: noise' if zero else 'no')}")
    lr = result["summary"]["lr_check"]
    if lr and result["lr_step_on"] == "epoch":
        first = lr["first_difference"]
        lines.append("lr of each epoch, (a) vs (c): " + (
            f"equal (largest relative difference {lr['max_rel_diff']:.1e})" if first is None else
            f"DIFFERS from seed {first['seed']} epoch {first['epoch']} on: timm {first['timm']:.6g}, "
            f"ours {first['ours']:.6g}"))
    elif lr:
        lines.append("lr of each epoch, (a) vs (c): not compared (lr.step_on=update: timm's summary.csv has "
                     "the epoch's last lr, ours its mean)")
    failed = [r for r in runs if r["rc"] != 0]
    for r in failed:
        lines.append(f"FAILED: seed {r['seed']} {r['path']} (rc {r['rc']}): {r['log']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="fastvit-reduce bench parity", description=__doc__.splitlines()[0])
    p.add_argument("--train-dir", required=True, help="ImageFolder train split (one folder per class)")
    p.add_argument("--val-dir", required=True, help="ImageFolder val split (the same class folders)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (default 1,2,3)")
    p.add_argument("--epochs", type=int, required=True, help="epochs per run")
    p.add_argument("--timm-train", default=None, metavar="PATH",
                   help="timm's train.py (a checkout, e.g. timm v1.0.22's): adds path (a)")
    p.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                   help="a path (d): (c) with this trainer key changed; repeatable, one path each")
    p.add_argument("--store-res", type=int, default=512, help="long side of the .beton images, px (default 512)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (default rn_configs/parity.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every path (timm's flags follow it); repeatable")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of every run, also OMP_NUM_THREADS (default 1: on 2 cores "
                        "timm's default threads beside 2 loader workers made each step 3-4x slower)")
    p.add_argument("--workers", type=int, default=0,
                   help="loader worker processes (timm) / decode threads (ffcv) of every run; 0 = this "
                        "process's cores (default)")
    p.add_argument("--out", default="parity_out", help="run folders, logs and .beton files (default parity_out)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already done with the same command (their <run>.done.json)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoint files (default: deleted once its scores are read)")
    p.add_argument("--json", action="store_true", help="print JSON: every run and the summary")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        raise UsageError("bad arguments (see above)") if e.code else e
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds wants comma-separated integers, got {args.seeds!r}") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds wants distinct integers, got {args.seeds}")
    for name in ("epochs", "store_res", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    for name in ("train_dir", "val_dir"):
        if not Path(getattr(args, name)).is_dir():
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a folder")
    if args.timm_train and not Path(args.timm_train).is_file():
        raise UsageError(f"--timm-train {args.timm_train}: file not found (a checkout of timm's train.py)")
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: file not found")
    for s in args.set + args.lever:
        if "=" not in s:
            raise UsageError(f"--set / --lever expect KEY=VALUE, got {s!r}")
    if len(set(args.lever)) != len(args.lever):
        raise UsageError(f"a --lever is given twice: {args.lever}")
    from fastvit_reduce.runtime import available_cores
    args.workers = args.workers or available_cores()
    args.out = str(Path(args.out).absolute())
    return args


def class_count(train_dir: str, val_dir: str) -> int:
    """The number of class folders, which must be the same in both splits (ImageFolder labels
    classes by their sorted names in each split separately)."""
    from fastvit_reduce.data.write import InputError, scan_split
    try:
        names = [scan_split(Path(d).absolute().parent, Path(d).name).classes for d in (train_dir, val_dir)]
    except InputError as e:
        raise UsageError(str(e)) from None
    if names[0] != names[1]:
        raise UsageError(f"--train-dir and --val-dir hold different class folders "
                         f"({len(names[0])} and {len(names[1])}): their labels would not agree")
    return len(names[0])


def main(argv: list[str]) -> int:
    """``bench parity``; returns 0 when every run finished, 1 when one failed, 2 on a usage error."""
    try:
        args = parse(argv)
        out = Path(args.out)
        num_classes = class_count(args.train_dir, args.val_dir)
        sets = [f"--model.num_classes={num_classes}", *[f"--{s}" for s in args.set],
                f"--training.epochs={args.epochs}", f"--training.threads={args.threads}",
                f"--data.num_workers={args.workers}", "--logging.progress=0"]
        recipe = ["--config", args.config, *sets]
        cfg = resolve(recipe)
        device = resolve_device(cfg["training.device"])
        lever_cfgs = [resolve([*recipe, f"--{lever}"]) for lever in args.lever]  # bad keys stop us here
        for lever, lcfg in zip(args.lever, lever_cfgs):
            if lcfg == cfg:
                raise UsageError(f"--lever {lever} changes nothing: the recipe already has that value")
        timm_info = None
        if args.timm_train:
            timm_flags(cfg, device, args.workers)  # what timm cannot express stops us before any run
            timm_info = {"path": str(Path(args.timm_train).absolute()),
                         "sha256": hashlib.sha256(Path(args.timm_train).read_bytes()).hexdigest(),
                         "timm_version": _version("timm")}
        from fastvit_reduce.bench.e2e import write_betons
        betons, beton_s = write_betons(args.train_dir, args.val_dir, out / "betons", args.store_res, args.workers)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = [f"--data.train_dataset={betons['train']}", f"--data.val_dataset={betons['val']}"]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    labels = ([TIMM] if args.timm_train else []) + [OURS_TIMM_DATA, OURS] + [f"(d) {lv}" for lv in args.lever]
    runs, start = [], time.perf_counter()
    for seed in args.seeds:  # interleaved: a, b, c, d... for each seed in turn
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        ours = [*recipe, f"--training.seed={seed}", f"--logging.folder={seed_dir}"]
        if args.timm_train:
            seed_cfg = resolve([*recipe, f"--training.seed={seed}"])
            cmd = timm_command(args.timm_train, seed_cfg, device, args.workers, args.train_dir, args.val_dir,
                               seed_dir, "timm")
            runs.append(run_one(args, "timm", TIMM, seed, cmd, seed_dir / "timm", env))
        runs.append(run_one(args, "timm-data", OURS_TIMM_DATA, seed,
                            [*ours, *data, "--logging.experiment=ours_timm_data"], seed_dir / "ours_timm_data", env))
        runs.append(run_one(args, "ours", OURS, seed, [*ours, *data, "--logging.experiment=ours"],
                            seed_dir / "ours", env))
        for k, lever in enumerate(args.lever, 1):
            runs.append(run_one(args, "ours", f"(d) {lever}", seed,
                                [*ours, *data, f"--{lever}", f"--logging.experiment=lever{k}"],
                                seed_dir / f"lever{k}", env))
    result = {"config": args.config, "epochs": args.epochs, "seeds": args.seeds, "num_classes": num_classes,
              "store_res": args.store_res, "device": device, "lr_step_on": cfg["lr.step_on"],
              "threads": args.threads, "workers": args.workers,
              "levers": args.lever, "sets": args.set, "labels": labels, "timm_train": timm_info,
              "beton_write_s": beton_s, "betons": betons, "total_wall_s": time.perf_counter() - start,
              "runs": runs, "summary": summary(runs, args.seeds, labels, [f"(d) {lv}" for lv in args.lever])}
    (out / "parity.json").write_text(json.dumps(result, indent=1))
    report = format_report(result)
    (out / "parity.txt").write_text(report + "\n")
    print(json.dumps(result, indent=1) if args.json else report)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
