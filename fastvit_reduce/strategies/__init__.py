"""MLP reduction strategies for timm ViTs, one file each, registered in ``STRATEGIES``.

A strategy is a plain function plus its knobs (default + allowed range):

* ``thin``     — ``apply_thin(name, mlp_ratio, round_to, **timm_kwargs)``: a creation-time hook,
  builds the model with a smaller ``mlp_ratio`` (the full model is never built).
* ``shallow``  — ``apply_shallow(model, keep_ratio, prune_by, round_to)``: cuts hidden units
  out of every MLP of a built (possibly trained) model.
* ``grouped``  — ``apply_grouped(model, scale, group_size)``: consecutive blocks share one MLP.

Baseline is "no strategy". Every application logs one line through ``logging`` and a surgery
that would change nothing raises ``StrategyError``.

Hidden-width rounding (thin and shallow): the ideal width ``x`` (``mlp_ratio * embed_dim`` or
``keep_ratio * hidden``) becomes the nearest multiple of ``round_to``, halves rounded up, and at
least ``round_to`` (``round_width``). ``round_to=1`` is plain rounding; ``round_to=8`` keeps
matmul shapes tensor-core friendly. Note timm itself truncates (``int(dim * mlp_ratio)``);
``thin`` hands timm a ratio that truncates to our rounded width.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import timm
from timm.layers import Mlp
from torch import nn

from fastvit_reduce.config import Checker
from fastvit_reduce.settings import STRATEGY_KNOBS

log = logging.getLogger("fastvit_reduce.strategies")


class StrategyError(ValueError):
    """A strategy cannot be applied: bad knob, unsupported model, or a no-op surgery."""


class Knob(NamedTuple):
    """One strategy setting: its default, a ``fastvit_reduce.config`` checker, and a description."""
    default: object
    checker: Checker
    help: str


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: ``apply`` plus its knobs.

    ``at_creation`` strategies are called as ``apply(name, **knobs, **timm_kwargs)`` and build
    the model; the others are called as ``apply(model, **knobs)`` on a built model.
    """
    name: str
    apply: Callable[..., nn.Module]
    knobs: dict[str, Knob]
    at_creation: bool = False


def strategy_knobs(strategy: str) -> dict[str, Knob]:
    """``strategy``'s knobs as declared in ``fastvit_reduce.settings.STRATEGY_KNOBS``."""
    return {name: Knob(*spec) for name, spec in STRATEGY_KNOBS[strategy].items()}


def check_knobs(strategy: str, knobs: dict[str, Knob], given: dict[str, object]) -> dict[str, object]:
    """Validate ``given`` against ``knobs``; return all knob values (defaults filled in).

    Raises ``StrategyError`` naming the knob and its allowed range.
    """
    unknown = sorted(set(given) - set(knobs))
    if unknown:
        raise StrategyError(f"{strategy}: unknown knob(s) {', '.join(unknown)}; "
                            f"{strategy} takes {', '.join(knobs)}")
    out = {}
    for name, knob in knobs.items():
        value = given.get(name, knob.default)
        try:
            out[name] = knob.checker.check(value)
        except (TypeError, ValueError):
            raise StrategyError(f"{strategy}: {name} must be {knob.checker.help()}, got {value!r}") from None
    return out


def round_width(x: float, round_to: int = 1) -> int:
    """Integer hidden width for an ideal width ``x``: nearest multiple of ``round_to``
    (halves up), at least ``round_to``."""
    return max(round_to, math.floor(x / round_to + 0.5) * round_to)


def model_name(model: nn.Module) -> str:
    """timm architecture name of ``model`` (its class name if timm did not record one)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT whose MLPs are plain ``fc1 -> act -> fc2`` Linears.

    Raises ``StrategyError`` naming the model and the reason for anything else (a ResNet, a
    ViT with parallel blocks, a gated GLU/SwiGLU MLP, a conv MLP).
    """
    name = model_name(model)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise StrategyError(f"{name} ({type(model).__name__}) is not a timm ViT: MLP strategies need "
                            "model.blocks[i].mlp.fc1/fc2 (vit_*, deit_*, deit3_*, ...)")
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise StrategyError(f"{name}: block {i} ({type(block).__name__}) has no .mlp "
                                "(parallel or fused blocks are not supported)")
        if not isinstance(mlp, Mlp):
            kind = "gated GLU/SwiGLU MLP" if "glu" in type(mlp).__name__.lower() else "not timm's plain Mlp"
            raise StrategyError(f"{name}: block {i}'s MLP is {type(mlp).__name__} ({kind}); "
                                "strategies need a plain fc1 -> act -> fc2 MLP")
        if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            raise StrategyError(f"{name}: block {i}'s MLP uses {type(mlp.fc1).__name__} layers; "
                                "strategies need nn.Linear fc1/fc2")
    return list(blocks)


def timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with clear errors for an unknown name or arguments the model rejects."""
    if not timm.is_model(name):
        raise StrategyError(f"unknown timm model {name!r}")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # e.g. a ResNet given img_size
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise StrategyError(f"timm cannot build {name} with {args}: {e} (MLP strategies need a timm ViT)") from None


def param_count(model: nn.Module) -> int:
    """Number of unique parameters (a tensor shared by several blocks counts once)."""
    return sum(p.numel() for p in model.parameters())


def millions(n: int) -> str:
    """``86567656 -> '86.57M'`` for log lines."""
    return f"{n / 1e6:.2f}M"


# why here: the strategy modules import the helpers above.
from fastvit_reduce.strategies.grouped import KNOBS as _GROUPED_KNOBS, apply_grouped  # noqa: E402
from fastvit_reduce.strategies.shallow import KNOBS as _SHALLOW_KNOBS, apply_shallow  # noqa: E402
from fastvit_reduce.strategies.thin import KNOBS as _THIN_KNOBS, apply_thin  # noqa: E402

STRATEGIES: dict[str, Strategy] = {
    "thin": Strategy("thin", apply_thin, _THIN_KNOBS, at_creation=True),
    "shallow": Strategy("shallow", apply_shallow, _SHALLOW_KNOBS),
    "grouped": Strategy("grouped", apply_grouped, _GROUPED_KNOBS),
}

__all__ = ["STRATEGIES", "Strategy", "StrategyError", "Knob", "check_knobs", "round_width",
           "strategy_knobs", "vit_blocks", "timm_model", "param_count", "model_name", "apply_thin", "apply_shallow", "apply_grouped"]
