"""bench e2e: the timm data path (timm's own loaders on an ImageFolder) and the Pillow-13 guard.

A tiny sample ImageFolder (4 classes, 64-96 px photos), 32 px batches, no worker processes.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from fastvit_reduce.bench.e2e import summarise
from fastvit_reduce.bench.timm_path import TimmSource, guard_posterize
from fastvit_reduce.sample import build_sample

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 4, 6, 2, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "sample"
    build_sample(out, num_classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                 min_size=64, max_size=96)
    return out


def cfg(**changes) -> dict:
    """The keys TimmSource reads, at the seed recipe on a tiny ViT (what the trainer's resolved dict holds)."""
    base = {"model.arch": "vit_tiny_patch16_224", "model.num_classes": CLASSES, "model.img_size": 32,
            "model.patch_size": 8, "model.drop_path": 0.0, "reduction.strategy": "baseline",
            "resolution.min_res": 32, "resolution.max_res": 32, "validation.resolution": 0,
            "validation.batch_size": BATCH, "training.batch_size": BATCH, "training.seed": 0,
            "training.label_smoothing": 0.1, "data.num_workers": 0, "data.crop_pct": 0.0,
            "data.rrc_scale": [0.08, 1.0], "data.rrc_ratio": [0.75, 4 / 3], "data.hflip": True,
            "augment.randaugment": "rand-m9-mstd0.5-inc1", "augment.mixup": 0.8, "augment.cutmix": 1.0,
            "augment.mixup_prob": 1.0, "augment.mixup_switch_prob": 0.5, "augment.mixup_mode": "batch",
            "augment.reprob": 0.25, "augment.remode": "pixel", "augment.recount": 1, "augment.aug_repeats": 1}
    return {**base, **changes}


def source(folder, **changes) -> TimmSource:
    return TimmSource(cfg(**changes), torch.device("cpu"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                      train_dir=str(folder / "train"), val_dir=str(folder / "val"))


def test_posterize_guard_gives_black_for_zero_bits():
    from timm.data import auto_augment
    guard_posterize()
    guard_posterize()  # idempotent
    img = Image.new("RGB", (9, 7), (200, 100, 50))
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        out = auto_augment.NAME_TO_OP[name](img, 0)
        assert out.size == img.size and out.getextrema() == ((0, 0),) * 3, name
        assert auto_augment.NAME_TO_OP[name](img, 4).getpixel((0, 0)) == (192, 96, 48)  # bits > 0: PIL's own
    # the seed's spec at the magnitude that used to ask for bits=0
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(img).size == img.size


def test_seed_recipe_batches(folder):
    src = source(folder)
    assert src.soft_targets and len(src) == CLASSES * TRAIN_PER_CLASS // BATCH  # drop_last, as timm trains
    batches = list(src.epoch(0))
    assert len(batches) == len(src)
    for x, target, ready in batches:
        assert ready is None
        assert x.dtype == torch.float32 and x.shape == (BATCH, 3, 32, 32) and x.device.type == "cpu"
        assert target.shape == (BATCH, CLASSES) and target.dtype == torch.float32
        torch.testing.assert_close(target.sum(1), torch.ones(BATCH))  # soft rows (mixup + smoothing)
        assert target.min() > 0  # label smoothing reaches every class
    xs, labels = zip(*src.val())
    assert sum(len(y) for y in labels) == CLASSES * VAL_PER_CLASS
    assert all(y.dtype == torch.int64 for y in labels) and xs[0].shape[1:] == (3, 32, 32)
    assert abs(torch.cat(xs).mean().item()) < 1.0  # normalised (raw 0-255 would be ~100)


def test_without_mixup_targets_are_labels(folder):
    src = source(folder, **{"augment.mixup": 0.0, "augment.cutmix": 0.0, "augment.randaugment": ""})
    assert not src.soft_targets
    x, y, _ = next(iter(src.epoch(0)))
    assert y.dtype == torch.int64 and y.shape == (BATCH,) and y.max() < CLASSES


def test_progressive_resizing_is_refused(folder):
    from fastvit_reduce.config import ConfigError
    with pytest.raises(ConfigError, match="no progressive resizing"):
        source(folder, **{"resolution.min_res": 24})


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


def test_quick_run_prints_both_paths(folder, tmp_path, capsys):
    """The whole command on the tiny folder: .beton write, one child run per path, JSON summary."""
    import json

    from fastvit_reduce.bench.e2e import main
    rc = main(["--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"),
               "--beton-dir", str(tmp_path / "betons"), "--config", "rn_configs/sample/base.yaml", "--quick",
               "--max-res", "64", "--write-workers", "1", "--json",
               "--set", f"training.batch_size={BATCH}", "--set", f"training.global_batch={BATCH}",
               "--set", f"validation.batch_size={BATCH}", "--set", "data.num_workers=1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, [r["log"] for r in out["runs"]]
    assert out["beton_write_s"] > 0 and out["epochs"] == 1
    assert [r["path"] for r in out["runs"]] == ["ours", "timm"]
    summary = {r["path"]: r for r in out["summary"]}
    assert set(summary) == {"ours", "timm", "ours/timm", "ours/(timm-import)"}
    for path in ("ours", "timm"):
        row = summary[path]
        assert 0 <= row["top_1"] <= 100 and row["wall_s"] > 0 and row["cpu_s"] > 0, row
        assert row["steady_img_s"] > 0 and row["startup_s"] is not None, row
        assert 0 < row["ffcv_import_s"] < row["startup_s"], row  # measured in the child, part of start-up
    assert summary["ours/(timm-import)"]["wall_s"] > summary["ours/timm"]["wall_s"]
    # --jit-cache warm (the default): an untimed ours run filled the cache; the timed one loaded it
    assert out["jit_cache"] == "warm" and out["jit_prime_s"] > 0
    ours = out["runs"][0]
    assert ours["jit_compiled"] == 0 and ours["jit_loaded"] > 0, ours
    assert (tmp_path / "betons" / "runs" / "ours_jit_prime" / "final.json").is_file()


def test_sweep_with_cpu_slots_splits_ours_and_runs_timm_side_by_side(folder, tmp_path, capsys):
    """--sweep with --cpu-slots 2: ours = the paired command as --pair-part 1/2 and 2/2; timm = its
    runs one after the other, and again two at a time; every config ends with a top-1 in each row."""
    import json

    from fastvit_reduce.bench.e2e import main
    configs = [f"rn_configs/sample/{n}.yaml" for n in ("baseline", "thin", "grouped")]
    rc = main(["--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"),
               "--beton-dir", str(tmp_path / "betons"), "--config", "rn_configs/sample/base.yaml", "--quick",
               "--max-res", "64", "--write-workers", "1", "--json", "--sweep", *configs, "--cpu-slots", "2",
               "--jit-cache", "cold",
               "--set", f"training.batch_size={BATCH}", "--set", f"training.global_batch={BATCH}",
               "--set", f"validation.batch_size={BATCH}", "--set", "data.num_workers=1",
               "--set", f"model.num_classes={CLASSES}"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out["runs"]
    assert [r["path"] for r in out["runs"]] == ["ours", "timm", "timm x2"]
    assert set(out["ratio"]) == {"ours/timm", "ours/timm x2", "ours/(timm-import)"} and out["cpu_slots"] == 2
    timm_row = [r for r in out["runs"] if r["path"] == "timm"][0]
    assert timm_row["ffcv_import_s"] > 0  # the three timm runs' imports, summed
    # --jit-cache cold: ours' two processes started from an empty cache and compiled
    ours_row = out["runs"][0]
    assert out["jit_cache"] == "cold" and out["jit_prime_s"] is None
    assert all(ours_row["jit_cache"][st]["compiled"] > 0 for st in ("baseline", "thin", "grouped"))
    assert out["ratio"]["ours/(timm-import)"]["wall_s"] > out["ratio"]["ours/timm"]["wall_s"]
    for row in out["runs"]:
        assert set(row["top_1"]) == {"baseline", "thin", "grouped"}
        assert all(0 <= t <= 100 for t in row["top_1"].values()), row
    logs = sorted((tmp_path / "betons" / "runs" / "ours_sweep_r0").glob("part*.out"))
    assert [p.name for p in logs] == ["part1.out", "part2.out"]
    params = json.loads((tmp_path / "betons" / "runs" / "ours_sweep_r0" / "thin" / "params.json").read_text())
    assert "--pair-part=2/2" in params["argv"] and params["pair"]["variants"] == ["baseline", "thin", "grouped"]


def test_bad_folder_is_one_line(tmp_path, capsys):
    from fastvit_reduce.bench.e2e import main
    rc = main(["--train-dir", str(tmp_path / "nope"), "--val-dir", str(tmp_path), "--beton-dir", str(tmp_path),
               "--config", "rn_configs/sample/base.yaml"])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: --train-dir {tmp_path / 'nope'} is not a folder"
