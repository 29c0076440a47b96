"""``fastvit-reduce export``: each strategy's trained weights leave the project for stock timm.

One paired run trains the four strategies on a tiny .beton (1 epoch, EMA on, so the headline is
the EMA's); each is exported, then loaded in a fresh Python that has imported only timm (and, for
a tied grouped export, then fastvit_reduce for its registered name), whose logits on a batch must equal
the trained model's and whose parameter count must be what ``fastvit-reduce info`` reports.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_config
from fastvit_reduce import export, info
from fastvit_reduce.train import main as train

STRATEGIES = {"baseline": "", "thin": "{strategy: thin, mlp_ratio: 2.0}",
              "shallow": "{strategy: shallow, keep_ratio: 0.5}", "grouped": "{strategy: grouped, group_size: 2}"}
KNOB_FLAGS = {"baseline": [], "thin": ["--mlp-ratio", "2.0"], "shallow": ["--keep-ratio", "0.5"],
              "grouped": ["--group-size", "2"]}

# the fresh process: only timm, one torch thread like the parent; argv: the batch, then each export
# folder, one JSON line per folder. A folder given as "+FOLDER" imports fastvit_reduce first (it
# registers the grouped names with timm): the tied grouped export, loaded last.
LOADER = """import json, sys
import torch
torch.set_num_threads(1)
import timm
x = torch.load(sys.argv[1])
for out in sys.argv[2:]:
    if out.startswith("+"):
        import fastvit_reduce
        out = out[1:]
    model = timm.create_model("local-dir:" + out, pretrained=True).eval()
    with torch.no_grad():
        torch.save(model(x), out + ".logits")
    ours = sorted(m for m in sys.modules if m == "fastvit_reduce" or m.startswith("fastvit_reduce."))
    print(json.dumps({"out": out, "params": sum(p.numel() for p in model.parameters()), "ours": ours,
                      "arch": model.pretrained_cfg.get("architecture"), "mean": list(model.pretrained_cfg["mean"])}))
"""
EXPORTS = [("baseline", False), ("thin", False), ("shallow", False), ("grouped", False), ("grouped", True)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch paired run of the four strategies (ffcv without its JIT: tiny images)."""
    from ffcv.pipeline.compiler import Compiler
    d = tmp_path_factory.mktemp("export")
    base = write_tiny_config(d, "baseline.yaml")
    others = []
    for name, knobs in STRATEGIES.items():
        if knobs:
            (d / f"{name}.yaml").write_text(f"base: {base}\nreduction: {knobs}\n")
            others.append(str(d / f"{name}.yaml"))
    before = Compiler.is_enabled
    Compiler.set_enabled(False)
    try:
        assert train(["--config", base, "--pair-with", *others, "--training.epochs=1"]) == 0
    finally:
        Compiler.set_enabled(before)
    (d / "loader.py").write_text(LOADER)
    return d


def info_params(name: str) -> int:
    """What ``fastvit-reduce info`` reports for the run's model (test_vit at 32 px, 8 px patches, 4 classes)."""
    args = info.variant_parser("info", "", "test_vit", 32).parse_args(
        ["--model", "test_vit", "--img-size", "32", "--num-classes", "4", "--model-arg", "patch_size=8",
         "--strategy", name, *KNOB_FLAGS[name], "--json"])
    return info.measure(args)[0][0]["params"]


def batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(trained) -> dict:
    """Every run of ``trained`` exported (tied grouped, and grouped --untie), then loaded back in one
    fresh process: the four untied exports while it has imported only timm, then the tied grouped one
    after importing fastvit_reduce. Per (name, untie): its folder, what export printed, the fresh
    logits and facts."""
    done = {}
    for name, untie in EXPORTS:
        out = trained / "exported" / f"{name}{'_untied' if untie else ''}"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = export.main([str(trained / "runs" / name), str(out), *(["--untie"] if untie else [])])
        assert rc == 0
        done[name, untie] = {"out": out, "printed": printed.getvalue()}
    x = trained / "batch.pt"
    torch.save(batch(), x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # why: stock timm, not the repo on the path
    keys = sorted(EXPORTS, key=lambda k: k == ("grouped", False))  # the tied one last
    cmd = [sys.executable, str(trained / "loader.py"), str(x),
           *(("+" if k == ("grouped", False) else "") + str(done[k]["out"]) for k in keys)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()[-len(keys):]]
    for key, facts in zip(keys, lines):
        assert facts["out"] == str(done[key]["out"])
        done[key].update(facts=facts, logits=torch.load(facts["out"] + ".logits"))
    return done


@pytest.mark.slow  # a paired training run, then a fresh interpreter
@pytest.mark.parametrize("name, untie", EXPORTS)
def test_export_round_trips_in_a_fresh_timm_process(trained, exported, name, untie):
    out, printed = exported[name, untie]["out"], exported[name, untie]["printed"]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 4 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    tied = name == "grouped" and not untie
    assert config["architecture"] == ("vit_dgmlp" if tied else "test_vit")
    if tied:
        assert config["model_args"]["base_arch"] == "test_vit" and config["model_args"]["group_size"] == 2
    if name in ("thin", "shallow"):  # embed 64, hidden 192 in test_vit: thin 2.0 -> 128, shallow 0.5 -> 96
        assert int(64 * config["model_args"]["mlp_ratio"]) == {"thin": 128, "shallow": 96}[name]

    state, cfg, which = export.headline_weights(trained / "runs" / name)
    assert which == "ema"  # EMA on: the headline is the EMA's, as timm reports it
    model = export.trained_model(cfg, state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = batch()
        with torch.no_grad():
            want = model(x)
    finally:
        torch.set_num_threads(threads)
    # timm without local-dir: the same files through pretrained_cfg_overlay (docs/export.md)
    import timm
    overlay = dict(config["pretrained_cfg"], file=str(out / "model.safetensors"))
    again = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **config["model_args"]).eval()
    with torch.no_grad():
        assert torch.allclose(again(x), want, rtol=1e-5, atol=1e-6)
    assert config["fastvit_reduce"]["weights"] == "ema" and "tag" not in config["pretrained_cfg"]
    got, facts = exported[name, untie]["logits"], exported[name, untie]["facts"]
    assert torch.equal(got, want)
    assert ("fastvit_reduce" in facts["ours"]) if tied else facts["ours"] == []  # timm alone, unless tied
    assert facts["mean"] == [0.5, 0.5, 0.5]  # the run's normalisation travels in pretrained_cfg
    expected = info_params("baseline" if untie else name)  # untied: the ungrouped model's size
    assert facts["params"] == expected and f"{expected:,} parameters" in printed
    final = json.loads((trained / "runs" / name / "final.json").read_text())
    assert (final["params"] == expected) != untie


def test_export_refuses_what_it_cannot_do(trained, capsys):
    assert export.main([str(trained / "runs" / "thin"), str(trained / "x"), "--untie"]) == 2
    assert "shares no MLP" in capsys.readouterr().err
    (trained / "busy").mkdir()
    (trained / "busy" / "f").write_text("x")
    assert export.main([str(trained / "runs" / "thin"), str(trained / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export.main([str(trained), str(trained / "y")]) == 2
    assert "no last.pt" in capsys.readouterr().err


def test_the_seed_name_is_written_for_vit_b16_in_pairs():
    cfg = {"model.arch": "vit_base_patch16_224", "reduction.strategy": "grouped", "reduction.group_size": 2,
           "reduction.scale": 0.707}
    assert export.timm_form(None, cfg, tied=True) == ("vit_base_patch16_224_dgmlp", {"mlp_scale": 0.707})
    assert export.timm_form(None, {**cfg, "reduction.group_size": 3}, tied=True)[0] == "vit_dgmlp"
    # a run whose model.arch is itself the seed's grouped name keeps it (tied) or is its ViT (untied)
    seed = {**cfg, "model.arch": "vit_base_patch16_224_dgmlp", "reduction.strategy": "baseline"}
    assert export.timm_form(None, seed, tied=True) == ("vit_base_patch16_224_dgmlp", {})
    plain = torch.nn.Module()
    plain.pretrained_cfg = {"architecture": "vit_base_patch16_224"}
    assert export.timm_form(plain, seed, tied=False) == ("vit_base_patch16_224", {})
