"""Weights of a grouped (tied) ViT in one ``model.safetensors``: each shared tensor stored once.

``state_dict()`` lists an MLP shared by g blocks under every block's name, all views of one tensor;
safetensors refuses tensors that share memory, and storing the copies would give the file the size
of the ungrouped model. So the file holds each tensor under its first name, and its metadata says
so (``TIED``); ``load_tied`` fills the other names by building the grouped model first, where
they already share the tensor. timm's own loader (a strict ``load_state_dict``) would call those
names missing, which is why a tied file is loaded by the registered grouped model names
(``fastvit_reduce.models.vit_dgmlp``) and a plain timm ViT gets ``export --untie`` instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TIED = {"fastvit_reduce": "grouped-tied"}  # safetensors metadata of a tied file


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tensor once, under its first name (contiguous CPU copies)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if _key(t) in seen:
            continue
        seen.add(_key(t))
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def save_tied(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file
    save_file(unique_state(model), str(path), metadata={"format": "pt", **TIED})


def is_tied(path: str | Path) -> bool:
    """True for a ``.safetensors`` file written by ``save_tied``."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return all(meta.get(k) == v for k, v in TIED.items())


def load_tied(model: nn.Module, path: str | Path) -> None:
    """Load a ``save_tied`` file into an already grouped ``model``; ``ValueError`` naming the
    names that are neither in the file nor share their tensor with one that is."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    own = model.state_dict()
    first = {}
    for name, t in own.items():
        first.setdefault(_key(t), name)
    missing = [n for n, t in own.items() if n not in state and first[_key(t)] not in state]
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this grouped model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} (a different group_size or architecture?)")
    model.load_state_dict(state, strict=False)  # why not strict: the aliases are filled by sharing
