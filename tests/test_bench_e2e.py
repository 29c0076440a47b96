"""fastvit_reduce.bench.e2e (``fastvit-reduce bench e2e``): the summary's ratios and a bad folder.
The command's real runs (child processes): tests/e2e/test_bench.py."""
from __future__ import annotations

from fastvit_reduce.bench.e2e import summarise


def test_summary_ratios():
    rows = [dict(path=p, rc=0, wall_s=w, startup_s=s, ffcv_import_s=f, steady_img_s=i, cpu_s=c,
                 data_wait_frac=d, top_1=t)
            for p, w, s, f, i, c, d, t in [("ours", 10.0, 2.0, 3.0, 100.0, 18.0, 0.02, 80.0),
                                           ("ours", 12.0, 2.0, 3.0, 110.0, 20.0, 0.04, 82.0),
                                           ("timm", 20.0, 4.0, 4.0, 50.0, 30.0, None, 84.0)]]
    ours, timm, ratio, fair = summarise(rows)
    assert ours["wall_s"] == 11.0 and ours["runs"] == 2 and timm["data_wait_frac"] is None
    assert ratio["path"] == "ours/timm" and ratio["wall_s"] == 11.0 / 20.0 and ratio["data_wait_frac"] is None
    # timm's wall without the ffcv import it paid only because it ran inside our trainer
    assert fair["path"] == "ours/(timm-import)" and fair["wall_s"] == 11.0 / 16.0 and fair["cpu_s"] is None


def test_bad_folder_is_one_line(tmp_path, capsys):
    from fastvit_reduce.bench.e2e import main
    rc = main(["--train-dir", str(tmp_path / "nope"), "--val-dir", str(tmp_path), "--beton-dir", str(tmp_path),
               "--config", "rn_configs/sample/base.yaml"])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: --train-dir {tmp_path / 'nope'} is not a folder"
