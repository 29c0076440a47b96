"""fastvit_reduce.ema.ModelEma: each distinct tensor moves once per update, even when grouped blocks share it."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT
from timm.utils import ModelEmaV3

from fastvit_reduce import create_model
from fastvit_reduce.ema import ModelEma

NAME = TINY_VIT["model_name"]
TINY = {k: v for k, v in TINY_VIT.items() if k != "model_name"}


def grouped(seed=0):
    torch.manual_seed(seed)
    return create_model(NAME, "grouped", **TINY)


def moved_fraction(ema_cls, **kwargs) -> tuple[float, float]:
    """Fraction of the way (shared MLP weight, unshared attention weight) the EMA moves toward a
    model that jumped by +1 everywhere, after one update with decay 0.5."""
    model = grouped()
    ema = ema_cls(model, decay=0.5, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    frac = lambda name: (ema.module.get_parameter(name) - (model.get_parameter(name) - 1)).mean().item()  # noqa: E731
    return frac("blocks.0.mlp.fc1.weight"), frac("blocks.0.attn.qkv.weight")


@pytest.mark.parametrize("kwargs", [{}, dict(foreach=False), dict(exclude_buffers=True)])
def test_shared_tensor_updated_exactly_once(kwargs):
    shared, unshared = moved_fraction(ModelEma, **kwargs)
    assert shared == pytest.approx(0.5) and unshared == pytest.approx(0.5)  # decay d, not d**2


def test_timm_model_ema_v3_double_update_is_what_we_fix():
    # If timm ever updates shared tensors once, this fails and fastvit_reduce.ema can go.
    shared, unshared = moved_fraction(ModelEmaV3)
    assert shared == pytest.approx(0.75) and unshared == pytest.approx(0.5)


def test_sharing_preserved_and_state_dict_round_trip():
    model = grouped()
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(torch.compile(model))  # wrappers (compile, DDP) are unwrapped; nothing is compiled here
    assert ema.module.blocks[0].mlp is ema.module.blocks[1].mlp
    fresh = ModelEma(grouped(seed=5), decay=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.module.blocks[2].mlp is fresh.module.blocks[3].mlp
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.module(x), ema.module(x))


def test_changed_model_is_rejected():
    ema = ModelEma(grouped(), decay=0.9)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="EMA and model parameters differ"):
        ema.update(create_model(NAME, **TINY))
