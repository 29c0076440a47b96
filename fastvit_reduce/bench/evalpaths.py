"""``fastvit-reduce bench eval``: the same trained weights through two validation pipelines.

    fastvit-reduce bench eval RUN_DIR [RUN_DIR ...] --val-dir sample/val [--weights ema|raw] [--json]

For each run folder, the weights of its ``last.pt`` (the EMA model by default, the headline when
EMA is on) are evaluated twice on the same validation photos:

* ``ours`` — the trainer's val loader on the run's ``data.val_dataset`` ``.beton``
  (``TimmCenterCropDecoder``: timm's crop box, resized from the stored image with cv2 INTER_AREA);
* ``timm`` — timm's eval loader on the original ImageFolder (PIL, the model's interpolation,
  bicubic for ViTs, ``crop_pct``), as ``train.py`` validates.

The difference in top-1 is what the evaluation pipeline alone moves the reported number, with
training held fixed: a lever of the accuracy study that costs no training run. The
class lists of the ``.beton`` and the folder must match (same names, same order).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from fastvit_reduce.config import UsageError
from fastvit_reduce.runs import RunFolder, RunFolderError
from fastvit_reduce.runtime import decode_threads


def top1(model, batches) -> tuple[float, int]:
    """Top-1 (%) of ``model`` over ``(x, labels)`` batches and the number of images."""
    import torch

    hits = seen = 0
    with torch.no_grad():
        for x, labels in batches:
            hits += int((model(x).argmax(1) == labels).sum())
            seen += len(labels)
    return 100.0 * hits / max(seen, 1), seen


def read_config(run: Path) -> dict:
    """The resolved config a run folder's ``params.json`` records."""
    try:
        params = RunFolder(run).read_params()
    except RunFolderError as e:
        raise UsageError(str(e)) from None
    if not isinstance(params, dict) or not isinstance(params.get("config"), dict):
        raise UsageError(f"{run}: no params.json with a config (not a run folder)")
    return params["config"]


def load_run(run: Path, weights: str):
    """(cfg, model in eval mode with ``weights`` of ``run/last.pt``, timm data config)."""
    from timm.data import resolve_data_config

    from fastvit_reduce.checkpoint import CheckpointError, load
    from fastvit_reduce.models import model_from_cfg
    from fastvit_reduce.recipe import needs_dynamic_size

    cfg = read_config(run)
    try:
        state = load(RunFolder(run).last_pt)
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(f"{run}: {e}") from None
    model = model_from_cfg(cfg, dynamic_img_size=needs_dynamic_size(cfg))
    if weights == "ema":
        if not state.get("ema"):
            raise UsageError(f"{run}: last.pt has no EMA weights (use --weights raw)")
        weights_state = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    else:
        weights_state = state["model"]
    model.load_state_dict(weights_state)
    return cfg, model.eval(), resolve_data_config({}, model=model)


def check_classes(beton: str, val_dir: str) -> None:
    """Refuse a val folder whose class folders are not the ``.beton``'s classes (the writer's
    ``.classes.json``), in the same order: the labels would not match."""
    from fastvit_reduce.config import ConfigError
    from fastvit_reduce.data.betons import read_classes  # no ffcv: it must wait until timm's workers are done
    try:
        ours = read_classes(beton)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    theirs = sorted(p.name for p in Path(val_dir).iterdir() if p.is_dir())
    if ours is not None and ours != theirs:
        raise UsageError(f"{beton} holds classes {ours[:3]}... but {val_dir} has {theirs[:3]}...: "
                         f"the labels would not match")


def timm_top1(cfg: dict, model, data_cfg: dict, val_dir: str) -> tuple[float, int]:
    """The model's top-1 (%) and image count through timm's val loader on the ImageFolder."""
    import torch

    from fastvit_reduce.bench.timm_path import guard_posterize, timm_val_loader

    guard_posterize()
    loader = timm_val_loader(cfg, data_cfg, val_dir, decode_threads(cfg), mean=tuple(data_cfg["mean"]),
                             std=tuple(data_cfg["std"]), pin_memory=False, device=torch.device("cpu"),
                             distributed=False, use_prefetcher=True, persistent_workers=False)
    return top1(model, loader)


def ours_top1(cfg: dict, model, data_cfg: dict) -> tuple[float, int]:
    """The model's top-1 (%) and image count through the trainer's val loader on the run's ``.beton``."""
    from fastvit_reduce.augment.batch import normalize
    from fastvit_reduce.data.loaders import create_val_loader
    from fastvit_reduce.recipe import val_res

    loader = create_val_loader(cfg["data.val_dataset"], cfg["validation.batch_size"], "cpu", res=val_res(cfg),
                               crop_pct=cfg["data.crop_pct"] or data_cfg["crop_pct"],
                               num_workers=decode_threads(cfg), in_memory=True, distributed=False,
                               channels_last=False)
    try:
        return top1(model, ((normalize(x, data_cfg["mean"], data_cfg["std"]), y) for x, y in loader))
    finally:
        loader.close()


def evaluate(runs: list[Path], val_dir: str, weights: str) -> list[dict]:
    """One row per run: top-1 through timm's val loader and through ours, same weights."""
    for run in runs:
        check_classes(read_config(run)["data.val_dataset"], val_dir)
    loaded = [load_run(run, weights) for run in runs]  # (cfg, model, data_cfg), each loaded once
    # every timm pass first, every ffcv pass after: timm forks worker processes, and a process
    # that has started numba's TBB thread pool (ffcv's decoding) and then forks hangs at exit in
    # numba's unload_tbb (seen here: the futex wait of an orphaned TBB task group)
    timm = [timm_top1(cfg, model, data_cfg, val_dir) for cfg, model, data_cfg in loaded]
    rows = []
    for run, (cfg, model, data_cfg), (timm_top_1, n_timm) in zip(runs, loaded, timm):
        ours_top_1, n_ours = ours_top1(cfg, model, data_cfg)
        if n_ours != n_timm:
            raise UsageError(f"{run}: the .beton holds {n_ours} val images, {val_dir} {n_timm}")
        rows.append({"run": str(run), "weights": weights, "images": n_ours, "ours_top_1": ours_top_1,
                     "timm_top_1": timm_top_1, "difference": ours_top_1 - timm_top_1})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<40} {'images':>6} {'ours %':>7} {'timm %':>7} {'ours-timm':>9}"]
    for r in rows:
        lines.append(f"{Path(r['run']).name[:40]:<40} {r['images']:>6} {r['ours_top_1']:>7.2f} "
                     f"{r['timm_top_1']:>7.2f} {r['difference']:>+9.2f}")
    if len(rows) > 1:
        diffs = [r["difference"] for r in rows]
        lines.append(f"{'mean (sd)':<40} {'':>6} {statistics.mean(r['ours_top_1'] for r in rows):>7.2f} "
                     f"{statistics.mean(r['timm_top_1'] for r in rows):>7.2f} {statistics.mean(diffs):>+9.2f}"
                     f" ({statistics.stdev(diffs):.2f})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastvit-reduce bench eval", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each with params.json and last.pt)")
    p.add_argument("--val-dir", required=True, help="the ImageFolder val split the .beton was written from")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of last.pt (default ema)")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    args = p.parse_args(argv)
    try:
        if not Path(args.val_dir).is_dir():
            raise UsageError(f"--val-dir {args.val_dir} is not a folder")
        rows = evaluate([Path(run) for run in args.runs], args.val_dir, args.weights)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    # why _exit: at interpreter teardown numba's dispatcher finalizers, freeing the ffcv loaders'
    # compiled stages, print KeyError tracebacks that look like a failure; all is printed by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
