"""ThinMLP: build the ViT with a smaller ``mlp_ratio`` (ViT-B at 2.0: 768 -> 1536 -> 768).

A creation-time hook: timm builds the thin MLPs with its own init, so the full model is never
allocated (only a ``meta``-device copy, to learn the embed dim and the baseline size).
"""
from __future__ import annotations

import torch
from torch import nn

from fastvit_reduce.strategies import (StrategyError, strategy_knobs, check_knobs, log, millions, param_count,
                                       round_width, timm_model, vit_blocks)

KNOBS = strategy_knobs("thin")  # defaults and ranges: fastvit_reduce/settings.py


def apply_thin(name: str, mlp_ratio: float = 2.0, round_to: int = 1, **timm_kwargs) -> nn.Module:
    """Build timm model ``name`` with MLP hidden width ``round_width(mlp_ratio * embed_dim, round_to)``.

    ``timm_kwargs`` go to ``timm.create_model``. Raises ``StrategyError`` for non-ViT models,
    bad knobs, or a width equal to the arch's own (nothing would change).
    """
    knobs = check_knobs("thin", KNOBS, dict(mlp_ratio=mlp_ratio, round_to=round_to))
    meta_kwargs = {k: v for k, v in timm_kwargs.items() if k != "pretrained"}
    with torch.device("meta"):  # why: shapes and sizes only, no memory, no init cost
        full = timm_model(name, **meta_kwargs)
    blocks = vit_blocks(full)
    dim, old = blocks[0].mlp.fc1.in_features, blocks[0].mlp.fc1.out_features
    hidden = round_width(knobs["mlp_ratio"] * dim, knobs["round_to"])
    if hidden == old:
        raise StrategyError(f"thin: mlp_ratio {knobs['mlp_ratio']} (round_to {knobs['round_to']}) gives "
                            f"hidden width {hidden}, which {name} already has: nothing would change")
    if hidden > old:  # e.g. round_to=1000 on ViT-B at 2.0: 1536 -> 2000; a "reduction" must shrink
        raise StrategyError(f"thin: mlp_ratio {knobs['mlp_ratio']} (round_to {knobs['round_to']}) gives "
                            f"hidden width {hidden}, larger than {name}'s own {old}: a reduction must "
                            "make the MLP smaller")
    # why +0.5: timm truncates int(dim * mlp_ratio); this ratio truncates to exactly `hidden`.
    model = timm_model(name, mlp_ratio=(hidden + 0.5) / dim, **timm_kwargs)
    widths = {b.mlp.fc1.out_features for b in vit_blocks(model)}
    if widths != {hidden}:
        raise StrategyError(f"thin: {name} built MLP widths {sorted(widths)}, expected {hidden}")
    log.info("thin: %d blocks, MLP hidden %d -> %d (mlp_ratio %g), params %s -> %s", len(blocks), old,
             hidden, knobs["mlp_ratio"], millions(param_count(full)), millions(param_count(model)))
    return model
