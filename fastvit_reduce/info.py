"""``fastvit-reduce info``: size and cost of each MLP reduction strategy, before planning a sweep.

    fastvit-reduce info --model vit_base_patch16_224                    # all strategies side by side
    fastvit-reduce info --strategy shallow --keep-ratio 0.25 --round-to 8
    fastvit-reduce info --json                                          # one JSON object per line

Columns: unique parameters, unique MLP parameters, distinct MLP modules, MLP hidden width and
forward GFLOPs per image, counted by ``torch.utils.flop_counter`` (1 multiply-add = 2 FLOPs).
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import sys

import torch

from fastvit_reduce.config import UsageError
from fastvit_reduce.models import CHOICES, KNOB_OWNERS, create_model, gflops, mlp_stats
from fastvit_reduce.strategies import STRATEGIES, StrategyError, check_knobs


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (argparse turns the ValueError into a one-line error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"  # why: argparse names the type in "invalid <name> value"
    return parse


def check_img_size(model, img_size: int) -> None:
    """Refuse an input size that is not a multiple of the model's patch size (timm would assert
    in the forward pass with a traceback)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    for p in (patch if isinstance(patch, (tuple, list)) else [patch] if patch else []):
        if img_size % p:
            raise UsageError(f"--img-size {img_size} is not a multiple of the patch size {p} "
                             f"(e.g. {max(p, img_size // p * p)})")


def variant_parser(prog: str, description: str, model: str, img_size: int) -> Parser:
    """Parser with the options shared by ``info`` and ``bench strategies``: model, strategy, knobs."""
    p = Parser(prog=prog, description=description.replace("``", ""))
    p.add_argument("--model", default=model, help=f"timm model name (default {model})")
    p.add_argument("--img-size", type=int_at_least(1), default=img_size,
                   help=f"input size in px, a multiple of the patch size (default {img_size})")
    p.add_argument("--num-classes", type=int_at_least(0), default=1000,
                   help="classifier outputs (default 1000; 0 = no head, as timm)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, e.g. depth=6 (repeatable)")
    p.add_argument("--strategy", choices=CHOICES, help="one strategy (default: all, side by side)")
    for name, owners in KNOB_OWNERS.items():
        knob = STRATEGIES[owners[0]].knobs[name]
        choices = getattr(knob.checker, "choices", None)  # Choice knobs, e.g. prune_by
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=type(knob.default), default=None,
                       choices=choices, help=f"{'/'.join(owners)}: {knob.help} (default {knob.default})")
    p.add_argument("--json", action="store_true", help="print one JSON object per variant")
    return p


def timm_kwargs(args) -> dict:
    """timm.create_model keyword arguments from ``--img-size``, ``--num-classes``, ``--model-arg``."""
    kwargs = dict(img_size=args.img_size, num_classes=args.num_classes)
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg wants KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a plain string, e.g. act_layer=gelu
    return kwargs


def variants(args) -> list[tuple[str, dict]]:
    """``[(strategy, knobs)]``: ``--strategy`` alone, or baseline + every strategy. Knobs are the
    strategy's full, validated settings (defaults filled in); a knob for a strategy not shown is an error."""
    names = [args.strategy] if args.strategy else list(CHOICES)
    given = {k: getattr(args, k) for k in KNOB_OWNERS if getattr(args, k) is not None}
    for k in given:
        if not set(KNOB_OWNERS[k]) & set(names):
            raise UsageError(f"--{k.replace('_', '-')} is a knob of {' and '.join(KNOB_OWNERS[k])}, "
                             f"not of {args.strategy}")
    out = []
    for name in names:
        spec = STRATEGIES.get(name)
        knobs = check_knobs(name, spec.knobs, {k: v for k, v in given.items() if k in spec.knobs}) if spec else {}
        out.append((name, knobs))
    return out


def knob_text(knobs: dict) -> str:
    """``'keep_ratio=0.5 prune_by=first'`` (``round_to=1`` left out), or ``'-'``."""
    return " ".join(f"{k}={v}" for k, v in knobs.items() if not (k == "round_to" and v == 1)) or "-"


def measure(args) -> list[tuple[dict, dict]]:
    """``(row, knobs)`` per variant; row keys: ``strategy, params, mlp_params, unique_mlps,
    mlp_hidden, gflops``."""
    rows = []
    for name, knobs in variants(args):
        torch.manual_seed(0)
        model = create_model(args.model, strategy=name, **knobs, **timm_kwargs(args))
        check_img_size(model, args.img_size)
        row = dict(strategy=name, **mlp_stats(model), gflops=round(gflops(model, args.img_size), 6))
        rows.append((row, knobs))
        del model
    return rows


def table(rows: list[tuple[dict, dict]], title: str) -> str:
    """Fixed-width text table; ratio columns are relative to the baseline row when present."""
    base = next((r for r, _ in rows if r["strategy"] == "baseline"), None)
    head = ["strategy", "knobs", "params", "MLP params", "unique MLPs", "MLP hidden", "GFLOPs"]
    if base:
        head += ["params/base", "GFLOPs/base"]
    lines = []
    for r, knobs in rows:
        cells = [r["strategy"], knob_text(knobs), f"{r['params']:,}", f"{r['mlp_params']:,}", str(r["unique_mlps"]),
                 str(r["mlp_hidden"]), f"{r['gflops']:.3f}"]
        if base:
            cells += [f"{r['params'] / base['params']:.3f}", f"{r['gflops'] / base['gflops']:.3f}"]
        lines.append(cells)
    return format_table(title, head, lines)


def format_table(title: str, head: list[str], lines: list[list[str]]) -> str:
    """Fixed-width text table: first two columns left-aligned (names), the rest right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def run_cli(argv: list[str], parse, measure, render) -> int:
    """``main`` of ``info`` and ``bench strategies``: ``rows = measure(parse(argv))``, printed as JSON lines
    (``--json``) or as ``render(args, rows)``; a usage or strategy error is one ``error:`` line, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args = parse(argv)
        rows = measure(args)
    except (UsageError, StrategyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row, _ in rows:
            print(json.dumps(row))
    else:
        print(render(args, rows))
    return 0


def main(argv: list[str]) -> int:
    """Print the strategy table (or JSON lines); return the exit code."""
    parser = variant_parser("fastvit-reduce info", __doc__.splitlines()[0], "vit_base_patch16_224", 224)
    return run_cli(argv, parser.parse_args, measure, lambda args, rows: table(
        rows, f"{args.model} @ {args.img_size} px, {args.num_classes} classes; "
              "GFLOPs = forward, per image (torch.utils.flop_counter)"))
