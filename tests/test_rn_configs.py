"""rn_configs/: every YAML loads through the strict loader; the strategy files say what they are."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fastargs import get_current_config

from fastvit_reduce.config import load_config, resolved
from fastvit_reduce.models import model_from_cfg, param_count
from fastvit_reduce.recipe import batch_plan
from fastvit_reduce.settings import SECTIONS

CONFIGS = Path(__file__).resolve().parent.parent / "rn_configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
STRATEGY_FILES = ["baseline", "thin", "shallow", "grouped"]


def test_there_are_configs():
    assert {f"{name}.yaml" for name in ["base", *STRATEGY_FILES]} <= {p.name for p in ALL}


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_loads_strictly(path):
    load_config(["--config", str(path)], SECTIONS)  # raises ConfigError naming any bad key


@pytest.mark.parametrize("name", STRATEGY_FILES)
def test_strategy_file_header_and_expected_params(name):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    for needle in ("Reproduces:", "Seed command it replaces:", "not yet measured", "Hardware:",
                   f"train.py --config rn_configs/{name}.yaml"):
        assert needle in text, f"{path.name}: header lacks {needle!r}"
    load_config(["--config", str(path)], SECTIONS)
    cfg = get_current_config()
    assert cfg["reduction.strategy"] == name and cfg["training.epochs"] == 300
    plan = batch_plan(resolved(SECTIONS), world=2)
    assert (plan["global_batch"], plan["per_gpu_batch"], plan["accum"]) == (1024, 256, 2)  # the seed's 2 GPUs
    expected = int(re.search(r"Expected params: ([\d,]+) exactly", text).group(1).replace(",", ""))
    with torch.device("meta"):  # shapes only: ViT-B without allocating 86M parameters
        model = model_from_cfg(resolved(SECTIONS))
    assert param_count(model) == expected
