"""``fastvit-reduce bench strategies``: train-step time of each MLP reduction strategy.

    fastvit-reduce bench strategies                                   # ViT-S/16 at 128 px, batch 32
    fastvit-reduce bench strategies --model vit_base_patch16_224 --img-size 224 --batch-size 128 --steps 50

A step is forward + backward + AdamW on one fixed random batch, the same for every variant.
Steps are interleaved (one step of each variant per round, order rotated every round) so that
drift in machine load hits every variant alike; the table shows the median step time, its
ratio to baseline, and the forward-FLOP ratio (``torch.utils.flop_counter``) for comparison.
Timing: CUDA events on GPU, ``time.perf_counter`` on CPU (where the step is synchronous).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from fastvit_reduce.info import UsageError, format_table, knob_text, run_cli, timm_kwargs, variant_parser, variants
from fastvit_reduce.models import create_model, gflops


def parse(argv: list[str]):
    """Command-line options (variant options shared with ``info``, plus timing options)."""
    p = variant_parser("fastvit-reduce bench strategies", __doc__.splitlines()[0], "vit_small_patch16_224", 128)
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return args


def timed_step(model, opt, x, y, device: torch.device) -> float:
    """One forward + backward + AdamW step; its duration in ms."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if device.type == "cuda":
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return (time.perf_counter() - t0) * 1e3


def run(args) -> list[tuple[dict, dict]]:
    """``[(json row, knobs)]`` per variant, baseline first."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    runs = []
    for name, knobs in variants(args):
        torch.manual_seed(0)
        model = create_model(args.model, strategy=name, **knobs, **timm_kwargs(args)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        runs.append(dict(name=name, knobs=knobs, model=model, opt=opt, gflops=gflops(model, args.img_size), ms=[]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)  # (B, 3, H, W)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)  # (B,)
    for i in range(args.warmup + args.steps):
        for r in runs[i % len(runs):] + runs[:i % len(runs)]:  # rotate who goes first
            ms = timed_step(r["model"], r["opt"], x, y, device)
            if i >= args.warmup:
                r["ms"].append(ms)
    base = next((r for r in runs if r["name"] == "baseline"), runs[0])
    base_ms = statistics.median(base["ms"])
    return [(dict(strategy=r["name"], step_ms=round(statistics.median(r["ms"]), 3),
                  step_ratio=round(statistics.median(r["ms"]) / base_ms, 4),
                  flop_ratio=round(r["gflops"] / base["gflops"], 4),
                  model=args.model, img_size=args.img_size, batch_size=args.batch_size), r["knobs"])
            for r in runs]


def table(rows: list[tuple[dict, dict]], title: str) -> str:
    """Fixed-width text table of ``run``'s rows."""
    head = ["strategy", "knobs", "step ms", "step/base", "FLOPs/base"]
    lines = [[r["strategy"], knob_text(k), f"{r['step_ms']:.1f}", f"{r['step_ratio']:.3f}", f"{r['flop_ratio']:.3f}"]
             for r, k in rows]
    return format_table(title, head, lines)


def main(argv: list[str]) -> int:
    """Run the benchmark and print the table (or JSON lines); return the exit code."""
    return run_cli(argv, parse, run, render)


def render(args, rows: list[tuple[dict, dict]]) -> str:
    """The table, titled with the model, batch, step count, device and torch version."""
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"cpu ({torch.get_num_threads()} threads)"
    return table(rows, f"{args.model} @ {args.img_size} px, batch {args.batch_size}, median of {args.steps} "
                       f"steps (+{args.warmup} warm-up), fwd+bwd+AdamW fp32, {device}, torch {torch.__version__}")
