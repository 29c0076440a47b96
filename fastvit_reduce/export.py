"""``fastvit-reduce export RUN OUT [--untie] [--best]``: a trained model that stock timm loads.

    fastvit-reduce export runs/paired/thin exported/thin
    python -c "import timm; m = timm.create_model('local-dir:exported/thin', pretrained=True)"

Writes the run's headline weights (the EMA's when EMA is evaluated, as timm reports it) into
``OUT/`` in timm's Hugging Face Hub layout: ``model.safetensors`` and ``config.json``
(``architecture``, ``num_classes``, ``model_args`` to rebuild it, ``pretrained_cfg`` with the
input size, mean/std and crop of the run; ``label_names`` when the training .beton has a class
list). ``timm.create_model('local-dir:OUT', pretrained=True)`` (timm >= 1.0.20; the installed
1.0.31 has it) or, with any timm that reads safetensors, ``timm.create_model(architecture,
pretrained=True, pretrained_cfg_overlay=dict(file='OUT/model.safetensors'), **model_args)``.

What each strategy becomes (docs/export.md):

* baseline, thin, shallow: the run's timm architecture; thin and shallow with ``mlp_ratio`` set to
  their MLP width (timm truncates ``embed_dim * mlp_ratio``). Loaded by timm alone.
* grouped: ``vit_dgmlp`` (``base_arch``, ``group_size``, ``mlp_scale`` in ``model_args``), or the
  seed's ``vit_base_patch16_224_dgmlp`` for ViT-B/16 in pairs: the shared MLPs are stored once
  (``fastvit_reduce.tied``), and the name exists in timm once ``fastvit_reduce`` is imported.
* grouped ``--untie``: a plain timm ViT of the run's architecture with the shared MLP copied into
  each block: the same function, the ungrouped model's parameter count, timm alone loads it.

Before it returns, the export is loaded back with timm in this process and must give the trained
model's logits on a random batch and its parameter count (``fastvit-reduce info``'s), else the
folder is removed and the command fails. ``--best`` exports ``best.pt`` instead of the final
weights (``last.pt``).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from fastvit_reduce import GROUPED_MODELS
from fastvit_reduce import checkpoint as ckpt
from fastvit_reduce import runs
from fastvit_reduce.config import UsageError
from fastvit_reduce.models import mlp_stats, model_from_cfg
from fastvit_reduce.settings import STRATEGY_KNOBS
from fastvit_reduce.strategies import param_count, vit_blocks
from fastvit_reduce.tied import save_tied

SEED_GROUPED = ("vit_base_patch16_224", 2, "vit_base_patch16_224_dgmlp")  # (base arch, group_size, name)


class ExportError(UsageError):
    """The run cannot be exported (reported as ``error: ...``, exit code 2)."""


# ----------------------------------------------------------------------------- the trained model
def headline_weights(run_dir: Path, best: bool = False) -> tuple[dict, dict, str]:
    """(state dict, resolved config, 'ema' | 'raw') of the run's final (or best) headline model."""
    folder = runs.RunFolder(run_dir)
    path = folder.best_pt if best else folder.last_pt
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {path.name} (is it a run folder of a started run?)")
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    cfg = state["config"]
    if best:
        which = state.get("headline", "raw")
    else:
        final = folder.read_final() or {}
        which = final.get("headline") or ("ema" if state.get("ema") is not None and cfg.get("ema.eval") else "raw")
    if which == "ema" and state.get("ema") is not None:
        prefix = "module."  # ModelEma holds the averaged copy as .module
        return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}, cfg, "ema"
    return state["model"], cfg, "raw"


def trained_model(cfg: dict, state: dict) -> nn.Module:
    """The run's model (timm + strategy) holding ``state``, in eval mode on the CPU."""
    # why no pretrained file: its weights are overwritten, and it need not exist where we export
    model = model_from_cfg({**cfg, "model.pretrained_file": ""}, seed=0)
    model.load_state_dict(state)
    return model.eval()


def untie(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every block owns its MLP (a shared one is copied per block)."""
    model = copy.deepcopy(model)
    seen = set()
    for block in vit_blocks(model):
        if id(block.mlp) in seen:
            block.mlp = copy.deepcopy(block.mlp)
        seen.add(id(block.mlp))
    return model


def timm_form(model: nn.Module, cfg: dict, tied: bool) -> tuple[str, dict]:
    """(timm architecture name, model_args beyond the model's recorded ones) of the export."""
    arch, strategy = cfg["model.arch"], cfg["reduction.strategy"]
    if arch in GROUPED_MODELS:  # trained as a grouped name (model.arch: vit_base_patch16_224_dgmlp)
        if tied:
            return arch, {}
        arch = model.pretrained_cfg["architecture"]  # untied: the timm ViT it groups
    if tied:
        g, scale = cfg["reduction.group_size"], cfg["reduction.scale"]
        if (arch, g) == SEED_GROUPED[:2]:
            return SEED_GROUPED[2], {"mlp_scale": scale}
        return "vit_dgmlp", {"base_arch": arch, "group_size": g, "mlp_scale": scale}
    if strategy in ("thin", "shallow"):
        blocks = vit_blocks(model)
        widths = {b.mlp.fc1.out_features for b in blocks}
        if len(widths) != 1:
            raise ExportError(f"{strategy} model with MLP widths {sorted(widths)}: timm's ViT has one mlp_ratio")
        dim = blocks[0].mlp.fc1.in_features
        return arch, {"mlp_ratio": (widths.pop() + 0.5) / dim}  # why +0.5: timm truncates dim * mlp_ratio
    return arch, {}


# ----------------------------------------------------------------------------- writing
def class_names(cfg: dict) -> list[str] | None:
    """The training .beton's class list (``<beton>.classes.json``) when it is there and fits."""
    from fastvit_reduce.data.betons import read_classes
    try:
        names = read_classes(cfg["data.train_dataset"]) if cfg.get("data.train_dataset") else None
    except Exception:  # noqa: BLE001 — labels are a courtesy; a missing or odd file leaves them out
        return None
    return names if names and len(names) == cfg["model.num_classes"] else None


def write(model: nn.Module, out: Path, arch: str, model_args: dict, tied: bool, cfg: dict, source: dict) -> None:
    """``model.safetensors`` + ``config.json`` (timm's ``save_config_for_hf``) into ``out``;
    ``source``: where the weights come from, kept in config.json under ``fastvit_reduce``."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # why the private module: timm 1.x exports only save_for_hf,
    # which saves state_dict() as is (refused by safetensors for tied tensors)
    out.mkdir(parents=True, exist_ok=True)
    if tied:
        save_tied(model, out / "model.safetensors")
    else:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_config = {"pretrained_cfg": {"architecture": arch}, "fastvit_reduce": source}
    labels = class_names(cfg)
    if labels:
        model_config["label_names"] = labels
    img = cfg["model.img_size"]  # why given: timm keeps the arch's default input size otherwise (test_vit: 160)
    data_config = {"input_size": (3, img, img)}
    if cfg.get("data.crop_pct"):
        data_config["crop_pct"] = cfg["data.crop_pct"]
    save_config_for_hf(model, out / "config.json", model_config=model_config, model_args=model_args,
                       data_config=data_config)
    config = json.loads((out / "config.json").read_text())
    for key in ("tag", "license"):  # why: they describe timm's released weights of the arch, not these
        config["pretrained_cfg"].pop(key, None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_roundtrip(model: nn.Module, out: Path, img_size: int) -> nn.Module:
    """Load ``out`` with timm (``local-dir:``) and require the trained model's logits and size."""
    import timm
    loaded = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), loaded(x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise ExportError(f"timm's model from {out} does not reproduce the trained logits "
                          f"(max difference {(got - want).abs().max():.3g})")
    if param_count(loaded) != param_count(model):
        raise ExportError(f"timm's model from {out} has {param_count(loaded):,} parameters, the trained one "
                          f"{param_count(model):,}")
    return loaded


def export(run_dir: str | Path, out: str | Path, untie_mlps: bool = False, best: bool = False,
           force: bool = False) -> dict:
    """Export ``run_dir``'s headline weights to ``out``; returns what was written (for the message)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not empty (--force replaces its files)")
    state, cfg, which = headline_weights(run_dir, best)
    model = trained_model(cfg, state)
    stats = mlp_stats(model)
    tied = stats["unique_mlps"] < len(vit_blocks(model))
    if untie_mlps:
        if not tied:
            raise ExportError(f"--untie: {run_dir.name} ({cfg['reduction.strategy']}) shares no MLP")
        model, tied = untie(model), False
    arch, model_args = timm_form(model, cfg, tied)
    knobs = {k: cfg[f"reduction.{k}"] for k in STRATEGY_KNOBS.get(cfg["reduction.strategy"], {})
             if f"reduction.{k}" in cfg}
    source = {"run": str(run_dir.resolve()), "checkpoint": "best.pt" if best else "last.pt", "weights": which,
              "strategy": cfg["reduction.strategy"], "knobs": knobs, "untied": untie_mlps,
              "top_1": (runs.RunFolder(run_dir).read_final() or {}).get("best_top_1" if best else "top_1")}
    try:
        write(model, out, arch, model_args, tied, cfg, source)
        check_roundtrip(model, out, cfg["model.img_size"])
    except Exception:
        shutil.rmtree(out, ignore_errors=True)  # why: a folder that does not load must not look exported
        raise
    return {"architecture": arch, "headline": which, "params": param_count(model), "tied": tied,
            "strategy": cfg["reduction.strategy"], "bytes": (out / "model.safetensors").stat().st_size,
            "model_args": json.loads((out / "config.json").read_text()).get("model_args", {})}


def main(argv: list[str]) -> int:
    """``fastvit-reduce export RUN OUT``: 0 exported, 2 usage error or a run that cannot be exported."""
    p = argparse.ArgumentParser(prog="fastvit-reduce export", description=__doc__.split("\n")[0].strip("`"),
                                epilog="docs/export.md has the details",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder (holds last.pt / best.pt)")
    p.add_argument("out", metavar="OUT", help="folder to write model.safetensors and config.json into")
    p.add_argument("--untie", action="store_true",
                   help="grouped: copy the shared MLP into each block, for a plain timm ViT (no fastvit_reduce needed)")
    p.add_argument("--best", action="store_true",
                   help="export best.pt (best headline top-1) instead of the final weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        info = export(args.run, args.out, untie_mlps=args.untie, best=args.best, force=args.force)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    need = "import fastvit_reduce, timm  # registers " + info["architecture"] if info["tied"] else "import timm"
    print(f"exported {args.run} ({info['strategy']}, {info['headline']} weights) -> {args.out}: model.safetensors "
          f"({info['bytes'] / 2**20:.1f} MiB), config.json; timm {info['architecture']}, "
          f"{info['params']:,} parameters (as `fastvit-reduce info` counts them); logits checked against "
          f"the run's model\n"
          f"load it with:\n    {need}\n"
          f"    model = timm.create_model('local-dir:{args.out}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
