"""``fastvit-reduce report RUN_DIR... [--out DIR] [--baseline NAME]``: compare runs in tables and a plot.

Reads each run folder the trainer wrote (``final.json``, plus ``params.json`` for the strategy's
knobs and seed, and ``log.jsonl`` for the epochs) and writes into ``--out`` (default: the common
parent of the runs):

    sweep_summary.csv   one row per run, raw numbers (params, seconds, fractions)
    sweep_summary.md    the same as a Markdown table (also printed), then per baseline and its
                        variants (``fastvit_reduce.differences``): the difference of each variant
                        from the baseline in final/peak top-1 and loss with 95 % intervals over
                        seeds (paired by seed, and unpaired beside it), and per epoch
    sweep_summary.png   accuracy against parameters, own compute time and FLOPs x images, the
                        differences with their intervals, the per-epoch differences (``plots``)

A RUN_DIR that is not a run stands for the runs in it and in its sub-folders (a sweep's ``--out``,
with ``seed_<S>/`` folders under ``--seeds``). ``fastvit_reduce.sweep`` calls ``write_summary``
itself at the end of a sweep, adding failed runs with the path of their log.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

from fastvit_reduce import differences, runs

# CSV columns, in order; the Markdown table shows a readable subset (MD_COLUMNS).
CSV_COLUMNS = ["experiment", "seed", "strategy", "knobs", "params", "mlp_params", "gflops", "img_size",
               "epochs", "epochs_done", "top_1", "headline", "best_top_1", "best_epoch", "peak_to_final",
               "final_top_1", "final_eval_loss", "final_train_loss",
               "raw_best_top_1", "raw_final_top_1", "best_ema_top_1", "final_ema_top_1",
               "total_time_s", "compute_s", "train_images", "train_img_s", "data_wait_frac", "val_images",
               "exit_reason", "weights_hash", "paired_with", "status", "run_dir", "log"]


class ReportError(ValueError):
    """A run folder that cannot be read; the message names the folder and the problem."""


def is_run_dir(path: Path) -> bool:
    """True when ``path`` looks like a trainer run folder."""
    return any((path / f).is_file() for f in ("final.json", "log.jsonl", "params.json"))


def runs_below(folder: Path) -> list[Path]:
    """Run folders in ``folder`` and one level further down (``--seeds`` puts each seed's runs in
    ``seed_<S>/``), in path order."""
    found = []
    for child in sorted(c for c in folder.iterdir() if c.is_dir()):
        if is_run_dir(child):
            found.append(child)
        else:
            found.extend(sorted(g for g in child.iterdir() if g.is_dir() and is_run_dir(g)))
    return found


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Expand each path to run folders: itself if it is a run, else the runs below it (``runs_below``).

    Other entries (a sweep's ``logs/`` or ``sweep_summary.csv``, as ``runs/sweep1/*`` expands to)
    are skipped with a note; a missing path, or no run at all, is an error.
    """
    found = []
    for p in map(Path, paths):
        _check_name(p)
        if not p.exists():
            raise ReportError(f"{p}: no such folder")
        if p.is_dir() and is_run_dir(p):
            found.append(p)
            continue
        children = runs_below(p) if p.is_dir() else []
        if not children:
            print(f"report: skipping {p} (not a run folder and holds none)", file=sys.stderr)
        for c in children:
            _check_name(c)
        found.extend(children)
    if not found:
        raise ReportError(f"no run folders (with final.json or log.jsonl) in {', '.join(map(str, paths))}")
    return found


def _check_name(path: Path) -> None:
    """A path whose name is not UTF-8 cannot be printed or written into the table: a one-line error."""
    try:
        runs.check_utf8("run folder", str(path))
    except ValueError as e:
        raise ReportError(str(e)) from None


def check_out(out: Path) -> None:
    """``ReportError`` unless ``out`` is (or can become) a folder we can write the summary into."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder")
    try:
        runs.check_utf8("--out", str(out))
    except ValueError as e:
        raise ReportError(str(e)) from None


def load_run(run_dir: str | Path) -> dict:
    """One summary row (keys of ``CSV_COLUMNS``) from a run folder (read by ``runs.read_run``).

    With ``final.json`` the numbers are the trainer's own; without it (a run still going, or
    killed) the best/last top-1 so far come from ``log.jsonl`` and status says 'incomplete'.
    """
    try:
        run = runs.read_run(run_dir)
    except runs.RunFolderError as e:
        raise ReportError(str(e)) from None
    final, log = run["final"], run["rows"]
    if not final and not log:
        raise ReportError(f"{run_dir}: no final.json and no epochs in log.jsonl")
    row = {c: None for c in CSV_COLUMNS}
    row.update({k: v for k, v in final.items() if k in row})
    row["experiment"] = row["experiment"] or Path(run_dir).name
    row["strategy"], row["knobs"] = row["strategy"] or run["strategy"], run["knobs"]
    row["paired_with"] = " ".join(final.get("paired_with") or [])
    row["seed"] = run["config"].get("training.seed")
    last = lambda key: next((r[key] for r in reversed(log) if r.get(key) is not None), None)  # noqa: E731
    row.update(final_eval_loss=last("eval_loss"), final_train_loss=last("train_loss"), val_images=last("val_images"))
    if not final:  # only the per-epoch log: summarise what is there
        head = [r["eval_top1"] for r in log if r.get("eval_top1") is not None]
        ema = [r["ema_top_1"] for r in log if r.get("ema_top_1") is not None]
        row.update(epochs_done=len(log), top_1=head[-1] if head else None, best_top_1=max(head, default=None),
                   final_top_1=head[-1] if head else None, best_ema_top_1=max(ema, default=None),
                   final_ema_top_1=ema[-1] if ema else None,
                   total_time_s=sum(r.get("epoch_time_s") or 0 for r in log),
                   compute_s=sum(r["compute_s"] for r in log) if all("compute_s" in r for r in log) else None,
                   train_images=sum(r.get("train_images") or 0 for r in log))
    peak = max((r for r in log if r.get("eval_top1") is not None), key=lambda r: r["eval_top1"], default=None)
    if peak is not None:  # the paper's "Peak Epoch" and "Δ(P→F)" beside its Top-1 (the peak)
        row["best_epoch"] = peak["epoch"]
        if row["final_top_1"] is not None:
            row["peak_to_final"] = round(peak["eval_top1"] - row["final_top_1"], 3)
    row["status"] = "done" if final.get("completed") else (final.get("exit_reason") or "incomplete")
    if row["status"] == "running":
        row["status"] = "incomplete"
    row["run_dir"] = str(run_dir)
    train_log = Path(run_dir) / "train.log"
    row["log"] = str(train_log) if train_log.is_file() else ""
    row["_rows"], row["_pair"] = log, run["pair"]
    return row


# ----------------------------------------------------------------------------- formatting
def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _epochs(r: dict) -> str:
    """'8', or 'done/configured' ('3/8') for a run that stopped early."""
    done, total = r["epochs_done"], r["epochs"]
    if done is None or done == total:
        return _num(total, "d")
    return f"{done}/{_num(total, 'd')}"


def _params(n) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


MD_COLUMNS = [  # (header, function of a row); "seed" only when the runs have several
    ("run", lambda r: r["experiment"]),
    ("seed", lambda r: _num(r["seed"], "d")),
    ("strategy", lambda r: (r["strategy"] or "?") + (f" ({r['knobs']})" if r["knobs"] else "")),
    ("params", lambda r: _params(r["params"])),
    ("GFLOPs/img", lambda r: _num(r["gflops"], "#.3g")),
    ("top-1 %", lambda r: _num(r["top_1"], ".1f") + (" (EMA)" if r["headline"] == "ema" else "")),
    ("peak top-1 %", lambda r: _num(r["best_top_1"], ".1f")),
    ("peak epoch", lambda r: _num(r["best_epoch"], "d")),
    ("Δ(P→F)", lambda r: _num(r["peak_to_final"], ".1f")),
    ("raw top-1 %", lambda r: _num(r["raw_final_top_1"], ".1f")),
    ("epochs", lambda r: _epochs(r)),
    ("wall time", lambda r: _duration(r["total_time_s"])),
    ("compute", lambda r: _duration(r["compute_s"])),  # the run's own forward/backward/optimizer time
    ("train img/s", lambda r: _num(r["train_img_s"], ".0f")),
    ("data wait", lambda r: _num(r["data_wait_frac"], ".0%")),
    ("status", lambda r: r["status"].split(":")[0].split(" — ")[0]),  # details listed below the table
]


def markdown_table(rows: list[dict], baseline: str | None = None) -> str:
    """The summary as a Markdown table, one line per run that did not finish with its log, then
    the differences from the baseline (``differences.comparison_text``)."""
    columns = [c for c in MD_COLUMNS if c[0] != "seed" or len({r.get("seed") for r in rows}) > 1]
    head = [h for h, _ in columns]
    body = [[str(f(r)) for _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    problems = [r for r in rows if r["status"] != "done"]
    diffs = differences.comparison_text(rows, baseline)
    if problems:
        lines.append("")
        lines += [f"- {r['experiment']}: {r['status']}" + (f" — log: {r['log']}" if r["log"] else "")
                  for r in problems]
    return "\n".join(lines) + "\n" + diffs


def order_rows(rows: list[dict]) -> list[dict]:
    """Each experiment's runs together, by seed; experiments in their paired command's order
    (baseline first), the others as found."""
    order: dict[str, int] = {}
    for r in rows:
        for name in (r.get("_pair") or {}).get("variants") or [r["experiment"]]:
            order.setdefault(name, len(order))
    order.update({r["experiment"]: len(order) + i for i, r in enumerate(rows) if r["experiment"] not in order})
    return sorted(rows, key=lambda r: (order[r["experiment"]], r.get("seed") is None, r.get("seed") or 0))


def write_summary(rows: list[dict], out_dir: str | Path, baseline: str | None = None) -> str:
    """Write sweep_summary.{csv,md,png} into ``out_dir``; return the Markdown text."""
    from fastvit_reduce.plots import plot
    rows = order_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items() if not k.startswith("_")}
                         for r in rows)
    table = markdown_table(rows, baseline)
    (out_dir / "sweep_summary.md").write_text(table)
    png = out_dir / "sweep_summary.png"
    if not plot(rows, png, baseline):
        png.unlink(missing_ok=True)  # why: a stale plot from an earlier sweep would mislead
    return table


def main(argv: list[str]) -> int:
    """``fastvit-reduce report RUN_DIR... [--out DIR]``; prints the table, returns the exit code."""
    parser = argparse.ArgumentParser(prog="fastvit-reduce report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or folders of runs")
    parser.add_argument("--out", default=None, help="where to write sweep_summary.* "
                        "(default: the common parent of the runs)")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="experiment the separate (unpaired) runs are compared with (default: the "
                             "one whose strategy is baseline; a paired run's baseline is its first config)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        found = find_runs(args.runs)
        rows = [load_run(r) for r in found]
        out = Path(args.out) if args.out else Path(os.path.commonpath([r.resolve().parent for r in found]))
        check_out(out)
        table = write_summary(rows, out, args.baseline)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable run folder, an unwritable --out
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"\nwrote {out / 'sweep_summary.csv'}, sweep_summary.md"
          + (", sweep_summary.png" if (out / "sweep_summary.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
