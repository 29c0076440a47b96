"""``fastvit-reduce sweep`` on CPU for real: torchrun + the trainer per job; a bad config fails
alone, finished runs are skipped, SIGINT stops the job (last.pt) and the re-run resumes it."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

from fastvit_reduce import sweep

SAMPLE_CONFIGS = Path(__file__).resolve().parents[2] / "rn_configs" / "sample"
TINY = ["model.img_size=32", "model.num_classes=4", "training.epochs=1", "training.batch_size=16",
        "validation.batch_size=16", "data.num_workers=1", "data.rrc_scale=0.35,1", "resolution.min_res=32",
        "resolution.max_res=32"]


def test_cpu_sweep_reports_every_run_survives_a_bad_config_and_skips_finished(tmp_path, tiny_beton, capsys):
    train = tiny_beton("train.beton", n=64, num_classes=4, size=48)
    val = tiny_beton("val.beton", n=16, num_classes=4, size=48, seed=1)
    (tmp_path / "broken.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'baseline.yaml'}\n"
                                          "training:\n  epochz: 1\n")  # misspelled key
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\n")
    out = tmp_path / "runs"
    args = ["--out", str(out), "--set", f"data.train_dataset={train}", "--set", f"data.val_dataset={val}"]
    args += [a for kv in TINY for a in ("--set", kv)]

    rc = sweep.main([str(tmp_path / "broken.yaml"), str(tmp_path / "thin.yaml")] + args)
    printed = capsys.readouterr().out
    assert rc == 1, printed
    rows = list(csv.DictReader(open(out / "sweep_summary.csv")))
    assert [r["experiment"] for r in rows] == ["broken", "thin"]  # config order, failed run kept
    broken, thin = rows
    assert broken["status"].startswith("failed") and "epochz" in broken["status"]
    assert "epochz" in Path(broken["log"]).read_text()
    assert thin["status"] == "done" and thin["strategy"] == "thin" and thin["knobs"] == "mlp_ratio=1.5"
    assert thin["epochs"] == "1" and 0 <= float(thin["best_top_1"]) <= 100 and int(thin["params"]) > 0
    assert (out / "thin" / "final.json").is_file() and (out / "logs" / "thin.log").is_file()
    md = (out / "sweep_summary.md").read_text()
    assert md in printed and str(out / "logs" / "broken.log") in md
    assert "- broken: failed (exit 2): error: configuration error: unknown key" in md
    assert (out / "sweep_summary.png").is_file()

    stamp = (out / "thin" / "final.json").stat().st_mtime_ns
    assert sweep.main([str(tmp_path / "thin.yaml")] + args) == 0  # finished run: skipped, no job
    assert "skip thin: already complete" in capsys.readouterr().out
    assert (out / "thin" / "final.json").stat().st_mtime_ns == stamp
    assert "| thin " in (out / "sweep_summary.md").read_text()
    # a changed config or --set is not skipped (the trainer then names what changed)
    job = sweep.make_jobs([str(tmp_path / "thin.yaml")], out)[0]
    overrides = args[3::2]
    assert sweep.can_skip(job, out, overrides) and not sweep.can_skip(job, out, overrides + ["training.seed=1"])
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\nreduction:\n  mlp_ratio: 1.0\n")
    assert not sweep.can_skip(job, out, overrides)


def test_interrupted_sweep_stops_its_job_and_the_rerun_resumes_it(tmp_path, tiny_beton):
    """SIGINT to the sweep reaches the trainer as SIGTERM (last.pt, exit 124); re-running resumes."""
    train = tiny_beton("train.beton", n=64, num_classes=4, size=48)
    (tmp_path / "thin.yaml").write_text(f"base: {SAMPLE_CONFIGS / 'thin.yaml'}\n")
    out = tmp_path / "runs"
    overrides = [kv for kv in TINY if not kv.startswith(("training.epochs", "validation."))]
    # 10 epochs (4 steps each): SIGINT comes right after epoch 0, the rest is the re-run's to do
    overrides += ["training.epochs=10", f"data.train_dataset={train}", "data.val_dataset="]
    cmd = [sys.executable, "-m", "fastvit_reduce.cli", "sweep", str(tmp_path / "thin.yaml"), "--out", str(out)]
    cmd += [a for kv in overrides for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the first epoch is logged, then interrupt
        if "epoch 0: loss" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 124, rest
    assert "stopped by signal 15" in rest and "thin: stopped — re-run the sweep to resume" in rest
    assert (out / "thin" / "last.pt").is_file() and not sweep.is_complete(out / "thin")

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "start thin (resuming from last.pt)" in again.stdout
    assert sweep.is_complete(out / "thin")
    epochs = [json.loads(line)["epoch"] for line in open(out / "thin" / "log.jsonl")]
    assert epochs == list(range(10))  # no epoch trained twice, none missing
