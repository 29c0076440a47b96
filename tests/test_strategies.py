"""fastvit_reduce.strategies, the MLP reduction strategies, on a tiny ViT (CPU, seconds), parametrised over the registry.

Tiny ViT (tests/conftest.py TINY_VIT): embed 64, depth 4, MLP hidden 256, 32 px / patch 8
-> 16 patches + cls = 17 tokens, 4 classes.
"""
from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import torch.distributed as dist
from conftest import TINY_VIT
from torch.nn.parallel import DistributedDataParallel

from fastvit_reduce import create_model
from fastvit_reduce.models import gflops, mlp_stats, param_count
from fastvit_reduce.strategies import STRATEGIES, StrategyError

NAME = TINY_VIT["model_name"]
TINY = {k: v for k, v in TINY_VIT.items() if k != "model_name"}
DIM, DEPTH, HIDDEN, TOKENS = 64, 4, 256, 17


def mlp_params(dim: int, hidden: int) -> int:
    """fc1 (weight + bias) + fc2 (weight + bias) of one plain MLP."""
    return dim * hidden + hidden + hidden * dim + dim


# strategy -> (knobs, exact parameter drop from the tiny baseline, MLP hidden width, unique MLPs)
EXPECTED = {
    "thin": (dict(mlp_ratio=2.0), DEPTH * (mlp_params(DIM, 256) - mlp_params(DIM, 128)), 128, DEPTH),
    "shallow": (dict(keep_ratio=0.5), DEPTH * (mlp_params(DIM, 256) - mlp_params(DIM, 128)), 128, DEPTH),
    "grouped": (dict(scale=0.707, group_size=2), 2 * mlp_params(DIM, 256), 256, 2),
}
ALL = sorted(STRATEGIES)


def tiny(strategy=None, seed=0, **kw):
    """The tiny ViT with ``strategy``: the EXPECTED knobs, or exactly ``kw`` (which may also override TINY)."""
    torch.manual_seed(seed)
    knobs = kw or (EXPECTED[strategy][0] if strategy else {})
    return create_model(NAME, strategy, **{**TINY, **knobs})


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_every_registered_strategy_has_expectations():
    assert set(EXPECTED) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", ALL)
def test_shape_params_flops_exact(strategy):
    base, model = tiny(), tiny(strategy)
    x, _ = batch()
    assert model(x).shape == base(x).shape == (2, 4)
    knobs, drop, hidden, unique = EXPECTED[strategy]
    assert param_count(base) - param_count(model) == drop
    assert mlp_stats(model) == dict(params=param_count(base) - drop, mlp_params=DEPTH * mlp_params(DIM, 256) - drop,
                                    unique_mlps=unique, mlp_hidden=hidden)
    # forward FLOPs: each MLP costs 2 FLOPs per multiply-add, per token, per block (shared or not)
    flop_drop = DEPTH * TOKENS * 2 * 2 * DIM * (HIDDEN - hidden)
    assert round((gflops(base, 32) - gflops(model, 32)) * 1e9) == flop_drop


@pytest.mark.parametrize("strategy", ALL)
def test_every_parameter_gets_a_gradient(strategy):
    model = tiny(strategy)
    x, y = batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("strategy", ALL)
def test_one_log_line_per_application(strategy, caplog):
    with caplog.at_level(logging.INFO, logger="fastvit_reduce.strategies"):
        tiny(strategy)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fastvit_reduce")]
    assert len(lines) == 1 and lines[0].startswith(f"{strategy}: ")
    assert f"params {param_count(tiny()) / 1e6:.2f}M -> " in lines[0]


def test_grouped_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="fastvit_reduce.strategies"):
        tiny("grouped")
    assert "grouped: 4 blocks -> 2 MLPs (scale 0.707, group_size 2), params 0.21M -> 0.15M" in caplog.text


@pytest.mark.parametrize("strategy", ALL)
def test_state_dict_round_trip_keeps_sharing(strategy, tmp_path):
    model = tiny(strategy)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = tiny(strategy, seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x, _ = batch()
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert mlp_stats(fresh) == mlp_stats(model)
    if strategy == "grouped":
        assert fresh.blocks[0].mlp is fresh.blocks[1].mlp and fresh.blocks[2].mlp is fresh.blocks[3].mlp


def test_sharing_survives_torch_compile():
    # why aot_eager: it runs dynamo *and* AOTAutograd (where aliased parameters are
    # de-duplicated as graph inputs, the part sharing could break) in ~3 s; inductor would add
    # a C++ compile of tens of seconds on this CPU without testing anything about sharing.
    model = tiny("grouped")
    x, y = batch()
    compiled = torch.compile(model, backend="aot_eager")
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    shared = model.blocks[0].mlp.fc1.weight
    compiled_grad, shared.grad = shared.grad.clone(), None
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(compiled_grad, shared.grad, atol=1e-6)
    assert model.blocks[1].mlp.fc1.weight is shared
    assert mlp_stats(compiled)["unique_mlps"] == 2


def test_ddp_optimizer_and_grad_clipping_see_one_copy(tmp_path):
    model = tiny("grouped")
    shared = model.blocks[0].mlp.fc1.weight
    x, y = batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
    finally:
        dist.destroy_process_group()
    ddp_grad = shared.grad.clone()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(ddp_grad, shared.grad, atol=1e-6)  # both blocks' gradients, summed once

    opt = torch.optim.AdamW(model.parameters())
    in_opt = [p for group in opt.param_groups for p in group["params"]]
    assert sum(p is shared for p in in_opt) == 1
    assert sum(p.numel() for p in in_opt) == param_count(model)
    unique_norm = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
    assert torch.allclose(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9), unique_norm)


@pytest.mark.parametrize("width_knob, round_to, hidden", [
    (dict(strategy="thin", mlp_ratio=1.3), 1, 83),       # 64 * 1.3 = 83.2 -> 83
    (dict(strategy="thin", mlp_ratio=1.3), 8, 80),       # 83.2 / 8 = 10.4 -> 10 * 8
    (dict(strategy="shallow", keep_ratio=0.3), 1, 77),   # 256 * 0.3 = 76.8 -> 77
    (dict(strategy="shallow", keep_ratio=0.3), 8, 80),   # 76.8 / 8 = 9.6 -> 10 * 8
])
def test_hidden_width_rounding(width_knob, round_to, hidden):
    model = create_model(NAME, round_to=round_to, **width_knob, **TINY)
    assert mlp_stats(model)["mlp_hidden"] == hidden


@pytest.mark.parametrize("prune_by", ["first", "magnitude"])
def test_shallow_keeps_the_chosen_units_exactly(prune_by):
    base = tiny()
    with torch.no_grad():  # make units 200..255 the strongest, so magnitude must pick them
        for b in base.blocks:
            b.mlp.fc2.weight[:, 200:] *= 10
    pruned = STRATEGIES["shallow"].apply(copy.deepcopy(base), keep_ratio=0.25, prune_by=prune_by)  # 64 of 256
    with torch.no_grad():
        for b, p in zip(base.blocks, pruned.blocks):
            score = b.mlp.fc1.weight.norm(dim=1) * b.mlp.fc2.weight.norm(dim=0)  # (256,)
            kept = torch.arange(64) if prune_by == "first" else score.topk(64).indices.sort().values
            assert prune_by == "first" or set(range(200, 256)) <= set(kept.tolist())
            assert torch.equal(p.mlp.fc1.weight, b.mlp.fc1.weight[kept])
            assert torch.equal(p.mlp.fc1.bias, b.mlp.fc1.bias[kept])
            assert torch.equal(p.mlp.fc2.bias, b.mlp.fc2.bias)  # fc2 bias stays whole
            dropped = torch.ones(HIDDEN, dtype=torch.bool)
            dropped[kept] = False
            b.mlp.fc2.weight[:, dropped] = 0  # removes a dropped unit's contribution exactly
    x, _ = batch()
    base.eval(), pruned.eval()
    assert torch.allclose(base(x), pruned(x), atol=1e-6)


def test_grouped_scales_the_kept_mlp_and_trailing_blocks_keep_their_own(caplog):
    with caplog.at_level(logging.INFO, logger="fastvit_reduce.strategies"):
        base, model = tiny(depth=5), tiny("grouped", depth=5, scale=0.5, group_size=2)
    assert "trailing block 4 keeps its own MLP" in caplog.text
    blocks = model.blocks
    assert blocks[0].mlp is blocks[1].mlp and blocks[2].mlp is blocks[3].mlp
    assert blocks[4].mlp is not blocks[3].mlp and mlp_stats(model)["unique_mlps"] == 3
    kept, orig = blocks[2].mlp, base.blocks[2].mlp
    assert torch.equal(kept.fc1.weight, orig.fc1.weight * 0.5) and torch.equal(kept.fc1.bias, orig.fc1.bias * 0.5)
    assert torch.equal(kept.fc2.weight, orig.fc2.weight * 0.5) and torch.equal(kept.fc2.bias, orig.fc2.bias)
    assert torch.equal(blocks[4].mlp.fc1.weight, base.blocks[4].mlp.fc1.weight)  # trailing: untouched


@pytest.mark.parametrize("strategy, knobs, message", [
    ("thin", dict(mlp_ratio=0), r"thin: mlp_ratio must be a number > 0, got 0"),
    ("thin", dict(mlp_ratio=4.0), r"hidden width 256, which .* already has: nothing would change"),
    ("thin", dict(round_to=0), r"round_to must be an integer >= 1"),
    ("shallow", dict(keep_ratio=0), r"keep_ratio must be a number > 0 and <= 1, got 0"),
    ("shallow", dict(keep_ratio=1.5), r"keep_ratio must be a number > 0 and <= 1"),
    ("shallow", dict(keep_ratio=1.0), r"keeps all 256 hidden units .*nothing would change"),
    # round_to that rounds the "reduced" width past the baseline's (it once gave 3.3x larger MLPs)
    ("thin", dict(mlp_ratio=2.0, round_to=1000), r"hidden width 1000, larger than .*'s own 256: a reduction"),
    ("shallow", dict(keep_ratio=0.5, round_to=1000), r"hidden width 1000, larger than the 256 hidden units"),
    ("shallow", dict(prune_by="random"), r"prune_by must be one of first\|magnitude, got 'random'"),
    ("grouped", dict(group_size=1), r"group_size must be an integer >= 2"),
    ("grouped", dict(group_size=5), r"group_size must be an integer >= 2 and <= depth \(4\), got 5"),
    ("grouped", dict(scale=0.0), r"scale must be a number > 0"),
    ("thin", dict(keep_ratio=0.5), r"keep_ratio is a knob of shallow, not of thin"),
    ("grouped", dict(round_to=8), r"round_to is a knob of thin and shallow, not of grouped"),
    (None, dict(scale=1.0), r"scale is a knob of grouped, not of baseline"),
    ("wide", {}, r"unknown strategy 'wide'; choose from baseline, thin, shallow, grouped"),
])
def test_bad_knobs_raise(strategy, knobs, message):
    with pytest.raises(StrategyError, match=message):
        create_model(NAME, strategy, **knobs, **TINY)


@pytest.mark.parametrize("strategy", ALL)
def test_non_vit_and_gated_mlps_are_rejected(strategy):
    with pytest.raises(StrategyError, match=r"resnet10t \(ResNet\) is not a timm ViT"):
        create_model("resnet10t", strategy, num_classes=4)
    for layer, kind in [(timm.layers.SwiGLUPacked, "GluMlp"), (timm.layers.SwiGLU, "SwiGLU")]:
        with pytest.raises(StrategyError, match=rf"{NAME}: block 0's MLP is {kind} \(gated GLU/SwiGLU MLP\)"):
            create_model(NAME, strategy, mlp_layer=layer, **TINY)


def test_vit_b16_exact_figures():
    base_params = 86_567_656
    mlp_b = mlp_params(768, 3072)  # 4,722,432 per block
    expected = {None: base_params,
                "thin": base_params - 12 * (mlp_b - mlp_params(768, 1536)),    # 58,237,672
                "shallow": base_params - 12 * (mlp_b - mlp_params(768, 1536)),
                "grouped": base_params - 6 * mlp_b}                               # 58,233,064
    with torch.device("meta"):  # why: exact shapes without allocating or initialising 4 x 86M params
        counts = {s: param_count(create_model("vit_base_patch16_224", s)) for s in expected}
    assert counts == expected
    assert counts["grouped"] == 58_233_064 and counts["thin"] == 58_237_672
