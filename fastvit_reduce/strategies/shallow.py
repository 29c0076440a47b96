"""ShallowMLP: cut hidden units out of every MLP of a built (possibly trained) ViT.

For each block, keep ``k = round_width(keep_ratio * hidden, round_to)`` hidden units: rows of
``fc1.weight`` and ``fc1.bias``, columns of ``fc2.weight``; ``fc2.bias`` is kept whole (it lives
in the embed dim). ``prune_by='first'`` keeps units ``0..k-1`` (as the seed does);
``'magnitude'`` keeps the ``k`` units with the largest ``||fc1 row|| * ||fc2 column||``, which is
what you want when pruning a trained model. Kept units stay in their original order.
"""
from __future__ import annotations

import torch
from torch import nn

from fastvit_reduce.strategies import (StrategyError, strategy_knobs, check_knobs, log, millions, model_name,
                                       param_count, round_width, vit_blocks)

KNOBS = strategy_knobs("shallow")  # defaults and ranges: fastvit_reduce/settings.py


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` (same dtype/device/requires_grad) holding ``layer``'s selected rows/columns."""
    w = layer.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    b = layer.bias
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    out.weight.requires_grad_(layer.weight.requires_grad)
    if b is not None:
        out.bias.data.copy_(b.detach() if rows is None else b.detach()[rows])
        out.bias.requires_grad_(b.requires_grad)
    return out


@torch.no_grad()
def apply_shallow(model: nn.Module, keep_ratio: float = 0.5, prune_by: str = "first", round_to: int = 1) -> nn.Module:
    """Prune every block's MLP hidden width in place and return ``model``.

    Raises ``StrategyError`` for non-ViT models, bad knobs, MLPs with a hidden-width norm, or a
    ``keep_ratio`` that keeps every unit.
    """
    knobs = check_knobs("shallow", KNOBS, dict(keep_ratio=keep_ratio, prune_by=prune_by, round_to=round_to))
    blocks = vit_blocks(model)
    before = param_count(model)
    widths = set()
    for mlp in {id(b.mlp): b.mlp for b in blocks}.values():  # a shared MLP is pruned once
        hidden = mlp.fc1.out_features
        k = round_width(knobs["keep_ratio"] * hidden, knobs["round_to"])
        if k > hidden:  # round_to rounded the kept width past the MLP's own
            raise StrategyError(f"shallow: keep_ratio {knobs['keep_ratio']} (round_to {knobs['round_to']}) "
                                f"gives hidden width {k}, larger than the {hidden} hidden units of "
                                f"{model_name(model)}: a reduction must make the MLP smaller")
        if k == hidden:
            raise StrategyError(f"shallow: keep_ratio {knobs['keep_ratio']} (round_to {knobs['round_to']}) keeps "
                                f"all {hidden} hidden units of {model_name(model)}: nothing would change")
        if not isinstance(mlp.norm, nn.Identity):
            raise StrategyError(f"shallow: {model_name(model)} has a norm on the MLP hidden layer "
                                "(scale_mlp_norm); pruning it is not supported")
        if knobs["prune_by"] == "first":
            keep = torch.arange(k, device=mlp.fc1.weight.device)
        else:  # magnitude: (hidden,) score per unit, in and out weights together
            score = mlp.fc1.weight.float().norm(dim=1) * mlp.fc2.weight.float().norm(dim=0)
            keep = score.topk(k).indices.sort().values
        mlp.fc1 = _sliced_linear(mlp.fc1, rows=keep)
        mlp.fc2 = _sliced_linear(mlp.fc2, cols=keep)
        widths.add((hidden, k))
    desc = ", ".join(f"{h} -> {k}" for h, k in sorted(widths))
    log.info("shallow: %d blocks, MLP hidden %s (keep_ratio %g, by %s), params %s -> %s", len(blocks), desc,
             knobs["keep_ratio"], knobs["prune_by"], millions(before), millions(param_count(model)))
    return model
