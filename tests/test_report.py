"""fastvit_reduce.report: the sweep report from synthetic run folders (final.json / params.json / log.jsonl as the trainer writes)."""
from __future__ import annotations

import csv
import json

from PIL import Image

from fastvit_reduce import report


def fake_run(root, name, strategy, params, top1, ema=None, completed=True, final=True, knobs=None):
    run = root / name
    run.mkdir(parents=True)
    config = {"reduction.strategy": strategy, **{f"reduction.{k}": v for k, v in (knobs or {}).items()}}
    (run / "params.json").write_text(json.dumps({"config": config, "world_size": 1}))  # trainer's layout
    log = [dict(epoch=e, train_loss=2.0 - e, eval_top1=top1 - 5 + 5 * e, eval_top5=90.0,
                raw_top_1=top1 - 5 + 5 * e, ema_top_1=ema, epoch_time_s=30.0) for e in range(2)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"epoch": 2, "top')
    if final:
        (run / "final.json").write_text(json.dumps(dict(
            experiment=name, strategy=strategy, arch="vit_tiny_patch16_224", img_size=64, epochs=2,
            params=params, mlp_params=params // 2, gflops=0.0123, top_1=top1, best_top_1=top1, final_top_1=top1,
            headline="ema" if ema else "raw", raw_best_top_1=top1 - 1, raw_final_top_1=top1 - 1,
            best_ema_top_1=ema, final_ema_top_1=ema, total_time_s=61.0, train_img_s=150.0,
            data_wait_frac=0.05, completed=completed)))
    return run


def test_report_writes_csv_md_png_from_a_folder_of_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "baseline", "baseline", 450_000, 60.0, ema=61.5)
    fake_run(runs, "thin", "thin", 300_000, 55.0, knobs={"mlp_ratio": 2.0, "keep_ratio": 0.5})
    fake_run(runs, "killed", "grouped", 0, 40.0, final=False, knobs={"scale": 0.707, "group_size": 2})
    (runs / "not_a_run").mkdir()

    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep_summary.csv")))
    assert [r["experiment"] for r in rows] == ["baseline", "killed", "thin"]
    base, killed, thin = rows
    assert base["params"] == "450000" and base["best_ema_top_1"] == "61.5" and base["status"] == "done"
    assert thin["knobs"] == "mlp_ratio=2.0" and thin["best_ema_top_1"] == ""
    # no final.json: best so far from log.jsonl (torn last line ignored), marked incomplete
    assert killed["status"] == "incomplete" and killed["best_top_1"] == "40.0"
    assert killed["epochs_done"] == "2" and "| 2/– " in printed
    assert killed["knobs"] == "scale=0.707 group_size=2"

    md = (tmp_path / "out" / "sweep_summary.md").read_text()
    assert md in printed
    header, _, *body = md.splitlines()
    assert "GFLOPs/img" in header and "raw top-1 %" in header and "data wait" in header
    assert "| 60.0 (EMA) " in body[0] and "59.0" in body[0]  # headline EMA, raw beside it
    assert "| thin " in body[2] and "0.30M" in body[2] and "55.0" in body[2] and "5%" in body[2]
    assert any(line.startswith("- killed: incomplete") for line in body)
    with Image.open(tmp_path / "out" / "sweep_summary.png") as im:
        assert im.size[0] > 600


def test_report_default_out_is_parent_and_errors_are_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "sweep", "baseline", "baseline", 1000, 10.0)
    assert report.main([str(run)]) == 0
    assert (tmp_path / "sweep" / "sweep_summary.md").is_file()
    capsys.readouterr()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path / "sweep" / "baseline" / "..")]) == 0
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error:") and "no such folder" in err[0]
    assert err[-1].startswith("error:") and "no run folders" in err[-1]
    # a shell glob over a sweep folder also hits logs/ and the summary files: skipped
    (tmp_path / "sweep" / "logs").mkdir()
    assert report.main(sorted(str(p) for p in (tmp_path / "sweep").iterdir())) == 0
    assert "skipping" in capsys.readouterr().err


def test_failed_rows_from_the_sweep_are_listed_with_their_log(tmp_path):
    row = {c: None for c in report.CSV_COLUMNS}
    row.update(experiment="bad", strategy="thin", knobs="", status="failed (exit 2)",
               log="/x/bad.log")
    table = report.write_summary([row], tmp_path)
    assert "- bad: failed (exit 2) — log: /x/bad.log" in table
    assert not (tmp_path / "sweep_summary.png").exists()  # nothing to plot


# ----------------------------------------------------------------------------- seeds and intervals
PAIR = ["baseline", "thin", "shallow", "grouped"]
BASE_TOP1 = {0: 80.0, 1: 82.0, 2: 81.0}
DIFFS = {"baseline": [0, 0, 0], "thin": [1.0, 1.2, 1.1],  # paired interval excludes 0, Welch's does not
         "shallow": [1.3, 0.9, 1.1],                    # same mean and params as thin: one point, dodged
         "grouped": [-1.0, 1.0, 0.5]}                   # spans 0
PARAMS = {"baseline": 267_852, "thin": 193_548, "shallow": 193_548, "grouped": 193_356}
COMPUTE = {"baseline": 40.0, "thin": 29.0, "shallow": 30.0, "grouped": 39.0}
GFLOPS = {"baseline": 0.04, "thin": 0.0304, "shallow": 0.0304, "grouped": 0.04}


def fake_paired_sweep(out, seeds=(0, 1, 2)):
    """A ``sweep --paired --seeds`` folder as the trainer writes it: OUT/seed_S/<variant>/."""
    for seed in seeds:
        for i, name in enumerate(PAIR):
            run = out / f"seed_{seed}" / name
            run.mkdir(parents=True)
            top1 = BASE_TOP1[seed] + DIFFS[name][seed]
            config = {"reduction.strategy": name, "training.seed": seed}
            (run / "params.json").write_text(json.dumps({"config": config, "world_size": 1,
                                                         "pair": {"variants": PAIR, "baseline": "baseline"}}))
            log = [dict(epoch=e, train_loss=2.0 - e / 4 - 0.01 * i, eval_loss=1.0 - e / 10 + 0.001 * i,
                        eval_top1=top1 - 3 + e, val_images=120, compute_s=COMPUTE[name] / 4, train_images=480)
                   for e in range(4)]
            (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
            (run / "final.json").write_text(json.dumps(dict(
                experiment=name, strategy=name, params=PARAMS[name], gflops=GFLOPS[name], epochs=4,
                top_1=top1, best_top_1=top1, final_top_1=top1, headline="ema", total_time_s=100.0,
                compute_s=COMPUTE[name], train_images=1920, completed=True,
                paired_with=[p for p in PAIR if p != name])))


def test_report_gives_intervals_over_seeds_and_says_when_they_span_zero(tmp_path, capsys):
    out = tmp_path / "sweep"
    fake_paired_sweep(out)
    assert report.main([str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "sweep_summary.csv")))
    assert len(rows) == 12 and {r["seed"] for r in rows} == {"0", "1", "2"}
    assert "differences from baseline over seeds 0, 1, 2" in printed and "one image = 0.83 points" in printed
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in printed.splitlines()
             if line.startswith("| ") and "top-1" in line or "loss" in line}
    thin = lines[("thin", "final top-1 %")]
    assert "+1.10 [+0.85, +1.35]" in thin and "higher (excludes 0)" in thin  # t(2) = 4.303, sd 0.1
    assert "spans 0" not in thin and "[-" in thin.split("+1.10 [+0.85, +1.35]")[1]  # Welch's spans 0
    assert "spans 0: could be noise" in lines[("grouped", "final top-1 %")]
    assert "lower (excludes 0)" in lines[("thin", "final train loss")]
    # per-epoch differences: mean over seeds with the half-width of the interval
    assert "per-epoch differences vs baseline (same batches; seeds 0, 1, 2" in printed
    assert "+1.10 ±0.25" in printed


def test_one_seed_says_there_is_no_interval(tmp_path, capsys):
    fake_paired_sweep(tmp_path / "sweep", seeds=(0,))
    assert report.main([str(tmp_path / "sweep" / "seed_0")]) == 0
    printed = capsys.readouterr().out
    assert "1 seed: no interval (sweep --seeds 1,2,3)" in printed and "| seed " not in printed


def test_separate_runs_compare_with_the_baseline_strategy_or_the_one_named(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "base", "baseline", 450_000, 60.0)
    fake_run(runs, "thin", "thin", 300_000, 55.0)
    assert report.main([str(runs)]) == 0
    assert "differences from base over one seed" in capsys.readouterr().out
    assert report.main([str(runs), "--baseline", "thin"]) == 0
    assert "differences from thin" in capsys.readouterr().out


def test_plot_labels_never_overlap_and_the_legend_covers_no_point(tmp_path):
    from fastvit_reduce import plots
    fake_paired_sweep(tmp_path / "sweep")
    rows = [report.load_run(r) for r in report.find_runs([tmp_path / "sweep"])]
    fig = plots.summary_figure(rows)
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    cost_axes, ci_axes, epoch_axes = fig.axes[:3], fig.axes[3], fig.axes[4]
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    for ax in [*cost_axes, ci_axes]:  # every point drawn apart from every other
        centres = [line.get_transform().transform(xy) for line in ax.get_lines()
                   if line.get_marker() not in ("", "None", "_") for xy in line.get_xydata()]  # '_': caps
        assert len(centres) >= 4
        gaps = [((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5
                for i, a in enumerate(centres) for b in centres[i + 1:]]
        assert min(gaps) >= plots.MIN_GAP_PX - 0.5, ax.get_title()
        labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    for ax in cost_axes:  # and no error bar runs through another point's bar
        bars = [c.get_transform().transform(seg) for c in ax.collections for seg in c.get_segments()]
        for i, a in enumerate(bars):
            for b in bars[i + 1:]:
                close = abs(a[0][0] - b[0][0]) < plots.MIN_GAP_PX - 0.5
                assert not (close and a[:, 1].min() < b[:, 1].max() and b[:, 1].min() < a[:, 1].max()), ax.get_title()
    # each cost axis varies across the variants (the time axis is each variant's own compute time)
    assert "compute time" in cost_axes[1].get_title() and len(epoch_axes.get_lines()) >= 3
    xs = {float(line.get_xdata()[0]) for line in cost_axes[1].get_lines() if line.get_marker() != "_"}
    assert len(xs) == 4
    plots.plot(rows, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 1200
