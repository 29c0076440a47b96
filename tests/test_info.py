"""fastvit_reduce.info (``fastvit-reduce info``) on the tiny ViT, through the real CLI dispatcher."""
from __future__ import annotations

import json

import pytest

from fastvit_reduce.cli import main as cli

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "4", "--model-arg", "patch_size=8",
             "--model-arg", "embed_dim=64", "--model-arg", "depth=4", "--model-arg", "num_heads=2"]


def mlp_params(dim: int, hidden: int) -> int:
    return dim * hidden + hidden + hidden * dim + dim


def json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_info_json_all_strategies(capsys):
    assert cli(["info", *TINY_ARGS, "--json"]) == 0
    rows = json_lines(capsys)
    assert [r["strategy"] for r in rows] == ["baseline", "thin", "shallow", "grouped"]
    assert all(set(r) == {"strategy", "params", "mlp_params", "unique_mlps", "mlp_hidden", "gflops"} for r in rows)
    base, thin, shallow, grouped = rows
    assert base["mlp_params"] == 4 * mlp_params(64, 256)
    assert thin["params"] == shallow["params"] == base["params"] - 4 * (mlp_params(64, 256) - mlp_params(64, 128))
    assert grouped["params"] == base["params"] - 2 * mlp_params(64, 256)
    assert [r["unique_mlps"] for r in rows] == [4, 4, 4, 2]
    assert [r["mlp_hidden"] for r in rows] == [256, 128, 128, 256]
    assert thin["gflops"] == shallow["gflops"] < grouped["gflops"] == base["gflops"]


def test_info_one_strategy_with_knobs_and_table(capsys):
    assert cli(["info", *TINY_ARGS, "--strategy", "shallow", "--keep-ratio", "0.25", "--json"]) == 0
    (row,) = json_lines(capsys)
    assert row["strategy"] == "shallow" and row["mlp_hidden"] == 64
    assert cli(["info", *TINY_ARGS, "--scale", "1.0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["strategy", "knobs"] and len(out) == 3 + 4
    assert out[-1].startswith("grouped   scale=1.0 group_size=2")


def test_info_bad_input_is_one_error_line(capsys):
    for argv, message in [(["--strategy", "thin", "--scale", "1"], "error: --scale is a knob of grouped, not of thin"),
                          (["--keep-ratio", "2"], "error: shallow: keep_ratio must be a number > 0 and <= 1, got 2.0"),
                          (["--strategy", "wide"], "error: argument --strategy: invalid choice: 'wide'")]:
        assert cli(["info", *TINY_ARGS, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "0"], "error: argument --img-size: must be an integer >= 1, got 0"),
    (["--img-size", "-3"], "error: argument --img-size: must be an integer >= 1"),
    (["--img-size", "36"], "error: --img-size 36 is not a multiple of the patch size 8"),
    (["--num-classes", "-1"], "error: argument --num-classes: must be an integer >= 0, got -1"),
    (["--img-size", "x"], "error: argument --img-size: invalid integer >= 1 value: 'x'"),
])
def test_info_refuses_bad_sizes_with_one_line(capsys, argv, message):
    """Issue 15: --img-size 0 / 65 crashed with tracebacks and --num-classes -1 was accepted."""
    assert cli(["info", *TINY_ARGS, "--strategy", "baseline", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
