"""``fastvit-reduce bench threads``: which OpenMP wait policy makes the CPU train step fastest.

    fastvit-reduce bench threads                       # test_vit@64, vit_tiny@64, vit_small@64
    fastvit-reduce bench threads --steps 20 --json

Each (model, policy) cell is a fresh child process (``OMP_WAIT_POLICY`` is read once, when torch's
OpenMP runtime starts), started round-robin over the policies so machine drift hits all alike. A
child times forward + backward + AdamW on one fixed batch (``bench strategies``' ``timed_step``)
with ``torch.set_num_threads`` = the cores this process may use, and, to mimic training, with
ffcv-style decode threads busy beside it when ``--decode-threads`` > 0. The table shows the median
step in ms and each policy's ratio to the unset default. Why this exists: train.py, the CLI and
``PASSIVE`` measured slowing ViT-Ti's step 1.6x (docs/results/speed.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

POLICIES = ("default", "PASSIVE", "ACTIVE")
MODELS = {"test_vit": dict(img_size=64, patch_size=8), "vit_tiny_patch16_224": dict(img_size=64),
          "vit_small_patch16_224": dict(img_size=64)}

CHILD = r"""
import json, os, sys, threading, time, statistics
import numpy as np, torch
from fastvit_reduce.bench.strategies import timed_step
from fastvit_reduce.models import create_model
from timm.optim import create_optimizer_v2
name, kw, batch, steps, decode = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(len(os.sched_getaffinity(0)))
model = create_model(name, num_classes=12, **kw)
opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, foreach=True)
x = torch.randn(batch, 3, kw["img_size"], kw["img_size"])
y = torch.randint(0, 12, (batch,))
stop = threading.Event()
def busy():  # a decode thread's load: single-threaded numpy work that releases the GIL (not BLAS,
    a = np.random.rand(1 << 18)  # whose own thread pool would oversubscribe the cores), short pauses
    while not stop.is_set():
        for _ in range(20):
            np.multiply(a, 1.0001, out=a)
        time.sleep(0.001)
workers = [threading.Thread(target=busy, daemon=True) for _ in range(decode)]
for w in workers: w.start()
for _ in range(2): timed_step(model, opt, x, y, torch.device("cpu"))
ms = [timed_step(model, opt, x, y, torch.device("cpu")) for _ in range(steps)]
stop.set()
print(json.dumps({"median_ms": statistics.median(ms)}))
"""


def child(name: str, policy: str, batch: int, steps: int, decode: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([name, MODELS[name], batch, steps, decode])],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {policy}: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastvit-reduce bench threads", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per child (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="children per (model, policy) (default 2)")
    p.add_argument("--decode-threads", type=int, default=1, help="busy threads beside the step (default 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        print(f"error: unknown model {unknown}" if unknown else "error: sizes must be >= 1", file=sys.stderr)
        return 2
    results = {(m, pol): [] for m in names for pol in POLICIES}
    for r in range(args.repeats):
        for m in names:
            order = POLICIES[r % 3:] + POLICIES[:r % 3]  # rotate who goes first
            for pol in order:
                results[(m, pol)].append(child(m, pol, args.batch_size, args.steps, args.decode_threads))
    rows = []
    for m in names:
        base = statistics.median(results[(m, "default")])
        for pol in POLICIES:
            med = statistics.median(results[(m, pol)])
            rows.append({"model": m, "policy": pol, "step_ms": round(med, 1), "vs_default": round(med / base, 2),
                         "runs_ms": [round(v, 1) for v in results[(m, pol)]]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"train step (fwd+bwd+AdamW, batch {args.batch_size}, {len(os.sched_getaffinity(0))} torch threads, "
          f"{args.decode_threads} busy decode thread(s)), median of {args.repeats} x {args.steps} steps")
    print(f"{'model':24} {'OMP_WAIT_POLICY':16} {'step ms':>8} {'vs unset':>9}")
    for row in rows:
        print(f"{row['model']:24} {row['policy']:16} {row['step_ms']:8.1f} {row['vs_default']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
