"""``fastvit-reduce bench strategies`` on the tiny ViT, through the real CLI dispatcher."""
from __future__ import annotations

import json

from fastvit_reduce.cli import main as cli

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "4", "--model-arg", "patch_size=8",
             "--model-arg", "embed_dim=64", "--model-arg", "depth=4", "--model-arg", "num_heads=2"]


def json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_bench_strategies_json(capsys):
    argv = ["bench", "strategies", *TINY_ARGS, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json"]
    assert cli(argv) == 0
    rows = json_lines(capsys)
    assert [r["strategy"] for r in rows] == ["baseline", "thin", "shallow", "grouped"]
    assert all(set(r) == {"strategy", "step_ms", "step_ratio", "flop_ratio", "model", "img_size", "batch_size"}
               for r in rows)
    assert rows[0]["step_ratio"] == rows[0]["flop_ratio"] == 1.0 and rows[3]["flop_ratio"] == 1.0
    assert rows[1]["flop_ratio"] < 1 and all(r["step_ms"] > 0 and r["batch_size"] == 2 for r in rows)
