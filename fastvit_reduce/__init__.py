"""fastvit_reduce: train parameter-reduced ViTs with FFCV + timm.

Importing the package registers the seed's timm model name and its form for any timm ViT
(``GROUPED_MODELS``: ``vit_base_patch16_224_dgmlp``, ``vit_dgmlp``) without importing torch or
timm itself:

* timm already imported -> they are registered now;
* otherwise a one-shot import hook registers them right after timm's own ``__init__`` finishes,
  so ``import fastvit_reduce; import timm; timm.create_model('vit_base_patch16_224_dgmlp')`` works,
  and so does ``model.arch: vit_base_patch16_224_dgmlp`` (every ``fastvit_reduce.*`` import runs
  this file first).

why a hook and not an eager import: ``fastvit-reduce <cmd>`` imports this package, and torch +
timm cost ~3 s to import, which ``--help``, ``sample`` or ``inspect`` should not pay. The entry
registered here only forwards to ``fastvit_reduce.models`` when called, so registering never
imports our own torch modules (no import cycle when one of them is the first to import timm).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

SEED_MODELS = ("vit_base_patch16_224_dgmlp",)  # the seed's dg_vit.py names
GROUPED_MODELS = SEED_MODELS + ("vit_dgmlp",)  # + grouped MLPs on any timm ViT (base_arch=...): export's name


def __getattr__(name):
    # why lazy: see the module docstring (torch + timm cost ~3 s to import).
    if name == "create_model":
        from fastvit_reduce.models import create_model
        return create_model
    raise AttributeError(f"module 'fastvit_reduce' has no attribute {name!r}")


def vit_base_patch16_224_dgmlp(pretrained: bool = False, **kwargs):
    """timm entry point of the seed's DG-ViT-B/16; see ``fastvit_reduce.models.vit_base_patch16_224_dgmlp``."""
    from fastvit_reduce.models import vit_base_patch16_224_dgmlp as build
    return build(pretrained=pretrained, **kwargs)


def vit_dgmlp(pretrained: bool = False, **kwargs):
    """timm entry point of a grouped-MLP ViT (``base_arch=...``); see ``fastvit_reduce.models.vit_dgmlp``."""
    from fastvit_reduce.models import vit_dgmlp as build
    return build(pretrained=pretrained, **kwargs)


def register_seed_models() -> None:
    """Register ``GROUPED_MODELS`` in timm's registry (idempotent: timm warns on a second registration)."""
    from timm.models import is_model, register_model
    for fn in (vit_base_patch16_224_dgmlp, vit_dgmlp):
        if not is_model(fn.__name__):
            register_model(fn)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``timm`` is first imported it wraps timm's loader so that
    ``register_seed_models`` runs once timm's ``__init__`` is complete."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            register_seed_models()

        spec.loader.exec_module = exec_module  # this loader instance serves timm's __init__ only
        return spec


if "timm" in sys.modules:
    register_seed_models()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())

__all__ = ["GROUPED_MODELS", "SEED_MODELS", "create_model", "register_seed_models", "vit_base_patch16_224_dgmlp",
           "vit_dgmlp"]
