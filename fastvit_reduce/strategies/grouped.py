"""GroupedMLP: consecutive blocks share one MLP module.

With ``group_size`` g, blocks ``(0..g-1), (g..2g-1), ...`` each use the MLP of the group's first
block; the other blocks' MLPs are dropped. Before sharing, the kept MLP's ``fc1.weight``,
``fc1.bias`` and ``fc2.weight`` are multiplied by ``scale`` (``fc2.bias`` is not), as the seed
does (0.707 = 1/sqrt(2) offsets the shared weights receiving two blocks' gradients). When g
does not divide the depth, the trailing ``depth % g`` blocks keep their own, unscaled MLPs.

Sharing is by module reference, so ``parameters()`` (optimizer, grad clipping, DDP) sees one
copy, while ``state_dict()`` lists a shared tensor under every block's name (loading it into a
fresh grouped model writes the same values twice; sharing is untouched).
"""
from __future__ import annotations

import torch
from torch import nn

from fastvit_reduce.strategies import (StrategyError, strategy_knobs, check_knobs, log, millions, model_name,
                                       param_count, vit_blocks)

KNOBS = strategy_knobs("grouped")  # defaults and ranges: fastvit_reduce/settings.py


@torch.no_grad()
def apply_grouped(model: nn.Module, scale: float = 0.707, group_size: int = 2) -> nn.Module:
    """Make each group of ``group_size`` consecutive blocks share one (scaled) MLP; return ``model``.

    Raises ``StrategyError`` for non-ViT models, bad knobs, ``group_size`` > depth, or a model
    whose MLPs are already shared.
    """
    knobs = check_knobs("grouped", KNOBS, dict(scale=scale, group_size=group_size))
    blocks = vit_blocks(model)
    depth, g, s = len(blocks), knobs["group_size"], knobs["scale"]
    if g > depth:
        raise StrategyError(f"grouped: group_size must be an integer >= 2 and <= depth ({depth}), got {g}")
    if len({id(b.mlp) for b in blocks}) != depth:
        raise StrategyError(f"grouped: {model_name(model)} already shares MLPs between blocks")
    before = param_count(model)
    full = depth - depth % g  # blocks in complete groups
    for start in range(0, full, g):
        mlp = blocks[start].mlp
        mlp.fc1.weight.mul_(s)
        if mlp.fc1.bias is not None:
            mlp.fc1.bias.mul_(s)
        mlp.fc2.weight.mul_(s)
        for block in blocks[start + 1:start + g]:
            block.mlp = mlp
    unique = full // g + depth - full
    trailing = ("" if full == depth else f"; trailing block {full} keeps its own MLP" if full == depth - 1
                else f"; trailing blocks {full}-{depth - 1} keep their own MLPs")
    log.info("grouped: %d blocks -> %d MLPs (scale %g, group_size %d%s), params %s -> %s", depth, unique, s, g,
             trailing, millions(before), millions(param_count(model)))
    return model
