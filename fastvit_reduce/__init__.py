"""fastvit_reduce: train parameter-reduced ViTs with FFCV + timm."""


def __getattr__(name):
    # why lazy: `fastvit-reduce <cmd>` imports this package; torch + timm cost ~3 s to import.
    if name == "create_model":
        from fastvit_reduce.models import create_model
        return create_model
    raise AttributeError(f"module 'fastvit_reduce' has no attribute {name!r}")


__all__ = ["create_model"]
