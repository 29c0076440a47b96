"""``train.py`` / ``fastvit-reduce train``: command line -> variants -> plan -> run folders -> ``Trainer``.

    python train.py --config rn_configs/thin.yaml                      # 1 process (1 GPU, or CPU)
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml
    python train.py --config rn_configs/thin.yaml --dry-run [--world-size 8]   # the plan, no training
    # paired: K variants step in turn on each batch, decoded and augmented once
    torchrun --standalone --nproc-per-node=8 train.py --config rn_configs/baseline.yaml \\
        --pair-with rn_configs/thin.yaml rn_configs/shallow.yaml rn_configs/grouped.yaml
    # two nodes x 2 GPUs: run this on each node (MASTER = node 0's address, any free port):
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=$MASTER:29500 \\
        --rdzv-id=thin_vit_b16 train.py --config rn_configs/thin.yaml --logging.folder=/shared/runs

Overrides ``--section.key=value`` apply to every variant; later ``--config`` files override earlier
ones and a YAML may say ``base: other.yaml``. ``--pair-part I/N`` trains variants I, I+N, ... of
the pair. Unknown keys, flags not written 0/1 and out-of-range values stop the run before any work.
Exit codes: 0 done (or already complete), 1 crash / every variant non-finite / unwritable
checkpoint / dead loader / too many JPEGs that fail to decode, 2 configuration or user error,
124 stopped by SIGTERM/SIGUSR1 with ``last.pt`` written, 130 stopped by Ctrl-C (once: ``last.pt``
written at the next update; twice: at once, the last saved ``last.pt`` intact).
docs/training.md has the whole story (global batch, resuming, paired runs).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, declared_keys, load, parse_argv, resolved
from .data.betons import (check_beton, check_datasets, data_fingerprints, label_range, read_classes, stored_size,
                          verify_beton)
from .recipe import (batch_plan, batches_per_epoch, check_schedule, lr_at, resolution_warnings, train_resolutions,
                     updates_per_epoch, val_res)
from .runs import RunFolder, RunFolderError, check_experiment_name, check_utf8, run_changes
from .settings import PER_VARIANT, SECTIONS, SHARED_MODEL_KEYS


# ----------------------------------------------------------------------------- the command line
@dataclass
class TrainArgs:
    """A trainer command line, parsed once: config files, overrides and this entry point's options."""
    files: list[str]                                   # --config / -C / --config-file, in order
    overrides: dict = field(default_factory=dict)      # {'section.key': (value, 'command line')}
    pair_with: list[str] = field(default_factory=list)  # --pair-with B.yaml C.yaml ...
    part: tuple[int, int] | None = None                # --pair-part I/N
    world_size: int | None = None                      # --world-size N (with --dry-run)
    dry_run: bool = False

    def variants(self) -> list[tuple[list[str], dict]]:
        """(config files, overrides) of every variant: the first from --config, one per --pair-with."""
        return [(self.files, self.overrides)] + [([f], self.overrides) for f in self.pair_with]


def _option_value(argv: list[str], i: int) -> tuple[str, int]:
    """The value of ``--opt=value`` or ``--opt value`` at ``argv[i]``, and the index after it."""
    if "=" in argv[i]:
        return argv[i].split("=", 1)[1], i + 1
    return (argv[i + 1] if i + 1 < len(argv) else ""), i + 2


def parse_train_argv(argv: list[str]) -> TrainArgs:
    """The one parser of the trainer's command line (``sweep`` builds commands the same way)."""
    args, rest, i = TrainArgs(files=[]), [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--dry-run":
            args.dry_run, i = True, i + 1
        elif a == "--pair-part" or a.startswith("--pair-part="):
            value, i = _option_value(argv, i)
            part = re.fullmatch(r"(\d+)/(\d+)", value)
            if not part or not 1 <= int(part[1]) <= int(part[2]):
                raise ConfigError(f"--pair-part needs I/N with 1 <= I <= N (e.g. 1/2), got {value!r}")
            args.part = (int(part[1]), int(part[2]))
        elif a == "--world-size" or a.startswith("--world-size="):
            value, i = _option_value(argv, i)
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size needs a positive integer, got {value!r}")
            args.world_size = int(value)
        elif a == "--pair-with":
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                args.pair_with.append(argv[i])
                i += 1
            if not args.pair_with:
                raise ConfigError("--pair-with needs one or more config files")
        else:
            rest.append(a)
            i += 1
    args.files, args.overrides = parse_argv(rest)
    return args


def experiment_name(cfg: dict, config_files: list[str]) -> str:
    """The run folder's name: ``logging.experiment``, else the last config file's stem, else the strategy."""
    name = cfg["logging.experiment"] or (Path(config_files[-1]).stem if config_files else cfg["reduction.strategy"])
    return check_experiment_name(name)


def resolve_variants(argv: list[str], whole: bool = False) -> list[tuple[dict, str]]:
    """(resolved config, run folder name) of every variant the command line asks this process to
    train (with ``--pair-part I/N``: variants I, I+N, I+2N, ... of the pair, counting from 1;
    ``whole``: all of them), every variant of the pair checked to be pairable; ``ConfigError``
    naming the problem otherwise. ``sweep`` uses it too."""
    args = parse_train_argv(argv)
    out = []
    for files, overrides in args.variants():
        load(files, overrides, SECTIONS)
        cfg = resolved(SECTIONS)
        check_utf8("logging.folder", cfg["logging.folder"])
        out.append((cfg, experiment_name(cfg, files)))
    check_pairable([c for c, _ in out], [n for _, n in out])
    return out if whole else select_part(out, args.part)


def select_part(variants: list, part: tuple[int, int] | None) -> list:
    """``--pair-part I/N``: variants I, I+N, I+2N, ... (counting from 1); all of them for None."""
    if part is None:
        return variants
    i, n = part
    if n > len(variants):
        raise ConfigError(f"--pair-part {i}/{n}: the pair has only {len(variants)} variant(s); "
                          f"use at most {len(variants)} parts")
    return variants[i - 1::n]


# ----------------------------------------------------------------------------- checks before any work
def check_pairable(cfgs: list[dict], names: list[str]) -> None:
    """``ConfigError`` naming every key that differs between paired configs but shapes the batches."""
    base = cfgs[0]
    problems = []
    for c, name in zip(cfgs[1:], names[1:]):
        diff = [k for k in sorted(set(base) | set(c)) if base.get(k) != c.get(k)
                and (not k.startswith(PER_VARIANT) or k in SHARED_MODEL_KEYS)]
        if diff:
            problems.append(f"{name} vs {names[0]}: " + ", ".join(f"{k} ({base.get(k)!r} vs {c.get(k)!r})"
                                                                 for k in diff))
    if len(set(names)) != len(names):
        problems.append(f"two variants would share a run folder: {names} (set logging.experiment)")
    if problems:
        raise ConfigError("these configs cannot be paired: they must agree on everything that shapes "
                          "the batches (data, resolution, augmentation, batch sizes, epochs, seed, "
                          "device, AMP, logging folder):\n  " + "\n  ".join(problems))


def check_inputs(cfg: dict) -> None:
    """User errors worth catching before any work: missing or damaged datasets, labels beyond
    ``model.num_classes``, CUDA asked for but absent, an impossible resolution schedule."""
    train_resolutions(cfg)
    try:
        if cfg["data.val_dataset"]:
            check_datasets(cfg["data.train_dataset"], cfg["data.val_dataset"])
        else:
            check_beton(cfg["data.train_dataset"])
    except ConfigError as e:
        raise ConfigError(f"data.train_dataset / data.val_dataset: {e}") from None
    classes = read_classes(cfg["data.train_dataset"])  # the writer's list; None if absent
    if classes is not None and len(classes) > cfg["model.num_classes"]:
        # why here: a label >= num_classes would crash the first step (a device assert on CUDA)
        raise ConfigError(f"model.num_classes={cfg['model.num_classes']}, but {cfg['data.train_dataset']} "
                          f"has {len(classes)} classes (its .classes.json)")
    for key in ("data.train_dataset", "data.val_dataset"):
        if cfg[key]:
            verify_beton(cfg[key])  # header, tables, page boundaries: a damaged file is refused here
            lo, hi, _ = label_range(cfg[key])  # from the file itself (.classes.json may be missing)
            if lo < 0 or hi >= cfg["model.num_classes"]:
                raise ConfigError(f"{key}: {cfg[key]} holds labels {lo}..{hi}, but model.num_classes="
                                  f"{cfg['model.num_classes']} (labels must be 0..num_classes-1)")
    if cfg["training.device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda, but torch sees no CUDA device")


# ----------------------------------------------------------------------------- --dry-run
def print_plan(cfgs: list[dict], names: list[str], world: int) -> None:
    """``--dry-run``: the resolved plan of every variant as a table and as JSON."""
    import torch

    from .models import mlp_stats, model_from_cfg
    from .strategies import STRATEGIES
    cfg = cfgs[0]
    p = batch_plan(cfg, world)
    try:
        n = check_beton(cfg["data.train_dataset"]) if cfg["data.train_dataset"] else None
    except ConfigError:
        n = None
    upe = updates_per_epoch(batches_per_epoch(cfg, world, n), p["accum"]) if n else None
    store = stored_size(cfg["data.train_dataset"]) if n else None
    plans = []
    for c, name in zip(cfgs, names):
        vp = batch_plan(c, world)
        with torch.device("meta"):  # shapes only: ViT-B's parameters counted without allocating them
            model = model_from_cfg(c)
        plans.append({"experiment": name, **vp, "updates_per_epoch": upe, "epochs": c["training.epochs"],
                      "train_images": n, "stored_long_side_px": store and store["median_long_side"],
                      "stored_short_side_px": store and store["median_short_side"],
                      "train_res_px": sorted(train_resolutions(c)), "val_res_px": val_res(c),
                      "strategy": c["reduction.strategy"], "arch": c["model.arch"],
                      "params": mlp_stats(model)["params"], "weight_decay": c["optim.weight_decay"],
                      "warmup_epochs": c["lr.warmup_epochs"], "drop_path": c["model.drop_path"],
                      "ema_decay": c["ema.decay"], "randaugment": c["augment.randaugment"],
                      "mixup": c["augment.mixup"], "cutmix": c["augment.cutmix"], "reprob": c["augment.reprob"],
                      "aug_repeats": c["augment.aug_repeats"], "amp": c["training.amp"],
                      "erase_order": c["augment.erase_order"], "lr_step_on": c["lr.step_on"],
                      # the lr of the first update of epochs 0..6 (per update: needs the dataset's length)
                      "lr_by_epoch": [lr_at(c, vp["peak_lr"], e, 0, upe or 1) for e in range(7)]
                      if upe or c["lr.step_on"] == "epoch" else None,
                      "knobs": {f"reduction.{k}": c[f"reduction.{k}"]
                                for k in getattr(STRATEGIES.get(c["reduction.strategy"]), "knobs", {})}})
    keys = ["world", "per_gpu_batch", "accum", "global_batch", "peak_lr", "updates_per_epoch", "epochs",
            "train_images", "stored_long_side_px", "train_res_px", "val_res_px", "strategy", "params",
            "erase_order", "lr_step_on", "lr_by_epoch"]
    width = max(map(len, keys))
    print(f"{'':{width}}  " + "  ".join(f"{pl['experiment']:>16}" for pl in plans))
    cell = lambda v: ",".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v) \
        if isinstance(v, list) else str(v)  # noqa: E731
    for k in keys:
        print(f"{k:{width}}  " + "  ".join(f"{cell(pl[k]):>16}" for pl in plans))
    print("plan (JSON):")
    print(json.dumps(plans, indent=1, default=str))


# ----------------------------------------------------------------------------- run folders
def prepare_folder(f: RunFolder, cfg: dict) -> bool:
    """Rank 0: create and lock the run folder; False when there is nothing to train in it
    (finished with the same config, or stopped on a non-finite loss)."""
    from . import checkpoint as ckpt
    f.create()
    warning = f.lock()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    ckpt.clean_stale_tmp(f.path)
    final = f.read_final() or {}
    if final.get("completed"):
        params = f.read_params() or {}
        diff = run_changes(params.get("config", cfg), params.get("data"), cfg, data_fingerprints(cfg))
        if diff:
            raise ConfigError(f"{f.path} is a finished run with a different configuration; use another "
                              "logging.experiment or restore:\n  " + "\n  ".join(diff))
        print(f"{f.path} is already complete ({cfg['training.epochs']} epochs); nothing to do")
        return False
    if str(final.get("exit_reason", "")).startswith("non-finite"):
        print(f"{f.path} stopped on a non-finite loss; skipping it (delete the folder to train it again)")
        return False
    return True


def prepare_folders(d, cfgs: list[dict], folders: list[RunFolder]) -> list[bool]:
    """Rank 0 alone looks at the folders; every rank gets the same verdicts (train it or not)."""
    import torch.distributed as dist
    verdicts, error = [], None
    if d.main:
        try:
            verdicts = [prepare_folder(f, c) for c, f in zip(cfgs, folders)]
        except (ConfigError, RunFolderError) as e:
            error = e
    if d.all_sum([float(error is not None)])[0]:
        raise error or ConfigError("rank 0 refused the run folder (its message is above)")
    if d.world > 1:
        box = [verdicts]
        dist.broadcast_object_list(box, src=0)
        verdicts = box[0]
    return verdicts


def write_params(trainer, argv: list[str], pair_names: list[str]) -> None:
    """Rank 0: each variant's ``params.json`` (config, versions, git revision, the whole pair)."""
    from .runtime import run_info
    for v in trainer.variants:
        info = run_info(v.cfg, argv, trainer.d.world)
        # the whole pair, also the variants other processes train (--pair-part)
        info["pair"] = {"variants": pair_names, "baseline": pair_names[0]} if len(pair_names) > 1 else None
        info["plan"] = v.plan
        info["data"] = v.data  # the datasets' fingerprints: a finished run is judged on them too
        v.folder.write_params(info)


def print_help() -> None:
    print(__doc__)
    for key, p in sorted(declared_keys(SECTIONS).items()):
        print(f"  --{key}={p.default!r}  {p.desc} [{p.checker.help()}]")


# ----------------------------------------------------------------------------- main
def main(argv: list[str], source_factory=None) -> int:
    """Parse ``argv``, train, return the exit code (see the module docstring).

    ``source_factory`` replaces the FFCV data source (``bench e2e`` runs timm's own loaders
    through the same loop; ``trainer.Trainer`` says what it is called with)."""
    from .runtime import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER  # why here: runtime imports torch, which --help need not
    rank0 = int(os.environ.get("RANK", 0)) == 0

    def fail(msg, code=EXIT_USER):
        if rank0:
            print(f"error: {msg}", file=sys.stderr)
        return code

    if {"-h", "--help"} & set(argv):
        print_help()
        return EXIT_OK
    from .strategies import StrategyError
    try:
        args = parse_train_argv(argv)
        pair = resolve_variants(argv, whole=True)
        pair_names = [n for _, n in pair]  # the whole pair, also what other processes train
        cfgs, names = map(list, zip(*select_part(pair, args.part)))
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
        for c in cfgs:
            batch_plan(c, world)
            check_schedule(c)
        if args.dry_run:
            print_plan(cfgs, names, world)
            return EXIT_OK
        if source_factory is None:
            check_inputs(cfgs[0])
    except (ConfigError, StrategyError) as e:
        return fail(e)
    except KeyboardInterrupt:
        return fail("interrupted (Ctrl-C) before training started; nothing to save", EXIT_INTERRUPTED)
    return run(argv, cfgs, names, pair_names, source_factory, fail)


def run(argv, cfgs, names, pair_names, source_factory, fail) -> int:
    """Everything after the checks: process group, run folders, logging, the trainer."""
    import torch.distributed as dist

    from . import checkpoint as ckpt
    from .data.loaders import LoaderError
    from .runtime import (EXIT_CRASH, EXIT_INTERRUPTED, EXIT_OK, Dist, close_logging, log, process_age,
                          setup_logging)
    from .strategies import StrategyError
    from .trainer import Trainer
    rank0 = int(os.environ.get("RANK", 0)) == 0
    folders: list[RunFolder] = []
    try:
        d = Dist(cfgs[0]["training.device"])
        folders = [RunFolder(Path(c["logging.folder"]) / n) for c, n in zip(cfgs, names)]
        todo = [(c, f) for c, f, ok in zip(cfgs, folders, prepare_folders(d, cfgs, folders)) if ok]
        if not todo:
            return EXIT_OK
        cfgs, folders = [c for c, _ in todo], [f for _, f in todo]
        setup_logging([f.path for f in folders] if d.main else None)
        trainer = Trainer(cfgs, d, folders, source_factory)
        if d.main:
            write_params(trainer, argv, pair_names)
            ours = source_factory is None
            stores = [stored_size(cfgs[0][k]) if ours and cfgs[0][k] else None
                      for k in ("data.train_dataset", "data.val_dataset")]
            for w in resolution_warnings(cfgs[0], trainer.variants[0].crop_pct, *stores):
                log.warning(f"warning: {w}")
        trainer.startup_s = round(process_age(), 2)
        return trainer.run()
    except (ConfigError, StrategyError, RunFolderError) as e:
        return fail(e)
    except (ckpt.CheckpointError, LoaderError) as e:  # every rank raises these together; a dead
        if rank0:                                      # decode thread is a named fault, not a hang
            log.error(f"error: {e}")
        return fail(e, EXIT_CRASH)
    except KeyboardInterrupt:  # Ctrl-C before the trainer listens for it, or a second one
        return fail("interrupted (Ctrl-C): stopped at once; last.pt holds the last saved state, "
                    "re-run the same command to resume", EXIT_INTERRUPTED)
    except Exception:
        log.exception("training crashed")
        raise
    finally:
        for f in folders:
            f.unlock()
        close_logging()
        if dist.is_initialized():
            dist.destroy_process_group()
