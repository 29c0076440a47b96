"""``sweep_summary.png``: accuracy against what each variant costs, and its difference from the baseline.

Top row, one point per experiment (the mean over its seeds, with the 95 % interval of that mean):
final top-1 against parameters, against the experiment's own compute time (its forward, backward
and optimizer steps: in a paired run the variants share one wall clock, so wall time would put
them all at one x) and against forward FLOPs x training images. Bottom row, per baseline and its
variants (``fastvit_reduce.differences``): each variant's difference in final and peak top-1 with
its paired and unpaired 95 % intervals, and the per-epoch difference curves with their band.

Readability rules: points are named by one legend outside the axes (no labels beside points to
collide, and the legend covers nothing); points that would be drawn on top of each other are
moved sideways by a few pixels (``dodge``), keeping their values on the axis they are read from.
"""
from __future__ import annotations

from pathlib import Path

from fastvit_reduce.differences import epoch_differences, find_groups, interval_rows
from fastvit_reduce.stats import mean_ci

MARKERS = "osD^vPX*<>hp"
MIN_GAP_PX = 13.0  # centres closer than this (pixels at the figure's 120 dpi; a marker is ~12) are dodged apart


def _color(i: int):
    import matplotlib
    return matplotlib.colormaps["tab10"](i % 10)


def experiment_points(rows: list[dict]) -> list[dict]:
    """One point per experiment with a final top-1: means over its seeds (runs of any status that
    have the number; the interval needs two seeds or more)."""
    points: dict[str, dict] = {}
    for r in rows:
        if r.get("final_top_1") is None:
            continue
        p = points.setdefault(r["experiment"], {"name": r["experiment"], "runs": []})
        p["runs"].append(r)
    for p in points.values():
        runs = p["runs"]
        p["top1"] = mean_ci([r["final_top_1"] for r in runs])
        for key in ("params", "compute_s"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            p[key] = sum(vals) / len(vals) if len(vals) == len(runs) else None
        flops = [r["gflops"] * r["train_images"] * 1e9 for r in runs if r.get("gflops") and r.get("train_images")]
        p["flops"] = sum(flops) / len(flops) if len(flops) == len(runs) else None
    return list(points.values())


def _scale(values: list[float], units: list[tuple[float, str]]) -> tuple[float, str]:
    """The largest unit (factor, name) that keeps the biggest value >= 1."""
    top = max(values) if values else 1.0
    for factor, name in units:
        if top >= factor:
            return factor, name
    return units[-1]


def dodge(ax, artists: list[tuple[list, tuple[float, float, float, float]]]) -> None:
    """Shift sideways, by whole steps of ``MIN_GAP_PX``, each point that would touch one already
    placed: closer than ``MIN_GAP_PX`` in x while their vertical extents (error bar, or the marker
    where there is none) overlap. ``artists``: (matplotlib artists of a point, (x, y, y_lo, y_hi)).
    Call after the layout is final (the axes' pixel size is used)."""
    from matplotlib.transforms import ScaledTranslation
    half = MIN_GAP_PX / 2  # a marker's half height, in pixels
    placed = []  # (x, lo, hi) in pixels
    for parts, (x, y, lo, hi) in artists:
        x0, y_lo = ax.transData.transform((x, lo))
        y_hi = ax.transData.transform((x, hi))[1]
        y_px = ax.transData.transform((x, y))[1]
        lo_px, hi_px = min(y_lo, y_px - half), max(y_hi, y_px + half)
        shift, k = 0.0, 0
        while any(abs(x0 + shift - px) < MIN_GAP_PX and lo_px < p_hi and p_lo < hi_px for px, p_lo, p_hi in placed):
            k += 1
            shift = MIN_GAP_PX * ((k + 1) // 2) * (1 if k % 2 else -1)  # +1, -1, +2, -2 steps
        placed.append((x0 + shift, lo_px, hi_px))
        if shift:
            offset = ScaledTranslation(shift / ax.figure.dpi, 0, ax.figure.dpi_scale_trans)
            for a in parts:
                a.set_transform(a.get_transform() + offset)


def _limits(ax, xs: list[float], ys: list[float]) -> None:
    """Axis limits with room for the dodged markers and the error bars."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
        setter(lo - pad, hi + pad)


def _errorbar(ax, x: float, ci: dict, **style) -> list:
    """One point with its interval (no bar for a single value); returns the artists drawn."""
    yerr = None if ci["lo"] is None else [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]
    c = ax.errorbar([x], [ci["mean"]], yerr=yerr, capsize=3, linestyle="none", **style)
    return [c.lines[0], *c.lines[1], *c.lines[2]]


def cost_panels(axes, points: list[dict], style: dict) -> list:
    """Top row: final top-1 against parameters, own compute time, FLOPs x images. Returns the
    (axes, [(artists, (x, y))]) pairs to dodge once the layout is final."""
    panels = [("params", [(1e6, "M"), (1e3, "k"), (1, "")], "parameters ({})", "accuracy vs parameters"),
              ("compute_s", [(3600, "h"), (60, "min"), (1, "s")], "own compute time ({}): forward, backward, "
               "optimizer", "accuracy vs compute time"),
              ("flops", [(1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1, "FLOP")],
               "forward FLOPs x training images ({})", "accuracy vs training FLOPs")]
    todo = []
    for ax, (key, units, xlabel, title) in zip(axes, panels):
        have = [p for p in points if p[key] is not None]
        factor, unit = _scale([p[key] for p in have], units)
        drawn, ys = [], []
        for p in have:
            x = p[key] / factor
            ci = p["top1"]
            lo, hi = (ci["mean"], ci["mean"]) if ci["lo"] is None else (ci["lo"], ci["hi"])
            drawn.append((_errorbar(ax, x, ci, **style[p["name"]]), (x, ci["mean"], lo, hi)))
            ys += [v for v in (p["top1"]["lo"], p["top1"]["hi"], p["top1"]["mean"]) if v is not None]
        missing = len(points) - len(have)
        ax.set_title(title + (f" ({missing} without it)" if missing else ""), fontsize=10)
        ax.set_xlabel(xlabel.format(unit).replace(" ()", ""), fontsize=9)
        ax.set_ylabel("final top-1 (%)", fontsize=9)
        ax.grid(alpha=0.3)
        if have:
            _limits(ax, [pt[0] for _, pt in drawn], ys)
        todo.append((ax, drawn))
    return todo


def difference_panels(ax_ci, ax_epoch, groups, style: dict) -> bool:
    """Bottom row: Δ final/peak top-1 with paired (solid) and unpaired (light) intervals, and the
    per-epoch Δ top-1 curves with the paired band. False when there is nothing to compare."""
    from matplotlib.ticker import MaxNLocator
    ticks, labels, x, any_curve = [], [], 0, False
    shown, full = [0.0], [0.0]  # y values the epoch panel must show (means, last bands) / all of it
    several = len(groups) > 1
    for g in groups:
        rows = {(r["variant"], r["key"]): r for r in interval_rows(g)}
        for name in g.variants:
            if (name, "final_top_1") not in rows:
                continue
            for dx, key, filled in ((-0.17, "final_top_1", True), (0.17, "best_top_1", False)):
                r = rows.get((name, key))
                if r is None:
                    continue
                st = dict(style[name])
                if not filled:
                    st.update(markerfacecolor="white")
                if r["paired"] is not None:
                    _errorbar(ax_ci, x + dx, r["paired"], **st)
                if r["unpaired"]["lo"] is not None:  # beside the paired one, light
                    _errorbar(ax_ci, x + dx + 0.09, r["unpaired"], color=st["color"], alpha=0.35,
                              marker="_", markersize=8, elinewidth=1.0)
            ticks.append(x)
            labels.append(f"{name} - {g.baseline}" if several else name)
            x += 1
            curve = epoch_differences(g, name, "eval_top1")
            if curve:
                any_curve = True
                es = list(curve)
                means = [c["mean"] for c in curve.values()]
                ax_epoch.plot(es, means, color=style[name]["color"], marker=style[name]["marker"], markersize=5)
                shown += means
                if all(c["lo"] is not None for c in curve.values()):
                    los, his = [c["lo"] for c in curve.values()], [c["hi"] for c in curve.values()]
                    ax_epoch.fill_between(es, los, his, color=style[name]["color"], alpha=0.15, linewidth=0)
                    shown += [los[-1], his[-1]]
                    full += los + his
    if not ticks:
        return False
    seeds = max(len(g.common_seeds(v)) for g in groups for v in g.variants)
    base = groups[0].baseline if not several else "baseline"
    for ax in (ax_ci, ax_epoch):
        ax.axhline(0, color="gray", linewidth=1, linestyle="--")
        ax.grid(alpha=0.3)
    ax_ci.set_xticks(ticks, labels, rotation=20 if len(ticks) > 4 else 0, fontsize=9)
    ax_ci.set_xlim(-0.6, len(ticks) - 0.4)
    ax_ci.set_ylabel(f"Δ top-1 vs {base} (points)", fontsize=9)
    ax_ci.set_title(f"difference from {base}: final (filled), peak (hollow); {seeds} seed{'s' if seeds != 1 else ''}",
                    fontsize=10)
    ax_epoch.set_xlabel("epoch", fontsize=9)
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epoch.set_ylabel(f"Δ top-1 vs {base} (points)", fontsize=9)
    title = "per-epoch difference (mean over seeds, 95 % band)" if any_curve else "per-epoch difference"
    if min(full) < min(shown) or max(full) > max(shown):
        # why: with 3 seeds the early bands are several times wider than the last epoch's and
        # would flatten the curves; the axis shows every mean and the final band
        pad = 0.1 * (max(shown) - min(shown) or 1.0)
        ax_epoch.set_ylim(min(shown) - pad, max(shown) + pad)
        title += "; wider early bands run past the axis"
    ax_epoch.set_title(title, fontsize=10)
    return True


def summary_figure(rows: list[dict], baseline: str | None = None):
    """The figure (matplotlib), or None when no run has a final top-1."""
    points = experiment_points(rows)
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")  # why: headless machines and CI have no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups, _ = find_groups(rows, baseline)
    names = list(dict.fromkeys([p["name"] for p in points] + [n for g in groups for n in (g.baseline, *g.variants)]))
    style = {n: dict(color=_color(i), marker=MARKERS[i % len(MARKERS)], markersize=7) for i, n in enumerate(names)}
    fig = plt.figure(figsize=(15, 8.4 if groups else 4.4), dpi=120, layout="constrained")
    grid = fig.add_gridspec(2 if groups else 1, 6)
    top = [fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3)]
    todo = cost_panels(top, points, style)
    if groups:
        ax_ci, ax_epoch = fig.add_subplot(grid[1, :3]), fig.add_subplot(grid[1, 3:])
        if not difference_panels(ax_ci, ax_epoch, groups, style):
            ax_ci.remove()
            ax_epoch.remove()
    seeds = {len(p["runs"]) for p in points}
    handles = [Line2D([], [], linestyle="none", label=n, **style[n]) for n in names]
    handles += [Line2D([], [], color="gray", marker="|", linestyle="none", markersize=12,
                       label="bars: 95 % interval" + (" over seeds" if max(seeds) > 1 else "")),
                Line2D([], [], color="gray", alpha=0.35, marker="_", markersize=10, linestyle="none",
                       label="light: unpaired (Welch)")] if groups else []
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    fig.canvas.draw()  # why: the layout must be final before points are dodged in pixels
    for ax, drawn in todo:
        dodge(ax, drawn)
    return fig


def plot(rows: list[dict], path: str | Path, baseline: str | None = None) -> bool:
    """Write ``summary_figure`` to ``path``; False (no file) when no run has a final top-1."""
    fig = summary_figure(rows, baseline)
    if fig is None:
        return False
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
