"""Build timm ViTs with an MLP reduction strategy, and measure them.

    create_model('vit_base_patch16_224', strategy='grouped', scale=0.707)   # 86.57M -> 58.23M params
    model_from_cfg({"model.arch": "vit_tiny_patch16_224", "reduction.strategy": "thin", ...}, seed=0)

``model_from_cfg`` reads the ``model`` and ``reduction`` keys (declared in
``fastvit_reduce.settings``, the strategy knobs included).

``vit_base_patch16_224_dgmlp`` below is the seed's timm model and ``vit_dgmlp`` its form for any
timm ViT (what ``export`` writes for a grouped model); ``import fastvit_reduce`` registers both
with timm (see the package docstring).
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from timm.models import clean_state_dict
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from fastvit_reduce import GROUPED_MODELS  # registered with timm by the package's __init__
from fastvit_reduce.config import ConfigError, declared_keys
from fastvit_reduce.settings import KNOB_OWNERS, STRATEGY_CHOICES
from fastvit_reduce.strategies import (STRATEGIES, StrategyError, apply_grouped, model_name, param_count,
                                       timm_model, vit_blocks)


CHOICES = STRATEGY_CHOICES
KNOB_DEFAULTS = {k: knob for s in STRATEGIES.values() for k, knob in s.knobs.items()}  # knob -> Knob


def _defaults() -> dict:
    """``model.*`` and ``reduction.*`` defaults as declared in ``fastvit_reduce.settings``."""
    return {k: p.default for k, p in declared_keys(["model", "reduction"]).items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model`` (strict): our trainer checkpoint (a dict with key
    ``'model'``) or a plain timm state dict, read with ``torch.load(weights_only=True)``.

    Raises ``StrategyError`` for a missing or unreadable file, and for a state dict that does not
    fit, naming the missing/unexpected keys and the first tensors whose shapes differ.
    """
    path = Path(path)
    if not path.is_file():
        raise StrategyError(f"pretrained file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise StrategyError(f"cannot read pretrained file {path} with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise StrategyError(f"pretrained file {path} holds a {type(state).__name__}, not a state dict")
    state = clean_state_dict(state)  # timm: strips DDP/compile prefixes
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if shapes or missing or unexpected:
        parts = [f"{len(shapes)} shape(s) differ: " + "; ".join(shapes[:3]) + (", ..." if len(shapes) > 3 else "")
                 if shapes else "",
                 f"missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}" if unexpected else ""]
        raise StrategyError(f"pretrained file {path} does not fit {model_name(model)}: "
                            + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def create_model(name: str, strategy: str | None = None, pretrained_file: str | Path | None = None,
                 round_to: int = 1, **knobs_and_timm_kwargs) -> nn.Module:
    """timm model ``name`` with ``strategy`` (None or 'baseline' = none) applied.

    Knobs: thin ``mlp_ratio``; shallow ``keep_ratio``, ``prune_by``; grouped ``scale``,
    ``group_size``; ``round_to`` (thin and shallow) rounds hidden widths to a multiple of it.
    Everything else goes to ``timm.create_model``.

    ``pretrained_file`` (a local state dict) is loaded into the model timm builds, before any
    surgery, so shallow prunes and grouped shares trained weights. For a grouped name
    (``GROUPED_MODELS``) the model's own entry loads it (``vit_dgmlp``). For ``thin`` it is loaded
    into the thin model itself: a full-width file is an error naming the shapes (why not slice:
    keeping the first hidden units of a trained model is ``shallow``'s job, ``prune_by=first``;
    thin means "trained thin from the start", and a silent slice would make the two the same).
    Raises ``StrategyError`` for an unknown strategy, a knob of another strategy, a bad knob
    value, a non-ViT model or a pretrained file that does not fit.
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
    if pretrained_file and name in GROUPED_MODELS:
        kwargs["pretrained_file"], pretrained_file = pretrained_file, None  # loaded before its grouping
    if spec and spec.at_creation:
        model = spec.apply(name, **knobs, **kwargs)
    else:
        model = timm_model(name, **kwargs)
    if pretrained_file:
        try:
            load_pretrained(model, pretrained_file)
        except StrategyError as e:
            hint = (" (thin builds thin MLPs from scratch; to start from full-width weights use "
                    "reduction.strategy=shallow)" if strategy == "thin" else "")
            raise StrategyError(f"{e}{hint}") from None
    return spec.apply(model, **knobs) if spec and not spec.at_creation else model


def model_from_cfg(cfg: dict, *, dynamic_img_size: bool = False, seed: int | None = None,
                   **timm_overrides) -> nn.Module:
    """``create_model`` from a flat resolved config dict (``{"model.arch": ..., "reduction.strategy":
    ..., "reduction.mlp_ratio": ...}``; a missing ``model.*`` / ``reduction.*`` key takes its default).

    Only the chosen strategy's knobs are passed. A knob of another strategy whose value differs
    from its default raises ``ConfigError`` (it would silently do nothing). With ``seed``,
    ``torch.manual_seed(seed)`` runs just before timm builds the model, so variants built from the
    full model (shallow, grouped) start from the same weights before their surgery.
    """
    defaults = _defaults()

    def get(key):
        return cfg[key] if key in cfg else defaults[key]

    strategy = get("reduction.strategy")
    own = STRATEGIES[strategy].knobs if strategy in STRATEGIES else {}
    stray = [k for k, knob in KNOB_DEFAULTS.items()
             if k not in own and f"reduction.{k}" in cfg and not _same(knob, cfg[f"reduction.{k}"])]
    if stray:
        raise ConfigError("configuration error:\n  " + "\n  ".join(
            f"'reduction.{k}' is a knob of {' and '.join(KNOB_OWNERS[k])}, but reduction.strategy is "
            f"{strategy!r}" for k in stray))
    kwargs = dict(num_classes=get("model.num_classes"), img_size=get("model.img_size"),
                  drop_path_rate=get("model.drop_path"))
    if get("model.patch_size"):
        kwargs["patch_size"] = get("model.patch_size")
    if dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    kwargs.update(timm_overrides)
    kwargs.update({k: get(f"reduction.{k}") for k in own})
    if seed is not None:
        torch.manual_seed(seed)
    return create_model(get("model.arch"), strategy=strategy, pretrained_file=get("model.pretrained_file") or None,
                        **kwargs)


def _same(knob, value) -> bool:
    """``value`` equals the knob's default once both pass its checker (``"0.707"`` == 0.707)."""
    try:
        return knob.checker.check(value) == knob.checker.check(knob.default)
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- grouped model names
# (registered with timm by fastvit_reduce/__init__.py, which forwards here)
def vit_dgmlp(base_arch: str = "vit_base_patch16_224", pretrained: bool = False, mlp_scale: float = 1 / math.sqrt(2),
              group_size: int = 2, pretrained_file: str | Path | None = None, **kwargs) -> nn.Module:
    """Any timm ViT ``base_arch`` with grouped MLPs: timm builds it (same init, same
    ``pretrained_cfg``), then ``apply_grouped(scale=mlp_scale, group_size=group_size)``. This is
    the name ``fastvit-reduce export`` writes into a grouped model's ``config.json``.

    Weights (``pretrained=True``; hub downloads are off, so a local file is needed, else
    ``StrategyError``): from ``pretrained_file``, timm's ``pretrained_cfg_overlay=dict(file=...)``,
    or the folder of ``timm.create_model('local-dir:DIR', pretrained=True)``. A grouped export
    (``model.safetensors`` marked by ``fastvit_reduce.tied``) is loaded after the grouping, its
    shared tensors once; any other file holds a full model's weights and is loaded before the
    grouping (the seed's way to start DG-ViT from a trained ViT). A ``pretrained_file`` alone
    implies ``pretrained``. Other ``kwargs`` go to timm's ``base_arch`` (img_size, num_classes, ...).
    """
    from timm.models import model_entrypoint

    from fastvit_reduce.tied import is_tied, load_tied
    cfg, overlay = kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay") or {}
    cfg_file = cfg.get("file") if isinstance(cfg, dict) else None  # local-dir: the export's folder
    file = pretrained_file or ((overlay.get("file") or cfg_file) if pretrained else None)
    if pretrained and not file:
        raise StrategyError(f"{base_arch} grouped: pretrained=True needs a local file (pretrained_file=PATH, "
                            "model.pretrained_file or local-dir:FOLDER); hub downloads are off")
    if file and Path(file).is_dir():
        file = Path(file) / "model.safetensors"
    model = model_entrypoint(base_arch)(pretrained=False, **kwargs)
    if file and is_tied(file):
        model = apply_grouped(model, scale=mlp_scale, group_size=group_size)
        try:
            load_tied(model, file)
        except ValueError as e:
            raise StrategyError(str(e)) from None
        return model
    if file:
        load_pretrained(model, file)
    return apply_grouped(model, scale=mlp_scale, group_size=group_size)


def vit_base_patch16_224_dgmlp(pretrained: bool = False, mlp_scale: float = 1 / math.sqrt(2),
                               pretrained_file: str | Path | None = None, **kwargs) -> nn.Module:
    """The seed's DG-ViT-B/16 (its ``parameter_reduction/strategies/dg_vit.py``): timm's standard
    ``vit_base_patch16_224``, then adjacent blocks share one MLP scaled by ``mlp_scale``
    (= ``apply_grouped(scale=mlp_scale, group_size=2)``; 58,233,064 params at 1000 classes).
    Weights as ``vit_dgmlp``; ``group_size`` (default 2) as there."""
    kwargs.setdefault("group_size", 2)
    return vit_dgmlp("vit_base_patch16_224", pretrained=pretrained, mlp_scale=mlp_scale,
                     pretrained_file=pretrained_file, **kwargs)


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
