"""A run's state on disk: what ``last.pt`` / ``best.pt`` hold, resuming from them, the epoch rows
and the ``final.json`` summary.

The run folder's layout is ``fastvit_reduce.runs``; this module fills it for the trainer's
variants (``variant.Variant``). Resuming puts every variant of a (paired) run at one common
position (epoch, step), refuses a checkpoint written with another configuration, and handles a
damaged ``last.pt`` as ``checkpoint.on_damaged`` says.
"""
from __future__ import annotations

import logging

from . import checkpoint as ckpt
from .config import ConfigError
from .runs import position, resume_position, run_changes, weights_hash

log = logging.getLogger("fastvit_reduce")
FORMAT = 2  # of last.pt / best.pt
# what resuming reads from last.pt besides checkpoint.OUR_KEYS (best.pt has none of the first three)
LAST_KEYS = ("optimizer", "scaler", "step_in_epoch", "updates", "best", "elapsed_s", "config")
BEST_KEYS = ("config",)


# ----------------------------------------------------------------------------- checkpoint contents
def weights_state(v, epoch: int) -> dict:
    """What every checkpoint of a variant holds: its weights (and EMA), epoch, config and the
    fingerprints of its datasets (``betons.data_fingerprints``; None for another data source)."""
    return {"format": FORMAT, "model": v.model.state_dict(),
            "ema": None if v.ema is None else v.ema.state_dict(), "epoch": epoch, "config": v.cfg,
            "data": v.data}


def best_state(v, epoch: int, top1: float, headline: str) -> dict:
    """``best.pt``: the weights of a new best headline top-1."""
    return {**weights_state(v, epoch), "top_1": top1, "headline": headline}


def last_state(v, epoch: int, step: int, epoch_stats: dict, elapsed_s: float) -> dict:
    """``last.pt``: everything to resume ``v`` at ``epoch`` after ``step`` micro-steps."""
    return {**weights_state(v, epoch), "optimizer": v.optimizer.state_dict(), "scaler": v.scaler.state_dict(),
            "step_in_epoch": step, "updates": v.updates, "consecutive_bad": float(v.consecutive_bad),
            "world_size": v.d.world, "elapsed_s": elapsed_s,
            "epoch_stats": {"loss_sum": float(v.loss_sum), "loss_n": float(v.loss_n),
                            "lr_sum": v.lr_sum, "lr_n": v.lr_n, "compute_s": v.timer.read(),
                            **epoch_stats} if step else {},
            "best": v.best, "rows": list(v.rows), "first_batch_hash": v.first_batch_hash}


def check_contents(state: dict, path, keys=LAST_KEYS) -> dict:
    """``state`` if it is one of our checkpoints of this format holding ``keys``; else
    ``CheckpointError`` (kind ``"foreign"``) saying what the file is."""
    fmt = state.get("format")
    if fmt != FORMAT:
        raise ckpt.CheckpointError(f"checkpoint {path}: written in checkpoint format {fmt!r} by another "
                                   f"version of fastvit-reduce; this one reads format {FORMAT}", "foreign")
    missing = [k for k in keys if k not in state]
    if missing and "top_1" in state and "optimizer" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path}: this is a best.pt (weights only: no optimizer state "
                                   "or position), not a last.pt", "foreign")
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path}: not a last.pt of fastvit-reduce (no "
                                   f"{', '.join(map(repr, missing))} key)", "foreign")
    bad = [k for k in ("epoch", "step_in_epoch", "updates") if k in state and type(state[k]) is not int]
    if bad:
        raise ckpt.CheckpointError(f"checkpoint {path}: {bad[0]!r} is {state[bad[0]]!r}, not an integer", "foreign")
    return state


def restore(v, state: dict) -> None:
    """Put ``last_state``'s contents back into ``v``."""
    v.model.load_state_dict(state["model"])
    v.optimizer.load_state_dict(state["optimizer"])
    v.scaler.load_state_dict(state["scaler"])
    if v.ema is not None and state.get("ema") is not None:
        v.ema.load_state_dict(state["ema"])
    v.updates, v.best = state["updates"], state["best"]
    v.elapsed_before = state["elapsed_s"]
    v.consecutive_bad.fill_(state.get("consecutive_bad", 0.0))
    v.rows = [r for r in state.get("rows", []) if r["epoch"] < state["epoch"]]
    v.first_batch_hash = state.get("first_batch_hash")
    v.reset_epoch_sums(state.get("epoch_stats") if state["step_in_epoch"] else None)


# ----------------------------------------------------------------------------- resuming
def resume(variants: list, d) -> tuple[int, int, dict]:
    """Load every variant's ``last.pt`` (or ``prev.pt``) at one common position.

    Returns ``(epoch, step, epoch_stats)``: where training goes on (0, 0 for a fresh run, or the
    epoch after the last logged one when starting from ``best.pt``) and the partial epoch's
    counters of a mid-epoch save."""
    states, positions, prevs = {}, {}, {}
    for v in variants:
        state = _load_or_none(v, v.folder.last_pt, d)
        states[v.name] = state
        positions[v.name] = position(state) if state else None
        prev = check_contents(ckpt.load(v.folder.prev_pt), v.folder.prev_pt) if v.folder.prev_pt.is_file() else None
        prevs[v.name] = (position(prev), prev) if prev else None
    pos, choice = resume_position(positions, {n: p[0] for n, p in prevs.items() if p})
    seen = d.all_sum([float(pos is not None)])[0]
    if seen not in (0, d.world):
        raise ConfigError(f"{variants[0].folder.last_pt} is visible on {int(seen)} of {d.world} "
                          "processes: logging.folder must be on a filesystem shared by all nodes")
    if pos is None:
        for v in variants:
            _maybe_from_best(v, d)
        return (variants[0].rows[-1]["epoch"] + 1 if variants[0].rows else 0), 0, {}
    chosen = {}
    for v in variants:
        chosen[v.name] = states[v.name] if choice[v.name] == "last" else prevs[v.name][1]
        check_same_run(v, chosen[v.name], d.world)
        restore(v, chosen[v.name])
    if d.main:
        for v in variants:
            v.folder.prev_pt.unlink(missing_ok=True)
    log.info(f"resuming from last.pt: epoch {pos[0]}, step {pos[1]}, update {variants[0].updates}")
    stats = chosen[variants[0].name].get("epoch_stats") or {}
    return pos[0], pos[1], {k: stats[k] for k in ("wait_s", "images", "wall_s") if k in stats}


def _load_or_none(v, path, d) -> dict | None:
    """``path``'s state, or None if absent; a damaged file per ``checkpoint.on_damaged``."""
    if not path.is_file():
        return None
    try:
        return check_contents(ckpt.load(path), path)
    except ckpt.CheckpointError as e:
        mode = v.cfg["checkpoint.on_damaged"]
        if mode == "refuse" or e.kind == "unreadable":  # why: a permission problem is not damage
            raise ConfigError(f"{e}. Re-run with --checkpoint.on_damaged=fresh (start over) or "
                              "--checkpoint.on_damaged=best (start from best.pt); either moves the bad "
                              "file aside") from None
        moved = ckpt.move_aside(path) if d.main else path
        log.warning(f"{path} is unusable ({e}); moved to {moved.name}; starting "
                    f"{'from best.pt' if mode == 'best' else 'fresh'}")
        v.start_from_best = mode == "best"
        return None


def _maybe_from_best(v, d) -> None:
    """After a damaged ``last.pt`` with ``on_damaged=best``: ``best.pt``'s weights, a fresh optimizer."""
    if not (getattr(v, "start_from_best", False) and v.folder.best_pt.is_file()):
        return
    best = check_contents(ckpt.load(v.folder.best_pt), v.folder.best_pt, BEST_KEYS)
    check_same_run(v, best, d.world)
    v.model.load_state_dict(best["model"])
    if v.ema is not None and best.get("ema") is not None:
        v.ema.load_state_dict(best["ema"])
    v.best = best.get("top_1")
    v.rows = [r for r in v.folder.read_rows() if r["epoch"] <= best["epoch"]]
    log.info(f"{v.name}: starting from best.pt (epoch {best['epoch']}) with a fresh optimizer")


def check_same_run(v, state: dict, world: int) -> None:
    """``ConfigError`` naming the settings (and datasets) in which ``state`` differs from ``v``'s run."""
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"{v.folder.last_pt}: not a fastvit-reduce checkpoint (no config)")
    saved_data = state.get("data") if isinstance(state.get("data"), dict) else None
    diff = run_changes(state["config"], saved_data, v.cfg, v.data)
    if state.get("world_size", world) != world:
        diff.append(f"number of processes: {state['world_size']} -> {world}")
    if diff:
        raise ConfigError(f"{v.folder.path} was written with a different configuration or data; use another "
                          "logging.experiment or restore these settings:\n  " + "\n  ".join(diff))
    for split, old in (saved_data or {}).items():
        new = (v.data or {}).get(split)
        if old and new and old.get("path") != new["path"]:
            log.info(f"{v.name}: data.{split}_dataset moved from {old.get('path')} to {new['path']} (same contents)")


# ----------------------------------------------------------------------------- rows and summary
def _round(x, digits: int):
    return None if x is None else round(x, digits)


def epoch_row(v, epoch: int, metrics: dict, train: dict, *, loss: float, world: int, res: int,
              eval_s: float, peak_mem_mb: float, decode_errors: int = 0) -> dict:
    """One ``log.jsonl`` row: timm's ``summary.csv`` columns (headline = EMA when evaluated), then
    raw and EMA metrics, speed, the weights hash and the JPEGs that failed to decode this epoch.
    ``train``: the epoch's wall_s, wait_s, images."""
    head = "ema_" if "ema_top_1" in metrics else "raw_"
    wall = max(train["wall_s"], 1e-9)
    return {"epoch": epoch, "train_loss": _round(loss, 5),
            "eval_loss": _round(metrics.get(f"{head}loss"), 5), "eval_top1": _round(metrics.get(f"{head}top_1"), 3),
            "eval_top5": _round(metrics.get(f"{head}top_5"), 3), "lr": v.lr_sum / max(v.lr_n, 1),
            **{f"{p}{k}": _round(metrics.get(f"{p}{k}"), 5 if k == "loss" else 3)
               for p in ("raw_", "ema_") for k in ("top_1", "top_5", "loss")},
            "val_images": metrics.get("val_images"), "res": res, "updates": v.updates,
            "epoch_time_s": _round(train["wall_s"] + eval_s, 3), "train_time_s": _round(train["wall_s"], 3),
            "train_img_s": _round(train["images"] * world / wall, 1),
            "data_wait_frac": _round(train["wait_s"] / wall, 4),
            # this variant's own forward/backward/optimizer seconds, and the images it stepped on
            "compute_s": _round(v.timer.read(), 3), "train_images": train["images"] * world,
            "peak_mem_mb": _round(peak_mem_mb, 1), "weights_hash": weights_hash(v.model.state_dict()),
            "decode_errors": decode_errors}


def final_summary(v, *, completed: bool, ranks_in_sync: bool, elapsed_s: float, process: dict,
                  paired_with: list[str]) -> dict:
    """The ``final.json`` summary: headline top-1 (EMA's when EMA is evaluated), raw next to it.
    ``process``: facts of this process (world_size, startup_s, torch_threads, jit_cache)."""
    cfg, rows = v.cfg, v.rows
    col = lambda k: [r[k] for r in rows if r.get(k) is not None]  # noqa: E731
    head, raw, ema = col("eval_top1"), col("raw_top_1"), col("ema_top_1")
    train_s = sum(r["train_time_s"] for r in rows)
    weighted = lambda k: sum(r[k] * r["train_time_s"] for r in rows) / max(train_s, 1e-9)  # noqa: E731
    reason = v.exit_reason or ("completed" if completed else "running")
    return {"experiment": v.name, "strategy": cfg["reduction.strategy"], "arch": cfg["model.arch"],
            "img_size": cfg["model.img_size"], "epochs": cfg["training.epochs"], **v.stats,
            "top_1": head[-1] if head else None, "best_top_1": max(head, default=None),
            "final_top_1": head[-1] if head else None,
            "headline": "ema" if ema and cfg["ema.eval"] else "raw",
            "raw_best_top_1": max(raw, default=None), "raw_final_top_1": raw[-1] if raw else None,
            "best_ema_top_1": max(ema, default=None), "final_ema_top_1": ema[-1] if ema else None,
            "total_time_s": elapsed_s, "train_img_s": weighted("train_img_s"),
            "data_wait_frac": weighted("data_wait_frac"),
            "compute_s": sum(r.get("compute_s") or 0.0 for r in rows),
            "train_images": sum(r.get("train_images") or 0 for r in rows),
            "completed": completed and reason == "completed", "exit_reason": reason,
            "weights_hash": rows[-1]["weights_hash"] if rows else None,
            "first_batch_hash": v.first_batch_hash, "epochs_done": len(rows), "updates": v.updates,
            "decode_errors": sum(r.get("decode_errors") or 0 for r in rows),
            **{k: v.plan[k] for k in ("global_batch", "accum", "per_gpu_batch")},
            "peak_lr": v.plan["peak_lr"], **process, "ranks_in_sync": ranks_in_sync, "paired_with": paired_with}
