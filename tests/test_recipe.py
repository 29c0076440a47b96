"""fastvit_reduce.recipe. The seed's recipe, exactly, at any process count: a tested seed-flag table.

For each of the seed's four commands (parameter-efficient-vit-mlps README: baseline, thin,
shallow, grouped on ViT-B/16), our matching config resolved at 1, 2 and 8 simulated processes
must train at global batch 1024 with the seed's hyper-parameters; ``--dry-run`` prints that plan.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvit_reduce.config import ConfigError, load_config, resolved
from fastvit_reduce.recipe import batch_plan, check_resolutions, get_resolution, lr_at
from fastvit_reduce.settings import SECTIONS
from fastvit_reduce.train import main

CONFIGS = Path(__file__).resolve().parent.parent / "rn_configs"
# seed flag -> (our key, value); the same for the four commands
SEED_FLAGS = {
    "--lr 0.001": ("optim.lr", 0.001), "--weight-decay 0.05": ("optim.weight_decay", 0.05),
    "--warmup-epochs 5": ("lr.warmup_epochs", 5.0), "--drop-path 0.1": ("model.drop_path", 0.1),
    "--model-ema-decay 0.9998": ("ema.decay", 0.9998), "--aa rand-m9-mstd0.5-inc1": ("augment.randaugment", "rand-m9-mstd0.5-inc1"),
    "--mixup 0.8": ("augment.mixup", 0.8), "--cutmix 1.0": ("augment.cutmix", 1.0),
    "--reprob 0.25": ("augment.reprob", 0.25), "--aug-repeats 3": ("augment.aug_repeats", 3),
    "--epochs 300": ("training.epochs", 300), "--sched cosine": ("lr.schedule", "cosine"),
    "--model vit_base_patch16_224": ("model.arch", "vit_base_patch16_224"), "--seed 42": ("training.seed", 42),
}
STRATEGY_FLAGS = {  # the seed README's per-strategy flags
    "baseline": {"reduction.strategy": "baseline"},
    "thin": {"reduction.strategy": "thin", "reduction.mlp_ratio": 2.0},
    "shallow": {"reduction.strategy": "shallow", "reduction.keep_ratio": 0.5},
    "grouped": {"reduction.strategy": "grouped", "reduction.scale": 0.707, "reduction.group_size": 2},
}
PER_GPU = {1: 256, 2: 256, 8: 128}  # 8 x 256 would overshoot 1024: the 8-GPU command halves it


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("name", list(STRATEGY_FLAGS))
def test_each_seed_command_resolves_to_its_recipe_at_any_process_count(name, world):
    load_config(["--config", str(CONFIGS / f"{name}.yaml"), f"--training.batch_size={PER_GPU[world]}"], SECTIONS)
    cfg = resolved(SECTIONS)
    for flag, (key, value) in SEED_FLAGS.items():
        assert cfg[key] == value, f"{name}.yaml: {key} = {cfg[key]!r}, the seed's {flag} means {value!r}"
    for key, value in STRATEGY_FLAGS[name].items():
        assert cfg[key] == pytest.approx(value) if isinstance(value, float) else cfg[key] == value
    plan = batch_plan(cfg, world)
    assert plan["global_batch"] == 1024 and plan["peak_lr"] == 0.001
    assert plan["per_gpu_batch"] * plan["accum"] * world == 1024


def test_dry_run_prints_the_plan_without_training(capsys, tmp_path):
    assert main(["--config", str(CONFIGS / "thin.yaml"), "--dry-run", "--world-size", "2",
                 f"--logging.folder={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "global_batch" in out and "1024" in out
    plan = json.loads(out[out.index("plan (JSON):") + len("plan (JSON):"):])
    assert plan[0]["global_batch"] == 1024 and plan[0]["accum"] == 2 and plan[0]["params"] == 58_237_672
    assert plan[0]["strategy"] == "thin" and plan[0]["knobs"]["reduction.mlp_ratio"] == 2.0
    assert not (tmp_path / "runs").exists()


def test_a_global_batch_out_of_reach_is_refused_naming_valid_per_gpu_sizes(capsys):
    assert main(["--config", str(CONFIGS / "baseline.yaml"), "--dry-run", "--world-size=8"]) == 2
    err = capsys.readouterr().err
    assert "training.global_batch=1024 cannot be reached with training.batch_size=256 on 8" in err
    assert "128" in err
    with pytest.raises(ConfigError, match="per-GPU sizes that do: .*96|per-GPU sizes that do: .*128"):
        load_config(["--config", str(CONFIGS / "baseline.yaml"), "--training.batch_size=100"], SECTIONS)
        batch_plan(resolved(SECTIONS), 2)


def test_lr_scale_rules():
    load_config(["--config", str(CONFIGS / "baseline.yaml"), "--lr.scale=linear", "--lr.base_batch=512",
                 "--optim.lr=5e-4"], SECTIONS)
    assert batch_plan(resolved(SECTIONS), 2)["peak_lr"] == pytest.approx(1e-3)  # DeiT: 5e-4 x 1024/512
    load_config(["--config", str(CONFIGS / "baseline.yaml"), "--lr.scale=sqrt", "--lr.base_batch=256"], SECTIONS)
    assert batch_plan(resolved(SECTIONS), 1)["peak_lr"] == pytest.approx(2e-3)


def test_resolutions_must_be_multiples_of_the_patch_size():
    cfg = {"resolution.min_res": 24, "resolution.max_res": 40, "resolution.start_ramp": 0,
           "resolution.end_ramp": 4, "resolution.step": 8, "training.epochs": 5,
           "validation.resolution": 0, "model.img_size": 32}
    check_resolutions(cfg, (8, 8))  # 24, 32, 40 and val 32: all fit
    with pytest.raises(ConfigError, match=r"patch size is 16x16.*train resolution 24.*train resolution 40"):
        check_resolutions(cfg, (16, 16))
    with pytest.raises(ConfigError, match=r"val resolution 36 \(validation.resolution"):
        check_resolutions({**cfg, "validation.resolution": 36}, 8)


def test_lr_schedule_per_epoch_and_per_update():
    """timm's semantics (tests/test_timm_parity.py checks them against timm's scheduler itself)."""
    cfg = {"training.epochs": 10, "lr.step_on": "epoch", "lr.schedule": "cosine", "lr.warmup_epochs": 2,
           "lr.warmup_lr": 1e-5, "lr.min_lr": 1e-6, "lr.warmup_prefix": 0, "lr.cooldown_epochs": 0,
           "lr.cycle_mul": 1.0, "lr.cycle_decay": 0.5, "lr.cycle_limit": 1, "lr.k_decay": 1.0}
    assert lr_at(cfg, 1e-3, 0, 0, 4) == lr_at(cfg, 1e-3, 0, 3, 4) == 1e-5  # the whole epoch 0
    assert lr_at(cfg, 1e-3, 1, 0, 4) == pytest.approx((1e-5 + 1e-3) / 2)
    assert lr_at(cfg, 1e-3, 5, 2, 4) == pytest.approx((1e-3 + 1e-6) / 2)  # the cosine counts the warm-up
    upd = {**cfg, "lr.step_on": "update"}
    assert lr_at(upd, 1e-3, 0, 0, 4) == 1e-5 and lr_at(upd, 1e-3, 0, 2, 4) == pytest.approx(1e-5 + 2 * (1e-3 - 1e-5) / 8)
    steps = [lr_at(upd, 1e-3, e, u, 4) for e in range(2, 10) for u in range(4)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert lr_at({**cfg, "lr.schedule": "constant", "lr.warmup_epochs": 0}, 1e-3, 7, 0, 4) == 1e-3


def test_get_resolution_ramp():
    got = [get_resolution(e, 160, 224, start_ramp=2, end_ramp=6, step=16) for e in range(9)]
    assert got == [160, 160, 160, 176, 192, 208, 224, 224, 224]
    assert get_resolution(3, 160, 224, 2, 6, step=32) == 192  # 176 rounds to a multiple of 32
    assert get_resolution(5, 224, 224, 0, 0, 16) == 224
    with pytest.raises(ValueError, match="min_res"):
        get_resolution(0, 256, 224, 0, 0, 16)
