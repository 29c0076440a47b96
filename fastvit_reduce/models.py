"""Build timm ViTs with an MLP reduction strategy, and measure them.

    create_model('vit_base_patch16_224', strategy='grouped', scale=0.707)   # 86.57M -> 58.23M params

Config sections ``model`` and ``reduction`` (read by ``model_from_config``) live here; the
``reduction`` knobs, their defaults and ranges come from the strategy registry.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from fastargs import Param, Section, get_current_config
from timm.models import clean_state_dict
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from fastvit_reduce.config import Choice, ConfigError, Number
from fastvit_reduce.strategies import (STRATEGIES, StrategyError, model_name, param_count, timm_model,
                                       vit_blocks)

CHOICES = ("baseline", *STRATEGIES)
KNOB_OWNERS = {k: [s.name for s in STRATEGIES.values() if k in s.knobs]
               for s in STRATEGIES.values() for k in s.knobs}  # knob -> strategies taking it

Section("model", "the timm ViT to build").params(
    arch=Param(str, "timm model name", default="vit_base_patch16_224"),
    num_classes=Param(Number(int, 1), "classifier outputs", default=1000),
    img_size=Param(Number(int, 1), "model input size in px (sets the position embedding)", default=224),
    patch_size=Param(Number(int, 0), "patch size in px (0 = the arch's)", default=0),
    drop_path=Param(Number(float, 0, 1, hi_open=True), "stochastic depth rate", default=0.1),
    checkpoint=Param(str, "baseline state dict loaded before the surgery ('' = none)", default=""),
)
Section("reduction", "MLP reduction strategy and its knobs (see fastvit_reduce/strategies)").params(
    strategy=Param(Choice(*CHOICES), "MLP reduction strategy", default="baseline"),
    **{k: Param(knob.checker, f"{knob.help} ({'/'.join(KNOB_OWNERS[k])})", default=knob.default)
       for s in STRATEGIES.values() for k, knob in s.knobs.items()},
)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into ``model`` (strict): our trainer checkpoint (a dict with key
    ``'model'``) or a plain timm state dict, read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise StrategyError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise StrategyError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise StrategyError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(clean_state_dict(state))  # timm: strips DDP/compile prefixes
    except RuntimeError as e:
        raise StrategyError(f"checkpoint {path} does not fit {model_name(model)}: {e}") from None


def create_model(name: str, strategy: str | None = None, checkpoint: str | Path | None = None,
                 round_to: int = 1, **knobs_and_timm_kwargs) -> nn.Module:
    """timm model ``name`` with ``strategy`` (None or 'baseline' = none) applied.

    Knobs: thin ``mlp_ratio``; shallow ``keep_ratio``, ``prune_by``; grouped ``scale``,
    ``group_size``; ``round_to`` (thin and shallow) rounds hidden widths to a multiple of it.
    Everything else goes to ``timm.create_model``. ``checkpoint`` is loaded into the model timm
    builds, before any surgery (for thin that is the thin model itself). Raises ``StrategyError``
    for an unknown strategy, a knob of another strategy, a bad knob value or a non-ViT model.
    """
    strategy = strategy or "baseline"
    if strategy not in CHOICES:
        raise StrategyError(f"unknown strategy {strategy!r}; choose from {', '.join(CHOICES)}")
    spec = STRATEGIES.get(strategy)
    own = spec.knobs if spec else {}
    kwargs = dict(knobs_and_timm_kwargs)
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOB_OWNERS}
    if round_to != 1 or "round_to" in own:
        knobs["round_to"] = round_to
    for k in knobs:
        if k not in own:
            raise StrategyError(f"{k} is a knob of {' and '.join(KNOB_OWNERS[k])}, not of {strategy}")
    if spec and spec.at_creation:
        model = spec.apply(name, **knobs, **kwargs)
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return model
    model = timm_model(name, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return spec.apply(model, **knobs) if spec else model


def model_from_config(dynamic_img_size: bool = False, **timm_overrides) -> nn.Module:
    """``create_model`` from the current ``model.*`` / ``reduction.*`` config.

    Only the chosen strategy's knobs are passed; a knob of another strategy set explicitly in
    the config raises ``ConfigError`` (it would silently do nothing).
    """
    cfg = get_current_config()
    strategy = cfg["reduction.strategy"]
    own = STRATEGIES[strategy].knobs if strategy in STRATEGIES else {}
    stray = [k for k in KNOB_OWNERS if k not in own and ("reduction", k) in cfg.content]
    if stray:
        raise ConfigError("configuration error:\n  " + "\n  ".join(
            f"'reduction.{k}' is a knob of {' and '.join(KNOB_OWNERS[k])}, but reduction.strategy is "
            f"{strategy!r}" for k in stray))
    kwargs = dict(num_classes=cfg["model.num_classes"], img_size=cfg["model.img_size"],
                  drop_path_rate=cfg["model.drop_path"])
    if cfg["model.patch_size"]:
        kwargs["patch_size"] = cfg["model.patch_size"]
    if dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    kwargs.update(timm_overrides)
    kwargs.update({k: cfg[f"reduction.{k}"] for k in own})
    return create_model(cfg["model.arch"], strategy=strategy, checkpoint=cfg["model.checkpoint"] or None, **kwargs)


def mlp_stats(model: nn.Module) -> dict:
    """``params`` (unique), ``mlp_params`` (unique MLP parameters), ``unique_mlps`` (distinct MLP
    modules) and ``mlp_hidden`` (hidden width; a sorted list if blocks differ) of a timm ViT."""
    model = unwrap(model)
    mlps = list({id(b.mlp): b.mlp for b in vit_blocks(model)}.values())
    mlp_params = {id(p): p.numel() for m in mlps for p in m.parameters()}
    widths = sorted({m.fc1.out_features for m in mlps})
    return dict(params=param_count(model), mlp_params=sum(mlp_params.values()), unique_mlps=len(mlps),
                mlp_hidden=widths[0] if len(widths) == 1 else widths)


@torch.no_grad()
def gflops(model: nn.Module, img_size: int) -> float:
    """Forward GFLOPs for one ``img_size`` x ``img_size`` image, counted by
    ``torch.utils.flop_counter`` (1 multiply-add = 2 FLOPs; ViT-B/16 at 224: 35.13)."""
    model = unwrap(model)
    p = next(model.parameters())
    in_chans = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 3)
    x = torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        # why MATH: FlopCounterMode has no formula for the fused CPU attention kernel, so the
        # attention matmuls (1.4 of ViT-B's 35.1 GFLOPs) would go uncounted.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
