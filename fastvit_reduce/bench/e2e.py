"""``fastvit-reduce bench e2e``: the same recipe through two data paths, end to end.

    fastvit-reduce sample --out sample
    fastvit-reduce bench e2e --train-dir sample/train --val-dir sample/val --beton-dir /tmp/betons \\
        --config rn_configs/sample/base.yaml --epochs 3 --repeats 2 [--json] [--set key=value ...]

Paths (the rest of the loop is the trainer's own code, for both):

* ``timm`` — the ordinary pipeline, built as timm's ``train.py`` builds it
  (``fastvit_reduce.bench.timm_path.TimmSource``);
* ``ours`` — the trainer's FFCV source from the ``.beton`` files.

The ``.beton`` files are written once first (their cost is its own line). Then the runs go
interleaved (ours, timm, ours, timm, ...) as separate processes, so start-up is real, and the
table shows per path (median over repeats): wall s, start-up s (the trainer's ``startup_s``:
process start to ready to train), steady img/s (epochs >= 1; epoch 0 when there is only one), CPU-seconds
(``rusage`` of the child), data-wait fraction, final top-1, and ours/timm ratios. ``ffcv import s``
is the part of start-up each child spent importing ffcv, numba and cv2: the timm path pays it only
because it runs inside our trainer, so ``ours/(timm-import)`` also gives the wall ratio against
timm's wall without it (timm's own ``train.py`` does not import them).

ffcv's pipelines are compiled by numba, and ``fastvit_reduce.data.jit`` caches that code on disk
(``FASTVIT_REDUCE_JIT_CACHE``). ``--jit-cache warm`` (default) measures runs on a machine that has
run the recipe before: the ours children share one cache, filled first by an untimed 1-epoch ours
run (its wall is printed on its own line). ``--jit-cache cold`` gives every ours child an empty
cache: the first run on a new machine, or after the code changed. Each row's JSON has the
child's ``jit_loaded`` / ``jit_compiled`` counts.

The seed's augmentation recipe (RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0,
reprob 0.25) is set on top of ``--config`` unless ``--set`` changes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastvit_reduce.config import UsageError
from fastvit_reduce.procs import launch
from fastvit_reduce.runs import RunFolder

SEED_RECIPE = {"augment.randaugment": "rand-m9-mstd0.5-inc1", "augment.mixup": 0.8, "augment.cutmix": 1.0,
               "augment.reprob": 0.25}
PATHS = ("ours", "timm")
COLUMNS = [("path", "path"), ("wall_s", "wall s"), ("startup_s", "start-up s"), ("ffcv_import_s", "ffcv import s"),
           ("steady_img_s", "steady img/s"), ("cpu_s", "CPU s"), ("data_wait_frac", "data wait"), ("top_1", "top-1 %")]
# the child prints this, then the seconds it spent importing ffcv, numba and cv2: the timm path pays
# them only because it runs inside our trainer (timm's train.py does not import them)
IMPORT_MARK = "bench-e2e ffcv_import_s="


# ----------------------------------------------------------------------------- one child run
def child_main(path: str, train_argv: list[str], train_dir: str, val_dir: str) -> int:
    """Inside the child process: ``train.main(train_argv)`` with ``path``'s data source."""
    import functools

    import timm  # noqa: F401 — both paths need torch and timm: not timed
    import torch  # noqa: F401
    t0 = time.perf_counter()
    import cv2  # noqa: F401
    import numba  # noqa: F401

    import fastvit_reduce.data.loaders  # noqa: F401 — imports ffcv, as the trainer does
    print(f"{IMPORT_MARK}{time.perf_counter() - t0:.3f}", flush=True)
    from fastvit_reduce import train
    from fastvit_reduce.bench.timm_path import TimmSource

    factory = functools.partial(TimmSource, train_dir=train_dir, val_dir=val_dir) if path == "timm" else None
    return train.main(train_argv, source_factory=factory)


def jit_cache_dir(args, out: Path, name: str) -> Path:
    """The numba cache of an ours child: ``--jit-cache cold``: its own, empty; warm: the shared one."""
    if args.jit_cache == "cold":
        folder = out / "jit_cache_cold" / name
        shutil.rmtree(folder, ignore_errors=True)
        return folder
    return out / "jit_cache"


def prime_jit_cache(args, out: Path, train_argv: list[str], cores: list[int]) -> float | None:
    """``--jit-cache warm``: empty the shared cache and fill it with an untimed 1-epoch ours run of
    ``train_argv`` on ``cores`` (the decode thread count is part of a pipeline's key); its wall s."""
    if args.jit_cache != "warm":
        return None
    shutil.rmtree(out / "jit_cache", ignore_errors=True)
    name = "ours_jit_prime"
    shutil.rmtree(out / name, ignore_errors=True)
    argv = [*train_argv, "--training.epochs=1", f"--logging.folder={out}", f"--logging.experiment={name}"]
    row = run_children("ours", [(argv, out / name)], args, [cores], jit_dir=out / "jit_cache")[0]
    print(f"{name}: rc {row['rc']}, {row['wall_s']:.1f} s (untimed), log {row['log']}", file=sys.stderr)
    if row["rc"] != 0:
        raise UsageError(f"the untimed ours run that fills the numba cache failed: see {row['log']}")
    return row["wall_s"]


def run_children(path: str, jobs: list[tuple[list[str], Path]], args, cpu_sets: list[list[int]],
                 jit_dir: Path | None = None, env_extra: dict | None = None) -> list[dict]:
    """Run ``path``'s children (trainer argv, run folder), ``len(cpu_sets)`` at a time, each pinned
    to its core set (``[]``: not pinned), with ``jit_dir`` as their numba cache and ``env_extra``
    in their environment; return their rows in order, each with its own wall time and CPU seconds
    (``rusage``). ``args``: ``train_dir`` and ``val_dir`` (the timm path's ImageFolders)."""
    env = {**os.environ, **(env_extra or {})}
    if jit_dir is not None:
        env["FASTVIT_REDUCE_JIT_CACHE"] = str(jit_dir)
    pending, running, rows = list(enumerate(jobs)), {}, {}
    while pending or running:
        free = [c for c in range(len(cpu_sets)) if c not in {slot for slot, *_ in running.values()}]
        while pending and free:
            k, (train_argv, run_dir) = pending.pop(0)
            slot = free.pop(0)
            cmd = [sys.executable, "-m", "fastvit_reduce.bench.e2e", "--child", path, "--train-dir",
                   args.train_dir, "--val-dir", args.val_dir, "--", *train_argv]
            log = open(run_dir.parent / f"{run_dir.name}.out", "w")
            proc = launch(cmd, cpus=cpu_sets[slot], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc.pid] = (slot, k, run_dir, log, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)  # rusage of that child (and what it waited for)
        if pid not in running:
            continue
        slot, k, run_dir, log, start = running.pop(pid)
        log.close()
        rows[k] = child_row(path, run_dir, log.name, os.waitstatus_to_exitcode(status),
                            time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
    return [rows[k] for k in range(len(jobs))]


def child_row(path: str, run_dir: Path, log: str, rc: int, wall: float, cpu: float) -> dict:
    """One run's row from its exit, times and run folder (None for what it did not report)."""
    row = dict(path=path, rc=rc, wall_s=wall, cpu_s=cpu, startup_s=None, ffcv_import_s=None, steady_img_s=None,
               data_wait_frac=None, top_1=None, jit_loaded=None, jit_compiled=None, log=log)
    marks = [line for line in Path(log).read_text(errors="replace").splitlines() if line.startswith(IMPORT_MARK)] \
        if Path(log).is_file() else []
    if marks:
        row["ffcv_import_s"] = float(marks[-1][len(IMPORT_MARK):])
    folder = RunFolder(run_dir)
    rows = folder.read_rows()
    steady = [r["train_img_s"] for r in rows if r.get("epoch", 0) >= 1 and r.get("train_img_s")] or \
             [r["train_img_s"] for r in rows if r.get("train_img_s")]
    row["steady_img_s"] = statistics.mean(steady) if steady else None
    final = folder.read_final() or {}
    row["startup_s"] = final.get("startup_s")  # the trainer's: process start -> ready to train
    row["data_wait_frac"] = final.get("data_wait_frac")
    row["top_1"] = final.get("final_top_1")
    jit = final.get("jit_cache") or {}
    row["jit_loaded"], row["jit_compiled"] = jit.get("loaded"), jit.get("compiled")
    return row


# ----------------------------------------------------------------------------- the benchmark
def write_betons(train_dir: str, val_dir: str, out_dir: str | Path, max_res: int,
                 workers: int = 0) -> tuple[dict, float]:
    """Write ``train_dir`` and ``val_dir`` (ImageFolder splits) to ``out_dir/{train,val}_<max_res>.beton``
    (long side stored at ``max_res`` px, ``workers`` writer processes, 0 = one per core); return
    ``({"train": path, "val": path}, seconds)``. ``UsageError`` names a split that cannot be written."""
    from fastvit_reduce.data.write import WriteError, write_split

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, start = {}, time.perf_counter()
    for split, folder in (("train", train_dir), ("val", val_dir)):
        folder = Path(folder).absolute()  # the writer reads data_dir/<split>/<class>/...
        paths[split] = str(out / f"{split}_{max_res}.beton")
        try:
            write_split(str(folder.parent), folder.name, paths[split], max_resolution=max_res, num_workers=workers)
        except WriteError as e:
            raise UsageError(f"writing {split}: {e}") from None
    return paths, time.perf_counter() - start


def summarise(rows: list[dict]) -> list[dict]:
    """Median of each column per path, plus an ``ours/timm`` row of ratios."""
    out = []
    for path in PATHS:
        mine = [r for r in rows if r["path"] == path]
        row = {"path": path, "runs": len(mine), "failed": sum(r["rc"] != 0 for r in mine)}
        for key, _ in COLUMNS[1:]:
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        out.append(row)
    ours, timm = out
    ratio = {"path": "ours/timm"}
    for key, _ in COLUMNS[1:]:
        a, b = ours[key], timm[key]
        ratio[key] = a / b if a is not None and b else None
    # timm's own train.py would not import ffcv, numba and cv2: its wall without that import
    fair = {"path": "ours/(timm-import)", **{key: None for key, _ in COLUMNS[1:]}}
    if ours["wall_s"] is not None and timm["wall_s"] and timm["ffcv_import_s"] is not None:
        fair["wall_s"] = ours["wall_s"] / (timm["wall_s"] - timm["ffcv_import_s"])
    return out + [ratio, fair]


def format_table(summary: list[dict], beton_s: float, title: str) -> str:
    """The summary as a fixed-width text table."""
    def cell(key, v):
        if v is None:
            return "-"
        if key == "path":
            return v
        return f"{v:.3f}" if key == "data_wait_frac" or v < 10 else f"{v:.1f}"
    lines = [title, f".beton write (once, not in the rows): {beton_s:.1f} s"]
    rows = [[h for _, h in COLUMNS]] + [[cell(k, r.get(k)) for k, _ in COLUMNS] for r in summary]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="fastvit-reduce bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("--train-dir", required=True, help="ImageFolder train split (one folder per class)")
    p.add_argument("--val-dir", required=True, help="ImageFolder val split")
    p.add_argument("--beton-dir", required=True, help="where the .beton files are written (once)")
    p.add_argument("--config", required=True, help="trainer YAML, e.g. rn_configs/sample/base.yaml")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per path, interleaved (default 1)")
    p.add_argument("--max-res", type=int, default=512, help="stored long side of the .beton images, px (default 512)")
    p.add_argument("--write-workers", type=int, default=0, help="writer processes (0 = one per core)")
    p.add_argument("--out", default=None, help="run folders (default: <beton-dir>/runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override, repeatable")
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat (a smoke test)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="CONFIG",
                   help="a strategy sweep instead of one run: ours trains these configs PAIRED in one "
                        "process, timm trains them one after the other (e.g. rn_configs/sample/"
                        "{baseline,thin,shallow,grouped}.yaml; --config still names the data recipe)")
    p.add_argument("--cpu-slots", type=int, default=1,
                   help="--sweep: processes at once, each pinned to 1/N of the cores: ours splits the "
                        "paired command over N processes (--pair-part), timm runs N of its runs at a time "
                        "(default 1: one process, all cores)")
    p.add_argument("--jit-cache", choices=("warm", "cold"), default="warm",
                   help="warm: ours children share a numba cache filled first by an untimed 1-epoch ours run "
                        "(a machine that ran the recipe before); cold: each ours child starts with an empty "
                        "cache and compiles (default warm)")
    p.add_argument("--json", action="store_true", help="print JSON (per-run rows and the summary)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        raise UsageError("bad arguments (see above)") if e.code else e
    if args.quick:
        args.epochs, args.repeats = 1, 1
    for name in ("epochs", "repeats", "max_res"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_dir", "val_dir"):
        if not Path(getattr(args, name)).is_dir():
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a folder")
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: file not found")
    for c in args.sweep or []:
        if not Path(c).is_file():
            raise UsageError(f"--sweep {c}: file not found")
    for s in args.set:
        if "=" not in s:
            raise UsageError(f"--set expects KEY=VALUE, got {s!r}")
    return args


def main(argv: list[str]) -> int:
    """``bench e2e`` (or, with ``--child``, one run inside a child process); returns the exit code."""
    if argv[:1] == ["--child"]:
        sep = argv.index("--")  # --child PATH --train-dir D --val-dir D -- TRAINER ARGS
        opts = dict(zip(argv[0:sep:2], argv[1:sep:2]))
        code = child_main(opts["--child"], argv[sep + 1:], opts["--train-dir"], opts["--val-dir"])
        # why _exit: the timm path forks its loader workers from the trainer's batch-ahead thread
        # in a process where ffcv has loaded numba's TBB layer; such a process can hang for ever
        # at exit in numba's unload_tbb (seen here, 1 run in 4 on one pinned core). Everything is
        # written by now: flush and leave without the interpreter's teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    try:
        args = parse(argv)
        betons, beton_s = write_betons(args.train_dir, args.val_dir, args.beton_dir, args.max_res,
                                       args.write_workers)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.beton_dir) / "runs").absolute()
    out.mkdir(parents=True, exist_ok=True)
    sets = {**{k: str(v) for k, v in SEED_RECIPE.items()}, **dict(s.split("=", 1) for s in args.set)}
    if args.sweep:
        return run_sweeps(args, betons, beton_s, out, sets)
    recipe = ["--config", args.config, f"--data.train_dataset={betons['train']}",
              f"--data.val_dataset={betons['val']}", "--logging.progress=0", *[f"--{k}={v}" for k, v in sets.items()]]
    try:
        prime_s = prime_jit_cache(args, out, recipe, [])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = []
    for r in range(args.repeats):
        for path in PATHS:  # interleaved: machine drift hits both paths alike
            name = f"{path}_r{r}"
            train_argv = [*recipe, f"--training.epochs={args.epochs}", f"--logging.folder={out}",
                          f"--logging.experiment={name}"]
            if (out / name).exists():  # a fresh run, not a resume of an earlier benchmark
                shutil.rmtree(out / name)
            rows.append(run_children(path, [(train_argv, out / name)], args, [[]],
                                     jit_dir=jit_cache_dir(args, out, name))[0])
            print(f"{name}: rc {rows[-1]['rc']}, {rows[-1]['wall_s']:.1f} s, numba pipelines loaded/compiled "
                  f"{rows[-1]['jit_loaded']}/{rows[-1]['jit_compiled']}, log {rows[-1]['log']}", file=sys.stderr)
    summary = summarise(rows)
    if args.json:
        print(json.dumps({"beton_write_s": beton_s, "jit_cache": args.jit_cache, "jit_prime_s": prime_s,
                          "epochs": args.epochs, "repeats": args.repeats, "runs": rows, "summary": summary},
                         indent=1))
    else:
        print(format_table(summary, beton_s, f"bench e2e: {args.config}, {args.epochs} epoch(s), "
                                             f"median of {args.repeats} run(s) per path"))
        print(jit_line(args, prime_s))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def jit_line(args, prime_s: float | None) -> str:
    """What the ours rows paid for numba's compilation of the ffcv pipelines."""
    if args.jit_cache == "cold":
        return "numba cache (--jit-cache cold): every ours run started empty and compiled its pipelines"
    return (f"numba cache (--jit-cache warm): filled first by an untimed 1-epoch ours run ({prime_s:.1f} s); "
            f"the ours rows loaded their pipelines from it")


def run_sweeps(args, betons: dict, beton_s: float, out: Path, sets: dict) -> int:
    """``--sweep``: K configs, interleaved per repeat, as rows:

    * ``ours``: the paired command, in one process (``--cpu-slots 1``) or split over N pinned
      processes (``--pair-part``);
    * ``timm``: timm's K ordinary runs one after the other, each on every core (the ordinary way);
    * ``timm xN`` (with ``--cpu-slots N``): timm's K runs N at a time, each pinned to its cores, as
      a user who knows the machine would run them.

    Prints wall and CPU seconds of each whole sweep, each run's top-1, and ours' ratios."""
    stems = [Path(c).stem for c in args.sweep]
    from fastvit_reduce.procs import split_cores
    try:
        cpu_sets = split_cores(args.cpu_slots, False) if args.cpu_slots > 1 else [[]]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slots = len(cpu_sets)
    rows_wanted = [("ours", "ours", cpu_sets), ("timm", "timm", [[]])]
    if slots > 1:
        rows_wanted.append((f"timm x{slots}", "timm", cpu_sets))
    data = [f"--data.train_dataset={betons['train']}", f"--data.val_dataset={betons['val']}", "--logging.progress=0",
            *[f"--{k}={v}" for k, v in sets.items()]]
    common = [*data, f"--training.epochs={args.epochs}"]
    try:  # the configs differ in strategy, not in data: one of them, on one slot's cores, fills the cache
        prime_s = prime_jit_cache(args, out, ["--config", args.sweep[0], *data], cpu_sets[0])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = []
    for r in range(args.repeats):
        for label, path, sets_ in rows_wanted:
            folder = out / f"{label.replace(' ', '_')}_sweep_r{r}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            start = time.perf_counter()
            if path == "ours":  # one paired command; with N core sets, its N parts at once
                argv = ["--config", args.sweep[0], "--pair-with", *args.sweep[1:], f"--logging.folder={folder}", *common]
                parts = min(len(sets_), len(stems))
                jobs = [([*argv, f"--pair-part={i}/{parts}"] if parts > 1 else argv, folder / f"part{i}")
                        for i in range(1, parts + 1)]
                runs = run_children(path, jobs, args, sets_[:parts], jit_dir=jit_cache_dir(args, out, folder.name))
            else:  # timm's K runs, len(sets_) of them at a time
                runs = run_children(path, [(["--config", c, f"--logging.folder={folder}", f"--logging.experiment={st}",
                                             *common], folder / st) for c, st in zip(args.sweep, stems)], args, sets_)
            wall = time.perf_counter() - start
            tops, jit = {}, {}
            for st in stems:
                final = RunFolder(folder / st).read_final() or {}
                tops[st], jit[st] = final.get("final_top_1"), final.get("jit_cache")
            results.append(dict(path=label, repeat=r, rc=max(x["rc"] for x in runs), wall_s=wall,
                                cpu_s=sum(x["cpu_s"] for x in runs), top_1=tops,
                                ffcv_import_s=sum(x["ffcv_import_s"] or 0.0 for x in runs),
                                jit_cache=jit))  # per config: its process's pipelines loaded/compiled
            print(f"{label} sweep r{r}: rc {results[-1]['rc']}, {wall:.1f} s", file=sys.stderr)
    labels = [label for label, _, _ in rows_wanted]
    med = {p: {k: statistics.median([x[k] for x in results if x["path"] == p]) for k in ("wall_s", "cpu_s")}
           for p in labels}
    ratios = {f"ours/{p}": {k: med["ours"][k] / med[p][k] for k in ("wall_s", "cpu_s")} for p in labels[1:]}
    # timm's runs one after the other, without the ffcv/numba/cv2 import each paid inside our trainer
    imports = statistics.median([x["ffcv_import_s"] for x in results if x["path"] == "timm"])
    ratios["ours/(timm-import)"] = {"wall_s": med["ours"]["wall_s"] / (med["timm"]["wall_s"] - imports),
                                    "cpu_s": med["ours"]["cpu_s"] / (med["timm"]["cpu_s"] - imports)}
    if args.json:
        print(json.dumps({"beton_write_s": beton_s, "jit_cache": args.jit_cache, "jit_prime_s": prime_s,
                          "epochs": args.epochs, "sweep": stems, "cpu_slots": slots,
                          "runs": results, "median": med, "ratio": ratios}, indent=1))
        return 0 if all(x["rc"] == 0 for x in results) else 1
    print(f"bench e2e --sweep: {len(stems)} configs, {args.epochs} epoch(s), median of {args.repeats}; "
          + ("ours = one paired process" if slots == 1 else
             f"ours = the paired command split over {min(slots, len(stems))} processes (--pair-part), "
             f"each pinned to its own core(s); timm x{slots} = its runs {slots} at a time, pinned alike")
          + "; timm = its runs one after the other")
    print(f".beton write (once, not in the rows): {beton_s:.1f} s")
    print(jit_line(args, prime_s))
    head = f"{'path':12} {'wall s':>8} {'CPU s':>8}  " + "  ".join(f"{st:>9}" for st in stems)
    print(head + "   (final top-1 %, last repeat)")
    for p in labels:
        last = [x for x in results if x["path"] == p][-1]["top_1"]
        print(f"{p:12} {med[p]['wall_s']:8.1f} {med[p]['cpu_s']:8.1f}  "
              + "  ".join(f"{'-' if last[st] is None else format(last[st], '.1f'):>9}" for st in stems))
    for name, ratio in ratios.items():
        print(f"{name:12} {ratio['wall_s']:8.3f} {ratio['cpu_s']:8.3f}")
    print(f"(timm's {len(stems)} runs in a row spent {imports:.1f} s importing ffcv, numba and cv2, which "
          "timm's train.py does not: the last ratio leaves that out)")
    return 0 if all(x["rc"] == 0 for x in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
