"""Each variant's difference from its baseline: over seeds with 95 % intervals, and per epoch.

"Is this difference real?" With 120 val images one image is 0.83 points, so a point or two
between strategies can be noise. The answer is the spread over seeds:

* **paired by seed**: for each seed s, d_s = variant(s) - baseline(s); the t-interval of the mean of
  the d_s (``stats.paired_ci``). Runs of one seed share the initial weights (where the strategy
  starts from the full model), the batch order and every augmentation draw (all seeded from
  ``training.seed``), and a ``--paired`` run also the very same decoded batches, so most of the
  noise cancels in d_s;
* **unpaired** (Welch, ``stats.unpaired_ci``) beside it: what the same runs would say if nothing
  was shared; a wider interval than the paired one is the pairing at work.

A **group** is a baseline and its variants: the runs of one ``--paired`` command (``params.json``
``pair``; baseline = its first config), or, for separate runs, the experiment whose strategy is
``baseline`` (or ``report --baseline NAME``) with every other experiment. A variant's runs are
matched to the baseline's by seed (``training.seed``), so a sweep with ``--seeds`` gives one
value per seed. Only finished runs count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastvit_reduce.stats import format_ci, mean_ci, paired_ci, spans_zero, unpaired_ci

# (label, summary row key, higher is better, digits)
METRICS = [("final top-1 %", "final_top_1", True, 2), ("peak top-1 %", "best_top_1", True, 2),
           ("final val loss", "final_eval_loss", False, 4), ("final train loss", "final_train_loss", False, 4)]
EPOCH_METRICS = [("Δtop-1", "eval_top1", 2), ("Δloss", "train_loss", 4)]  # per-epoch table: log.jsonl keys


@dataclass
class Group:
    """A baseline and the variants compared with it; ``runs[experiment][seed]`` is a report row."""
    baseline: str
    variants: list[str]
    runs: dict[str, dict] = field(default_factory=dict)
    paired: bool = False  # trained in one process on the same batches

    def seeds(self, name: str) -> list:
        return sorted(self.runs.get(name, {}), key=lambda s: (s is None, s))

    def common_seeds(self, name: str) -> list:
        base = set(self.runs.get(self.baseline, {}))
        return [s for s in self.seeds(name) if s in base]


def find_groups(rows: list[dict], baseline: str | None = None) -> tuple[list[Group], list[str]]:
    """Groups of the finished runs in ``rows`` and notes on what was left out (and why)."""
    notes, done, seen = [], [], {}
    for r in rows:
        if r.get("status") != "done":
            continue
        key = (r["experiment"], r.get("seed"))
        if key in seen:
            notes.append(f"{r['experiment']} seed {r.get('seed')} appears twice ({seen[key]}, {r['run_dir']}); "
                         "the first one is compared (report the two sweeps separately)")
            continue
        seen[key] = r["run_dir"]
        done.append(r)
    groups, grouped = [], set()
    for r in done:
        pair = r.get("_pair") or {}
        names = tuple(pair.get("variants") or ())
        if len(names) > 1 and not any(g.paired and (g.baseline, *g.variants) == names for g in groups):
            base = pair.get("baseline") or names[0]
            groups.append(Group(base, [n for n in names if n != base], paired=True))
            grouped.update(names)
    rest = list(dict.fromkeys(r["experiment"] for r in done if r["experiment"] not in grouped))
    if rest:
        if baseline is None:
            bases = list(dict.fromkeys(r["experiment"] for r in done
                                       if r["experiment"] in rest and r.get("strategy") == "baseline"))
            baseline = bases[0] if len(bases) == 1 else None
            if len(bases) > 1 and len(rest) > 1:
                notes.append(f"several baseline runs ({', '.join(bases)}): choose one with --baseline NAME "
                             "to compare the separate runs")
        if baseline in rest and len(rest) > 1:
            groups.append(Group(baseline, [n for n in rest if n != baseline]))
    for g in groups:
        for r in done:
            if r["experiment"] in (g.baseline, *g.variants):
                g.runs.setdefault(r["experiment"], {})[r.get("seed")] = r
    return [g for g in groups if g.baseline in g.runs and any(v in g.runs for v in g.variants)], notes


# ----------------------------------------------------------------------------- over seeds
def reading(ci: dict | None, seeds: int) -> str:
    """The interval in words: does it exclude 0, and which way."""
    if ci is None or ci.get("lo") is None:
        return f"{seeds} seed{'s' if seeds != 1 else ''}: no interval (sweep --seeds 1,2,3)"
    if spans_zero(ci):
        return "spans 0: could be noise"
    return "higher (excludes 0)" if ci["mean"] > 0 else "lower (excludes 0)"


def interval_rows(group: Group) -> list[dict]:
    """Per variant and metric: the means, the paired and the unpaired interval of the difference."""
    out = []
    base_runs = group.runs[group.baseline]
    for name in group.variants:
        runs = group.runs.get(name)
        if not runs:
            continue
        for label, key, better_up, digits in METRICS:
            base_vals = {s: r[key] for s, r in base_runs.items() if r.get(key) is not None}
            vals = {s: r[key] for s, r in runs.items() if r.get(key) is not None}
            if not base_vals or not vals:
                continue
            common = [s for s in group.common_seeds(name) if s in base_vals and s in vals]
            paired = paired_ci([vals[s] for s in common], [base_vals[s] for s in common]) if common else None
            unpaired = unpaired_ci(list(vals.values()), list(base_vals.values()))
            # words for the paired interval when there is one, else for the unpaired one
            judged = next((c for c in (paired, unpaired) if c is not None and c["lo"] is not None), paired)
            out.append({"variant": name, "metric": label, "key": key, "higher_is_better": better_up,
                        "digits": digits, "baseline_mean": mean_ci(list(base_vals.values()))["mean"],
                        "variant_mean": mean_ci(list(vals.values()))["mean"], "seeds": common,
                        "paired": paired, "unpaired": unpaired,
                        "reading": reading(judged, max(len(common), min(len(vals), len(base_vals))))})
    return out


def _ci_text(ci: dict | None, digits: int) -> str:
    if ci is None:
        return "–"
    if ci["lo"] is None:
        return f"{ci['mean']:+.{digits}f}"
    return format_ci(ci, digits)


def _table(head: list[str], lines: list[list[str]], right: range) -> list[str]:
    """Markdown table; the columns in ``right`` are right-aligned (numbers), the others left."""
    widths = [max(len(line[i]) for line in [head, *lines]) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths))) + " |"
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(line) for line in lines]


def _seed_words(seeds: list) -> str:
    shown = [str(s) for s in seeds if s is not None]
    return f"seed{'s' if len(shown) != 1 else ''} {', '.join(shown)}" if shown else "one seed"


def intervals_table(group: Group) -> str:
    """The over-seeds comparison of one group as Markdown, with its header line."""
    rows = interval_rows(group)
    if not rows:
        return ""
    base_runs = group.runs[group.baseline]
    head_row = next(iter(base_runs.values()))
    val = head_row.get("val_images")
    image = f"; val set {val} images, one image = {100 / val:.2f} points" if val else ""
    how = "paired: same seed and the same batches" if group.paired else "paired by seed (same seed, separate runs)"
    lines = [f"\ndifferences from {group.baseline} over {_seed_words(group.seeds(group.baseline))} "
             f"(mean, 95 % t-interval over seeds; {how}; unpaired = Welch; top-1 in points, headline = "
             f"{head_row.get('headline') or 'raw'} model{image}):\n"]
    body = [[r["variant"], r["metric"], f"{r['baseline_mean']:.{r['digits']}f}", f"{r['variant_mean']:.{r['digits']}f}",
             _ci_text(r["paired"], r["digits"]), _ci_text(r["unpaired"], r["digits"]), r["reading"]] for r in rows]
    lines += _table(["variant", "metric", group.baseline, "variant", "Δ paired [95 %]", "Δ unpaired [95 %]",
                     "reading"], body, right=range(2, 6))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- per epoch
def epoch_differences(group: Group, name: str, key: str) -> dict[int, dict]:
    """``{epoch: mean_ci of variant - baseline over the common seeds}`` for log.jsonl ``key``."""
    by_epoch: dict[int, list[float]] = {}
    for seed in group.common_seeds(name):
        base = {x["epoch"]: x for x in group.runs[group.baseline][seed]["_rows"]}
        for x in group.runs[name][seed]["_rows"]:
            b = base.get(x["epoch"], {})
            if x.get(key) is not None and b.get(key) is not None:
                by_epoch.setdefault(x["epoch"], []).append(x[key] - b[key])
    return {e: mean_ci(d) for e, d in sorted(by_epoch.items())}


def epoch_table(group: Group) -> str:
    """Per epoch: each variant's top-1 and train loss minus the baseline's (mean over seeds,
    ± the half-width of its 95 % interval with several seeds)."""
    names = [n for n in group.variants if group.common_seeds(n)]
    if not names:
        return ""
    curves = {(n, key): epoch_differences(group, n, key) for n in names for _, key, _ in EPOCH_METRICS}
    epochs = sorted({e for c in curves.values() for e in c})
    seeds = group.common_seeds(names[0])
    what = "same batches" if group.paired else "separate runs"
    spread = "; ± half-width of the 95 % interval over seeds" if len(seeds) > 1 else ""
    head = ["epoch"] + [f"{n} {label}" for label, _, _ in EPOCH_METRICS for n in names]
    body = []
    for e in epochs:
        cells = [str(e)]
        for _, key, digits in EPOCH_METRICS:
            for n in names:
                ci = curves[(n, key)].get(e)
                if ci is None:
                    cells.append("–")
                elif ci["lo"] is None:
                    cells.append(f"{ci['mean']:+.{digits}f}")
                else:
                    cells.append(f"{ci['mean']:+.{digits}f} ±{(ci['hi'] - ci['lo']) / 2:.{digits}f}")
        body.append(cells)
    headline = next(iter(group.runs[group.baseline].values())).get("headline") or "raw"
    lines = [f"\nper-epoch differences vs {group.baseline} ({what}; {_seed_words(seeds)}; top-1 in points, "
             f"headline = {headline} model; train loss{spread}):\n"]
    return "\n".join(lines + _table(head, body, right=range(len(head)))) + "\n"


def comparison_text(rows: list[dict], baseline: str | None = None) -> str:
    """Everything ``report`` prints below its run table: per group the interval table, then the
    per-epoch differences; then notes on runs left out."""
    groups, notes = find_groups(rows, baseline)
    parts = [intervals_table(g) + epoch_table(g) for g in groups]
    if notes:
        parts.append("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "".join(parts)
