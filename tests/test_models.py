"""fastvit_reduce.models: the seed's timm name, pretrained files, and model_from_cfg (CPU, seconds).

Tiny ViT (tests/conftest.py TINY_VIT): embed 64, depth 4, MLP hidden 256, 32 px / patch 8, 4 classes.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import timm
import torch
from conftest import TINY_VIT

from fastvit_reduce.config import ConfigError, load_config, resolved
from fastvit_reduce.models import create_model, mlp_stats, model_from_cfg, param_count
from fastvit_reduce.strategies import StrategyError

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = TINY_VIT["model_name"]
TINY = {k: v for k, v in TINY_VIT.items() if k != "model_name"}
SHAPE = dict(embed_dim=64, depth=4, num_heads=2)  # what turns ViT-B/16 into the tiny ViT
DG = "vit_base_patch16_224_dgmlp"
CFG = {"model.arch": NAME, "model.img_size": 32, "model.patch_size": 8, "model.num_classes": 4,
       "model.drop_path": 0.0}


@pytest.mark.slow  # a fresh interpreter that imports timm
def test_package_import_is_light_and_registers_the_seed_name_when_timm_arrives():
    code = ("import sys, fastvit_reduce\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'package import loaded torch'\n"
            "import timm\n"
            f"print(timm.is_model({DG!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_dgmlp_counts_exactly_as_grouped():
    with torch.device("meta"):  # why: exact ViT-B shapes without allocating 86M parameters
        dg = timm.create_model(DG)
        grouped = create_model("vit_base_patch16_224", "grouped", scale=1 / math.sqrt(2), group_size=2)
    assert param_count(dg) == param_count(grouped) == 58_233_064
    assert mlp_stats(dg)["unique_mlps"] == 6


@pytest.mark.parametrize("mlp_scale", [1 / math.sqrt(2), 1.0])
def test_dgmlp_is_timm_vit_then_grouped(mlp_scale):
    torch.manual_seed(3)
    dg = timm.create_model(DG, mlp_scale=mlp_scale, **TINY)
    torch.manual_seed(3)
    grouped = create_model("vit_base_patch16_224", "grouped", scale=mlp_scale, **TINY)
    assert dg.pretrained_cfg["architecture"] == "vit_base_patch16_224"  # same data config as ViT-B/16
    assert dg.state_dict().keys() == grouped.state_dict().keys()
    for k, v in dg.state_dict().items():
        assert torch.equal(v, grouped.state_dict()[k]), k
    assert dg.blocks[0].mlp is dg.blocks[1].mlp and dg.blocks[1].mlp is not dg.blocks[2].mlp


def test_dgmlp_pretrained_needs_a_local_file_and_loads_it_before_grouping(tmp_path):
    with pytest.raises(StrategyError, match="pretrained=True needs a local file .*hub downloads are off"):
        timm.create_model(DG, pretrained=True, **TINY)
    torch.manual_seed(5)
    full = timm.create_model("vit_base_patch16_224", **TINY)
    torch.save({"model": full.state_dict(), "epoch": 9}, tmp_path / "full.pt")  # our trainer's format
    via_overlay = timm.create_model(DG, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "full.pt")),
                                    **TINY)
    via_cfg = model_from_cfg({**CFG, "model.arch": DG, "model.pretrained_file": str(tmp_path / "full.pt")},
                             **SHAPE)
    s = 1 / math.sqrt(2)
    for model in (via_overlay, via_cfg):
        assert torch.equal(model.blocks[2].mlp.fc1.weight, full.blocks[2].mlp.fc1.weight * s)  # block 2's, not 3's
        assert torch.equal(model.blocks[3].mlp.fc2.bias, full.blocks[2].mlp.fc2.bias)
        assert torch.equal(model.pos_embed, full.pos_embed)


@pytest.mark.parametrize("fmt", ["ours", "timm"])
@pytest.mark.parametrize("strategy, knobs", [("shallow", dict(keep_ratio=0.5)), ("grouped", dict(group_size=2)),
                                             ("baseline", {})])
def test_pretrained_file_is_loaded_before_the_surgery(strategy, knobs, fmt, tmp_path):
    torch.manual_seed(7)
    trained = timm.create_model(NAME, **TINY)
    state = trained.state_dict()
    torch.save({"model": state, "epoch": 3} if fmt == "ours" else state, tmp_path / "base.pt")
    cfg = {**CFG, "reduction.strategy": strategy, "model.pretrained_file": str(tmp_path / "base.pt"),
           **{f"reduction.{k}": v for k, v in knobs.items()}}
    model = model_from_cfg(cfg, seed=123, **SHAPE)  # a different init: every weight must come from the file
    assert torch.equal(model.pos_embed, trained.pos_embed)
    k = model.blocks[0].mlp.fc1.out_features
    scale = 0.707 if strategy == "grouped" else 1.0
    assert torch.equal(model.blocks[0].mlp.fc1.weight, trained.blocks[0].mlp.fc1.weight[:k] * scale)


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(StrategyError, match="pretrained file not found: .*nope.pt"):
        create_model(NAME, "shallow", pretrained_file=tmp_path / "nope.pt", **TINY)
    torch.save(timm.create_model(NAME, **TINY).state_dict(), tmp_path / "full.pt")
    # thin: a full-width file cannot fill thin MLPs; the error names the shapes and points to shallow
    with pytest.raises(StrategyError, match=r"does not fit .*12 shape\(s\) differ: blocks.0.mlp.fc1.weight "
                                            r"\(256, 64\) in the file, \(128, 64\) in the model.*use "
                                            r"reduction.strategy=shallow"):
        create_model(NAME, "thin", pretrained_file=tmp_path / "full.pt", mlp_ratio=2.0, **TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StrategyError, match="cannot read pretrained file"):
        create_model(NAME, pretrained_file=tmp_path / "junk.pt", **TINY)


def test_thin_loads_a_thin_file(tmp_path):
    thin = create_model(NAME, "thin", mlp_ratio=2.0, **TINY)
    torch.save(thin.state_dict(), tmp_path / "thin.pt")
    again = create_model(NAME, "thin", pretrained_file=tmp_path / "thin.pt", mlp_ratio=2.0, **TINY)
    assert torch.equal(again.blocks[1].mlp.fc2.weight, thin.blocks[1].mlp.fc2.weight)


def test_model_from_cfg_seed_gives_shared_starting_weights():
    base = model_from_cfg({**CFG, "reduction.strategy": "baseline"}, seed=11, **SHAPE)
    shallow = model_from_cfg({**CFG, "reduction.strategy": "shallow", "reduction.keep_ratio": 0.5}, seed=11, **SHAPE)
    grouped = model_from_cfg({**CFG, "reduction.strategy": "grouped", "reduction.scale": 1.0}, seed=11, **SHAPE)
    for model in (shallow, grouped):
        assert torch.equal(model.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight)
    assert torch.equal(shallow.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight[:128])
    assert torch.equal(grouped.blocks[1].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)
    other = model_from_cfg({**CFG, "reduction.strategy": "baseline"}, seed=12, **SHAPE)
    assert not torch.equal(other.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight)


def test_model_from_cfg_stray_knobs():
    # a knob of another strategy at its default is fine (a resolved dict holds every knob) ...
    model = model_from_cfg({**CFG, "reduction.strategy": "thin", "reduction.mlp_ratio": 2.0,
                            "reduction.scale": 0.707, "reduction.keep_ratio": "0.5"}, **SHAPE)
    assert mlp_stats(model)["mlp_hidden"] == 128
    # ... a changed one would silently do nothing: refuse, naming each
    with pytest.raises(ConfigError, match=r"'reduction.prune_by' is a knob of shallow, but reduction.strategy is "
                                          r"'thin'\n  'reduction.scale' is a knob of grouped"):
        model_from_cfg({**CFG, "reduction.strategy": "thin", "reduction.scale": 1.0,
                        "reduction.prune_by": "magnitude"}, **SHAPE)


def test_model_from_cfg_accepts_the_seed_arch():
    load_config(["--model.arch", DG, "--model.img_size=32", "--model.patch_size=8", "--model.num_classes=4",
                 "--model.drop_path=0"], ["model", "reduction"])
    assert mlp_stats(model_from_cfg(resolved(["model", "reduction"]), **SHAPE))["unique_mlps"] == 2


def test_model_from_cfg_reads_the_config():
    overrides = ["--model.arch", NAME, "--model.img_size=32", "--model.patch_size=8", "--model.num_classes=4",
                 "--model.drop_path=0"]
    tiny_kw = dict(embed_dim=64, depth=4, num_heads=2)
    load_config(overrides + ["--reduction.strategy=grouped", "--reduction.group_size=4"], ["model", "reduction"])
    assert mlp_stats(model_from_cfg(resolved(["model", "reduction"]), **tiny_kw))["unique_mlps"] == 1
    load_config(overrides + ["--reduction.strategy=thin", "--reduction.scale=1.0"], ["model", "reduction"])
    with pytest.raises(ConfigError, match=r"'reduction.scale' is a knob of grouped, but reduction.strategy is 'thin'"):
        model_from_cfg(resolved(["model", "reduction"]), **tiny_kw)
    with pytest.raises(ConfigError, match="reduction.keep_ratio"):
        load_config(overrides + ["--reduction.keep_ratio=2"], ["model", "reduction"])
