"""bench eval: one run's weights through our .beton val loader and timm's ImageFolder loader.

A tiny sample ImageFolder (4 classes of 64-96 px photos) is written to .beton files, a test_vit
trains one epoch on them, and ``fastvit-reduce bench eval`` (a child process, as users run it)
evaluates its last.pt both ways. The ours column must equal the trainer's own final evaluation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvit_reduce.data.write import write_split
from fastvit_reduce.sample import build_sample

REPO = Path(__file__).resolve().parent.parent
CONFIG = """\
base: {base}
data: {{train_dataset: {train}, val_dataset: {val}, num_workers: 1, batches_ahead: 1, rrc_scale: [0.25, 1.0]}}
resolution: {{min_res: 32, max_res: 32, step: 8}}
model: {{arch: test_vit, num_classes: 4, img_size: 32, patch_size: 8}}
augment: {{randaugment: '', mixup: 0, cutmix: 0, reprob: 0, aug_repeats: 1}}
training: {{epochs: 1, batch_size: 8, global_batch: 0, amp: 'off', device: cpu, channels_last: 0}}
lr: {{warmup_epochs: 0.25, step_on: update}}
ema: {{decay: 0.9}}
validation: {{batch_size: 16}}
logging: {{folder: {runs}, experiment: tiny, progress: 0}}
"""


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_eval")
    build_sample(root / "sample", num_classes=4, train_per_class=8, val_per_class=6, min_size=64, max_size=96)
    for split in ("train", "val"):
        write_split(str(root / "sample"), split, str(root / f"{split}.beton"), max_resolution=96, num_workers=1)
    cfg = root / "tiny.yaml"
    cfg.write_text(CONFIG.format(base=REPO / "rn_configs" / "base.yaml", train=root / "train.beton",
                                 val=root / "val.beton", runs=root / "runs"))
    proc = run_cli("train.py", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_same_weights_through_both_val_pipelines(trained):
    run = trained / "runs" / "tiny"
    proc = run_cli("-m", "fastvit_reduce.cli", "bench", "eval", str(run), "--val-dir",
                   str(trained / "sample" / "val"), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(proc.stdout)
    final = json.loads((run / "final.json").read_text())
    assert row["images"] == 4 * 6 and row["weights"] == "ema"
    # our column is the trainer's own evaluation of the same EMA weights, to the image
    assert row["ours_top_1"] == pytest.approx(final["final_ema_top_1"], abs=1e-3)
    assert 0 <= row["timm_top_1"] <= 100
    assert row["difference"] == pytest.approx(row["ours_top_1"] - row["timm_top_1"])
    raw = run_cli("-m", "fastvit_reduce.cli", "bench", "eval", str(run), "--val-dir",
                  str(trained / "sample" / "val"), "--weights", "raw", "--json")
    assert json.loads(raw.stdout)[0]["ours_top_1"] == pytest.approx(final["raw_final_top_1"], abs=1e-3)


def test_bad_inputs_are_named(trained, tmp_path):
    val = str(trained / "sample" / "val")
    proc = run_cli("-m", "fastvit_reduce.cli", "bench", "eval", str(tmp_path), "--val-dir", val)
    assert proc.returncode == 2 and "no params.json" in proc.stderr
    other = tmp_path / "val"  # same images, one class folder renamed: labels would not match
    for cls in sorted((trained / "sample" / "val").iterdir()):
        (other / cls.name.replace(cls.name[0], "z", 1)).mkdir(parents=True)
        for f in cls.iterdir():
            (other / cls.name.replace(cls.name[0], "z", 1) / f.name).symlink_to(f)
    proc = run_cli("-m", "fastvit_reduce.cli", "bench", "eval", str(trained / "runs" / "tiny"), "--val-dir", str(other))
    assert proc.returncode == 2 and "labels would not match" in proc.stderr
