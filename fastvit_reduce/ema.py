"""EMA of the model weights that updates a shared (grouped-MLP) tensor once per step.

Built on timm's ``ModelEmaV3`` (decay warm-up, foreach lerp, bf16 stochastic rounding, EMA on
another device/dtype). Why the update is replaced: ``ModelEmaV3`` zips ``state_dict().values()``,
which lists a tensor shared by two blocks once per block, so a grouped MLP is lerped twice per
step (decay d**2 instead of d). Here the de-duplicated ``parameters()`` / ``buffers()`` lists
are zipped instead; the EMA copy is a ``deepcopy``, which keeps the sharing, so both lists line
up one to one. ``shared_tensors="per_name"`` keeps timm's update (the seed's behaviour), for
reproducing the paper's grouped numbers (``ema.shared_tensors``).
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from fastvit_reduce.models import unwrap


class ModelEma(ModelEmaV3):
    """``ModelEmaV3`` whose ``update(model, step=None)`` moves each distinct tensor exactly once.

    ``model`` may be wrapped in DDP and/or ``torch.compile``; ``.module`` is the averaged copy
    (sharing preserved). Extra keyword arguments go to ``ModelEmaV3`` (e.g. ``use_warmup``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, device: torch.device | None = None,
                 shared_tensors: str = "once", **timm_kwargs):
        if shared_tensors not in ("once", "per_name"):
            raise ValueError(f"shared_tensors must be once or per_name, got {shared_tensors!r}")
        model = unwrap(model)
        if device is not None:
            # why: timm turns foreach off when device != the parameters' device, and
            # torch.device("cuda") != torch.device("cuda", 0); the same device by another name
            # must not cost the one-kernel update
            device, here = torch.device(device), next(model.parameters()).device
            if device.type == here.type and device.index is None:
                device = here
        super().__init__(model, decay=decay, device=device, **timm_kwargs)
        self.shared_tensors = shared_tensors

    def _pairs(self, model: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, model tensors) of ``kind`` 'parameters' or 'buffers', each tensor once."""
        ema = list(getattr(self.module, kind)())
        src = list(getattr(unwrap(model), kind)())
        if len(ema) != len(src) or any(e.shape != s.shape for e, s in zip(ema, src)):
            raise ValueError(f"EMA and model {kind} differ ({len(ema)} vs {len(src)} tensors): "
                             "was the model changed after the EMA was created?")
        return ema, src

    def _lerp_all(self, ema: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
        if self.foreach:
            self._foreach_lerp_(ema, src, weight=weight)
        else:
            for e, s in zip(ema, src):
                self._lerp_(e, s.to(device=self.device), weight=weight)

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """Lerp parameters and floating buffers toward ``model`` by ``1 - decay``; copy the rest."""
        if self.shared_tensors == "per_name":  # timm's: every state_dict name, a shared tensor twice
            super().apply_update_(unwrap(model), decay)
            return
        ema, src = self._pairs(model, "parameters")
        for e, s in zip(*self._pairs(model, "buffers")):
            if e.is_floating_point():
                ema.append(e)
                src.append(s)
            else:
                e.copy_(s.to(device=e.device))
        self._lerp_all(ema, src, 1.0 - decay)

    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        """Lerp parameters toward ``model`` by ``1 - decay``; copy buffers."""
        self._lerp_all(*self._pairs(model, "parameters"), 1.0 - decay)
        for e, s in zip(*self._pairs(model, "buffers")):
            e.copy_(s.to(device=e.device))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into the EMA."""
        for kind in ("parameters", "buffers"):
            for e, s in zip(*self._pairs(model, kind)):
                e.copy_(s.to(device=e.device, dtype=e.dtype))
