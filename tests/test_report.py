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
