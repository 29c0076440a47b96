"""``fastvit-reduce bench gpu``: one command that checks the CUDA path end to end.

    fastvit-reduce bench gpu                           # on a GPU node: <= 8 min, table
    fastvit-reduce bench gpu --json                    # one JSON object
    fastvit-reduce bench gpu --device cpu --quick      # the same code paths at tiny sizes (tests)

Six sections:

1. train-loader img/s (``create_train_loader``, ``ToDevice``) on the device and on the CPU;
2. bit-exact: the device loader's batches equal the CPU loader's, compared as they arrive (no
   clone, no extra sync: this exercises ffcv's reused buffers). On CPU, the CPU loader twice;
3. ``BatchRandAugment`` and the full ``BatchAugment`` in ms per batch (CUDA events) and the host
   syncs they cause, counted with ``torch.cuda.set_sync_debug_mode('warn')`` (target 0; "n/a" on
   CPU, where tests/test_randaugment.py records the aten ops instead);
4. EMA on the device with grouped sharing: the shared tensor moves exactly once per step;
5. train-step time per strategy: bf16 autocast, channels-last, fused AdamW (timm
   ``create_optimizer_v2``), full augmentation, eager and ``torch.compile``; ms/step, img/s, peak
   memory, MFU = 3 x forward FLOPs (``models.gflops``) x batch / step time / the device's bf16
   peak (``--peak-tflops``, else a table of known GPUs), and each strategy / baseline.
   With ``--quick`` the compiled column uses ``backend="eager"`` (dynamo only: inductor's compile
   alone would take minutes on a small CPU);
6. the real trainer CLI in a subprocess on a small synthetic set: SIGTERM after
   ``--train-seconds`` (and a first ``last.pt``), expect exit 124; run again, expect 0; report
   ``data_wait_frac`` from ``final.json``.

``--quick`` (tiny sizes; with ``--device cpu`` it is tests/test_bench_gpu.py, ~1 min on 2 shared
cores) checks the code paths, not speed: section 1 runs ffcv's pipeline uncompiled (numba
would spend ~3 s on it), and section 6 trains ``test_vit`` at 32 px for one epoch of 16
updates at batch 2, one thread, so its time is the trainer's two start-ups.

Data: a synthetic ``.beton`` (class-coloured striped images, as tests/conftest.py makes) is written
to a temporary folder unless ``--beton`` names one. Timing: CUDA events on the GPU,
``time.perf_counter`` on the CPU, where work is synchronous.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
# bf16 dense peak, TFLOP/s (vendor data sheets, SXM/PCIe as named); matched against the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
STRATEGIES = ("baseline", "thin", "shallow", "grouped")


# ----------------------------------------------------------------------------- helpers
class Timer:
    """Elapsed ms of a block: CUDA events on a GPU (no host wait inside), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def count_syncs(device, fn) -> int | None:
    """Run ``fn()`` and return how many host syncs CUDA's sync debug mode warned about (None on
    CPU, where the mode does not exist)."""
    import torch
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_tflops(device, given: float | None) -> float | None:
    """The device's bf16 peak in TFLOP/s: ``given``, else looked up by name (None if unknown/CPU)."""
    import torch
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@contextlib.contextmanager
def ffcv_jit(enabled: bool):
    """ffcv's numba compilation of loader pipelines on or off inside the block (ffcv's
    ``Compiler`` switch is process-wide; the previous setting is restored)."""
    import fastvit_reduce.data.ffcv_patch  # noqa: F401 — before any ffcv module
    from ffcv.pipeline.compiler import Compiler
    before = Compiler.is_enabled
    Compiler.set_enabled(enabled)
    try:
        yield
    finally:
        Compiler.set_enabled(before)


def write_synthetic_beton(path: Path, n: int, size: int, num_classes: int) -> str:
    """``n`` JPEG images of ``size`` px whose colour and stripes depend on the class."""
    from fastvit_reduce.data.synthetic import write_beton
    return write_beton(path, n, num_classes, size, write_mode="jpg", num_workers=min(8, os.cpu_count() or 1))


def train_loader(beton: str, device, args):
    from fastvit_reduce.data.loaders import create_train_loader
    return create_train_loader(beton, args.batch_size, device, res=args.res,
                               num_workers=args.workers, in_memory=True, batches_ahead=3,
                               drop_last=True, order="random", aug_repeats=1, seed=0,
                               distributed=False, rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3),
                               hflip=True, channels_last=True)


# ----------------------------------------------------------------------------- sections
def loader_speed(beton: str, devices, args) -> dict:
    """Section 1: img/s of one timed epoch (after a warm-up epoch: numba JIT) per device."""
    import torch
    from fastvit_reduce.data.loaders import set_epoch
    out = {}
    for device in devices:
        loader = train_loader(beton, device, args)
        for epoch in range(2):
            set_epoch(loader, epoch)
            n, t0 = 0, time.perf_counter()
            for images, _ in loader:
                n += len(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        loader.close()
        out[f"{device.type}_img_s"] = round(n / seconds, 1)
    return out


def loader_bit_exact(beton: str, device, args) -> dict:
    """Section 2: the ``device`` loader's batches equal the CPU loader's, batch by batch."""
    import torch
    from fastvit_reduce.data.loaders import set_epoch
    cpu = torch.device("cpu")
    a, b = train_loader(beton, device, args), train_loader(beton, cpu, args)
    batches = equal = 0
    for loader in (a, b):
        set_epoch(loader, 0)
    for (xa, ya), (xb, yb) in zip(a, b):
        batches += 1
        equal += bool(torch.equal(xa.cpu(), xb) and torch.equal(ya.cpu(), yb))
    a.close()
    b.close()
    return dict(compared=f"{device.type} vs cpu", batches=batches, equal_batches=equal,
                bit_exact=batches > 0 and equal == batches)


def augment_cost(device, args) -> dict:
    """Section 3: ms per batch of RandAugment and of the full augmentation, and host syncs."""
    import torch
    from fastvit_reduce.augment.batch import BatchAugment
    from fastvit_reduce.augment.randaugment import BatchRandAugment
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.res, args.res), dtype=torch.uint8,
                           generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    ra = BatchRandAugment("rand-m9-mstd0.5-inc1")
    full = BatchAugment(1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25,
                        device=device, dtype=torch.bfloat16)
    runs = {"randaugment": lambda s: ra(images, torch.Generator(device).manual_seed(s)),
            "full": lambda s: full(images, labels, seed=s)}
    out = {}
    for name, fn in runs.items():
        fn(0)  # warm-up: per-device constants, kernels
        ms = []
        for s in range(1, args.steps + 1):
            with Timer(device) as t:
                fn(s)
            ms.append(t.ms)
        out[f"{name}_ms"] = round(statistics.median(ms), 3)
        out[f"{name}_host_syncs"] = count_syncs(device, lambda: [fn(s) for s in range(3)])
    return out


def ema_sharing(device) -> dict:
    """Section 4: with decay 0.5, a grouped (shared) MLP weight moves exactly half way once."""
    import torch
    from fastvit_reduce.ema import ModelEma
    from fastvit_reduce.models import create_model
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", strategy="grouped", img_size=32, patch_size=8,
                         embed_dim=64, depth=4, num_heads=2, num_classes=4).to(device)
    ema = ModelEma(model, decay=0.5, device=device)
    shared = model.blocks[0].mlp.fc1.weight
    before = ema.module.blocks[0].mlp.fc1.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=10_000)  # far past any warm-up: decay is 0.5
    after = ema.module.blocks[0].mlp.fc1.weight
    moved = ((after - before) / (shared - before)).mean().item()  # 0.5 once, 0.75 if twice
    return dict(shared=model.blocks[1].mlp.fc1.weight is shared, moved_fraction=round(moved, 6),
                once=abs(moved - 0.5) < 1e-5)


def step_time(device, args) -> list[dict]:
    """Section 5: train-step time per strategy, eager and compiled."""
    import torch
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from fastvit_reduce.augment.batch import BatchAugment
    from fastvit_reduce.models import create_model, gflops
    kw = (dict(img_size=args.res, patch_size=8, embed_dim=64, depth=4, num_heads=2)
          if args.quick else dict(img_size=args.res))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.res, args.res), dtype=torch.uint8,
                           generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    augment = BatchAugment(1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                           randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25,
                           device=device, dtype=torch.bfloat16)
    criterion = SoftTargetCrossEntropy()
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    for strategy in STRATEGIES:
        for mode in ("eager", "compile"):
            torch.manual_seed(0)
            model = create_model(args.model, strategy=strategy, num_classes=1000, **kw)
            model = model.to(device).to(memory_format=torch.channels_last).train()
            fwd_gflops = gflops(model, args.res)
            opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, fused=True)
            run = model if mode == "eager" else torch.compile(
                model, backend="eager" if args.quick else "inductor")

            def step(s):
                x, y = augment(images, labels, seed=s)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = criterion(run(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for s in range(args.warmup):
                step(s)
            ms = []
            for s in range(args.steps):
                with Timer(device) as t:
                    step(args.warmup + s)
                ms.append(t.ms)
            step_ms = statistics.median(ms)
            flops = 3 * fwd_gflops * 1e9 * args.batch_size / (step_ms / 1e3)  # fwd + bwd ~ 3x fwd
            rows.append(dict(strategy=strategy, mode=mode, step_ms=round(step_ms, 3),
                             img_s=round(args.batch_size / step_ms * 1e3, 1),
                             peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                             if device.type == "cuda" else None,
                             mfu=round(flops / (peak * 1e12), 4) if peak else None,
                             host_syncs=count_syncs(device, lambda: step(0))))
            del model, run, opt
    for r in rows:
        base = next(b for b in rows if b["strategy"] == "baseline" and b["mode"] == r["mode"])
        r["vs_baseline"] = round(r["step_ms"] / base["step_ms"], 4)
    return rows


def train_resume(train_beton: str, val_beton: str, device, args, tmp: Path) -> dict:
    """Section 6: the trainer CLI, SIGTERM (exit 124), then the same command again (exit 0)."""
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "fastvit_reduce.cli", "train",
           "--config", str(REPO / "rn_configs" / "sample" / "baseline.yaml"),
           f"--data.train_dataset={train_beton}", f"--data.val_dataset={val_beton}",
           f"--logging.folder={runs}", "--logging.experiment=bench_gpu",
           f"--training.device={device.type}", f"--training.epochs={args.train_epochs}",
           # last.pt after every update (a stop check and a save each, so SIGTERM can land early)
           "--checkpoint.every_minutes=0.00001", "--logging.every_steps=1",
           "--validation.every_n_epochs=100", "--logging.progress=0"]
    if args.quick:
        # the smallest run that still saves, stops and resumes mid-epoch: test_vit at 32 px,
        # batch 2, one epoch of 16 updates (SIGTERM lands after the first save, the resume does
        # the rest), the 12 val images in one batch, one thread; what remains is two start-ups
        cmd += ["--training.batch_size=2", "--training.global_batch=0", "--model.img_size=32",
                "--resolution.min_res=32", "--resolution.max_res=32",
                "--validation.batch_size=12", "--training.threads=1", "--data.num_workers=1"]
    if device.type == "cuda":
        cmd += ["--training.amp=bf16", "--optim.fused=1", "--training.channels_last=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    last_pt = runs / "bench_gpu" / "last.pt"
    t0 = time.monotonic()
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    while first.poll() is None:  # a first last.pt, then at least --train-seconds
        if last_pt.is_file() and time.monotonic() - t0 >= args.train_seconds:
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    first_out = first.communicate(timeout=600)[0]
    first_s = time.monotonic() - t0
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    final_path = runs / "bench_gpu" / "final.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    out = dict(first_exit=first.returncode, first_s=round(first_s, 1),
               second_exit=second.returncode, completed=bool(final.get("completed")),
               data_wait_frac=final.get("data_wait_frac"))
    out["ok"] = out["first_exit"] == 124 and out["second_exit"] == 0 and out["completed"]
    if not out["ok"]:  # the trainer's last words, for the reader of the table
        out["tail"] = (first_out[-600:] + "\n---\n" + second.stdout[-600:] + second.stderr[-600:])
    return out


# ----------------------------------------------------------------------------- command
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastvit-reduce bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (batch 8, 32 px, tiny ViT, 2 threads): checks the code paths")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's bf16 dense peak, TFLOP/s (default: a table of known GPUs)")
    p.add_argument("--model", default="vit_base_patch16_224", help="section 5's timm model")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (quick: 8)")
    p.add_argument("--res", type=int, default=None, help="px (default 224; quick: 32)")
    p.add_argument("--workers", type=int, default=None, help="ffcv decode threads (default 12; quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick: 2)")
    p.add_argument("--beton", default=None, help="train .beton for sections 1-2 (default: synthetic)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="section 6: SIGTERM after this many seconds (default 40; quick: 0)")
    p.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated subset to run")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("batch_size", 256, 8), ("res", 224, 32), ("workers", 12, 2),
                              ("steps", 20, 2), ("train_seconds", 40.0, 0.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.warmup = 1 if q else 5
    args.train_epochs = 1 if q else 60
    args.images = args.batch_size * (4 if q else 12)  # section 1-2 set: 4 / 12 batches
    try:
        args.sections = sorted({int(s) for s in args.sections.split(",")})
    except ValueError:
        p.error(f"--sections wants numbers 1-6, got {args.sections!r}")
    if not set(args.sections) <= set(range(1, 7)):
        p.error(f"--sections wants numbers 1-6, got {args.sections}")
    for name in ("batch_size", "res", "workers", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size % 2:
        p.error("--batch-size must be even (mixup pairs images)")
    return args


def bench(args) -> dict:
    """Run the selected sections; return the result dict."""
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, quick=args.quick, batch_size=args.batch_size,
                  res=args.res, workers=args.workers)
    with tempfile.TemporaryDirectory(prefix="fvr-bench-gpu-") as tmp:
        tmp = Path(tmp)
        need_data = {1, 2, 6} & set(args.sections)
        beton = args.beton
        if need_data and beton is None:
            size = args.res + args.res // 4
            beton = write_synthetic_beton(tmp / "train.beton", args.images, size, 12)
        devices = [device] + ([torch.device("cpu")] if device.type == "cuda" else [])
        steps = {1: lambda: loader_speed(beton, devices, args),
                 2: lambda: loader_bit_exact(beton, device, args),
                 3: lambda: augment_cost(device, args),
                 4: lambda: ema_sharing(device),
                 5: lambda: step_time(device, args),
                 6: lambda: train_resume(*sample_betons(tmp, args), device, args, tmp)}
        for k in args.sections:
            t0 = time.perf_counter()
            # --quick: section 1 runs ffcv's pipeline as plain Python (why: numba compiles each
            # loader's pipeline, ~3 s on 2 CPU cores; sections 2 and 6 still compile it). Not
            # section 2: uncompiled, two lockstep loaders gave 2 of 4 batches unequal once here
            with ffcv_jit(not (args.quick and k == 1)):
                result[SECTION_KEYS[k]] = steps[k]()
            print(f"bench gpu: section {k} ({SECTION_KEYS[k]}) took "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return result


SECTION_KEYS = {1: "loader", 2: "bit_exact", 3: "augment", 4: "ema", 5: "steps", 6: "train"}


def sample_betons(tmp: Path, args) -> tuple[str, str]:
    """Section 6's data: 12 classes at 80 px (the sample config trains at 64 px); quick: 40 px
    (trained at 32 px), 32 train images (16 updates at batch 2), 12 val images."""
    size = 40 if args.quick else 80
    n_train, n_val = (32, 12) if args.quick else (480, 120)  # sample: 40 + 10 photos per class
    return (write_synthetic_beton(tmp / "s_train.beton", n_train, size, 12),
            write_synthetic_beton(tmp / "s_val.beton", n_val, size, 12))


def render(r: dict) -> str:
    """The result as text tables, one block per section."""
    na = lambda v: "n/a" if v is None else str(v)  # noqa: E731
    lines = [f"bench gpu: {r['device']}, torch {r['torch']}, batch {r['batch_size']}, "
             f"{r['res']} px, {r['workers']} decode threads{' (quick)' if r['quick'] else ''}"]
    if "loader" in r:
        lines.append("1 loader img/s: " + ", ".join(f"{k[:-6]} {v}" for k, v in r["loader"].items()))
    if "bit_exact" in r:
        b = r["bit_exact"]
        lines.append(f"2 bit-exact ({b['compared']}): {b['equal_batches']}/{b['batches']} batches "
                     f"equal -> {'PASS' if b['bit_exact'] else 'FAIL'}")
    if "augment" in r:
        a = r["augment"]
        lines.append(f"3 augment ms/batch: randaugment {a['randaugment_ms']}, full {a['full_ms']}; "
                     f"host syncs {na(a['randaugment_host_syncs'])} / {na(a['full_host_syncs'])}")
    if "ema" in r:
        e = r["ema"]
        lines.append(f"4 EMA grouped: shared tensor moved {e['moved_fraction']} of the way at decay "
                     f"0.5 -> {'PASS (once)' if e['once'] else 'FAIL'}")
    if "steps" in r:
        from fastvit_reduce.info import format_table
        head = ["strategy", "mode", "ms/step", "img/s", "peak GiB", "MFU", "syncs", "/base"]
        rows = [[s["strategy"], s["mode"], f"{s['step_ms']:.1f}", f"{s['img_s']:.0f}",
                 na(s["peak_mem_gib"]), na(s["mfu"]), na(s["host_syncs"]), f"{s['vs_baseline']:.3f}"]
                for s in r["steps"]]
        lines.append(format_table("5 train step (bf16, channels-last, fused AdamW, full augment)",
                                  head, rows))
    if "train" in r:
        t = r["train"]
        lines.append(f"6 train: SIGTERM -> exit {t['first_exit']} after {t['first_s']} s, resume -> "
                     f"exit {t['second_exit']}, data_wait_frac {na(t['data_wait_frac'])} -> "
                     f"{'PASS' if t['ok'] else 'FAIL'}")
        if not t["ok"]:
            lines.append(t.get("tail", ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``fastvit-reduce bench gpu [--device cpu --quick] [--json]``; exit code."""
    try:
        args = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        result = bench(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
