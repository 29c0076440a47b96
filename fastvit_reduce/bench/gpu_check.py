"""``python -m fastvit_reduce.bench.gpu_check --out OUT``: the GPU check, one JSON line per section.

    scripts/gpu_check.sh DIR OUT                   # on the GPU box (installs the bundle first)
    python -m fastvit_reduce.bench.gpu_check --out OUT --device cpu     # the same sections, tiny
    fastvit-reduce bench gpu [--device cpu]        # the same, with the table printed at the end

Every section runs in its own child process with its own time limit, and appends its JSON lines
(``{"section": ..., "ok": true|false, ...figures}``) to ``OUT/gpu_check.jsonl`` as it finishes, so
a check cut off by the machine's time limit still returns everything before the cut; a section that
crashes or runs out of time gets a line saying so. Sections, most important first:

* ``host_syncs``: steady steps of two paired variants (augmentation, micro-steps, fused AdamW with
  a skip forced, EMA), bf16 and fp16: ``host_syncs_per_step`` must be 0 (CUDA's sync debug mode;
  on the CPU the aten ops that would sync);
* ``train``: the trainer CLI for 2 epochs, SIGTERM mid-run (exit 124), the same command again
  (exit 0, completed), with its data wait, speed and peak memory;
* ``loader``: train-loader img/s with 1 decode thread and with all cores;
* ``bit_exact``: the device loader's batches equal the CPU loader's, batch by batch, as they arrive
  (no clone, no extra sync: ffcv's reused buffers and its copy streams are exercised);
* ``augment``: ms per batch of RandAugment and of the whole batch augmentation, host syncs;
* ``ema``: a grouped model's shared tensor moves once per update, with foreach kept;
* ``paired``: K=4 variants (baseline, thin, shallow, grouped) stepping on one batch;
* ``step``: img/s of our step (``variant.Variant``: micro-step + optimizer step + EMA) per
  strategy for ViT-B/16 and ViT-S/16, bf16 and fp16, eager and compiled (one line each);
* ``memory`` and ``balance`` (from the lines above): peak memory per model, and how many CPU cores
  one GPU needs to feed its step at K=1 and K=4 (model img/s / loader img/s per core).

Sizes: on a GPU the real ones (224 px, batch 256); with ``--device cpu`` tiny ones (timm's
``test_vit`` and ``test_vit2`` at 32 px, batch 8) that check the code paths, not speed. docs/gpu.md has the procedure and results.
"""
from __future__ import annotations

import argparse
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
STRATEGIES = ("baseline", "thin", "shallow", "grouped")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, data sheets
# name -> seconds allowed (GPU); the CPU rehearsal's tiny sizes fit the same limits
SECTIONS = {"host_syncs": 120, "train": 180, "loader": 120, "bit_exact": 60, "augment": 60, "ema": 60,
            "paired": 120, "step": 300}


# ----------------------------------------------------------------------------- sizes and helpers
def sizes(device: str) -> dict:
    """The models, batch and resolution of each section on ``device``."""
    if device == "cuda":
        return dict(models={"vit_b16": dict(name="vit_base_patch16_224"), "vit_s16": dict(name="vit_small_patch16_224")},
                    res=224, batch=256, steps=20, warmup=5, images=256 * 12, workers=len(os.sched_getaffinity(0)),
                    compiled={("vit_b16", "bf16"), ("vit_s16", "bf16")})
    # timm's registered test ViTs (64 and 96 wide) at 32 px with 8 px patches
    return dict(models={"test_vit": dict(name="test_vit", patch_size=8), "test_vit2": dict(name="test_vit2", patch_size=8)},
                res=32, batch=8, steps=3, warmup=1, images=8 * 6, workers=len(os.sched_getaffinity(0)),
                compiled={("test_vit", "bf16")})


def emit(out: Path, section: str, ok: bool, **figures) -> dict:
    """Append one JSON line (flushed) and return it."""
    row = {"section": section, "ok": bool(ok), **figures}
    with open(out, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
    print(f"gpu_check: {section} {'ok' if ok else 'FAILED'} {json.dumps(figures, default=str)[:300]}", flush=True)
    return row


class Timer:
    """Elapsed ms of a block: CUDA events on a GPU (no host wait inside), perf_counter on the CPU."""

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


def count_syncs(device, fn) -> int:
    """How many host syncs ``fn()`` makes: CUDA's sync debug mode, or on the CPU the aten ops that
    would make a CUDA host wait (``tests/test_cuda_paths.py`` has the same list)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastvit_reduce.augment import randaugment
    found = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select"):
                found.append(func.__name__)
            return func(*args, **(kwargs or {}))
    choose = randaugment._choose_path
    randaugment._choose_path = lambda device, path=None: "where"  # the path CUDA runs, not the CPU's
    try:
        with Recorder():
            fn()
    finally:
        randaugment._choose_path = choose
    return len(found)


def variant(args, tmp: Path, strategy: str, model: str, amp: str, compile_: bool = False, name: str = "v"):
    """Our trainer's ``Variant`` (model, fused AdamW, scaler, EMA) for one configuration."""
    from fastvit_reduce.config import load_config, resolved
    from fastvit_reduce.recipe import batch_plan
    from fastvit_reduce.runs import RunFolder
    from fastvit_reduce.runtime import Dist
    from fastvit_reduce.settings import SECTIONS as KEYS
    from fastvit_reduce.variant import Variant
    spec = args.sizes["models"][model]
    load_config([f"--model.arch={spec['name']}", f"--model.img_size={args.sizes['res']}",
                 f"--model.patch_size={spec.get('patch_size', 0)}", f"--reduction.strategy={strategy}",
                 f"--training.amp={amp}", "--optim.fused=1", "--training.channels_last=1",
                 f"--training.compile={int(compile_)}", "--ema.decay=0.9998",
                 f"--training.batch_size={args.sizes['batch']}", f"--training.device={args.device}",
                 f"--resolution.min_res={args.sizes['res']}", f"--resolution.max_res={args.sizes['res']}"], KEYS)
    cfg = resolved(KEYS)
    return Variant(cfg, Dist(args.device), RunFolder(tmp / name), batch_plan(cfg, 1), True), cfg


def batch(args, device, num_classes: int = 1000):
    """One synthetic uint8 channels-last batch and its labels, on ``device``."""
    import torch
    g = torch.Generator().manual_seed(0)
    res, b = args.sizes["res"], args.sizes["batch"]
    images = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (b,), generator=g)
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def augmenter(cfg: dict, device, dtype):
    """The trainer's batch augmentation (the seed's recipe) for ``cfg``."""
    from fastvit_reduce.augment.batch import augment_from_cfg
    return augment_from_cfg(cfg, cfg["model.num_classes"], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                            cfg["training.label_smoothing"], device, dtype)


# ----------------------------------------------------------------------------- sections (children)
def section_host_syncs(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.seeding import derive
    device = torch.device(args.device)
    model = next(iter(args.sizes["models"]))
    for amp in ("bf16", "fp16"):
        pair = [variant(args, tmp, s, model, amp, name=f"{s}_{amp}")[0] for s in ("baseline", "grouped")]
        cfg = pair[0].cfg
        aug = augmenter(cfg, device, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
        images, labels = batch(args, device)

        def step(i, nan=False):
            x, y = aug(images, labels, seed=derive(0, "augment", 0, i, 0))
            if nan:
                x = x * float("nan")
            for v in pair:
                torch.manual_seed(derive(0, "model", 0, i, 0))
                v.micro_step(x, y, update=True, group=1)
                v.optimizer_step(1e-4)
        for i in range(args.sizes["warmup"] + 1):
            step(i)
        steps = args.sizes["steps"]
        syncs = count_syncs(device, lambda: [step(100 + i, nan=i == 1) for i in range(steps)])
        emit(out, "host_syncs", syncs == 0, amp=amp, variants=2, steps=steps, skip_forced=True,
             host_syncs_per_step=syncs / steps)


def section_train(args, out: Path, tmp: Path) -> None:
    from fastvit_reduce.runs import RunFolder
    quick = args.device == "cpu"
    train, val = write_data(tmp, 32 if quick else 480, 40 if quick else 80), write_data(tmp, 12, 40 if quick else 80, "val")
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "fastvit_reduce.cli", "train",
           "--config", str(REPO / "rn_configs" / "sample" / "baseline.yaml"),
           f"--data.train_dataset={train}", f"--data.val_dataset={val}", f"--logging.folder={runs}",
           "--logging.experiment=gpu_check", f"--training.device={args.device}", "--training.epochs=2",
           "--checkpoint.every_minutes=0.00001", "--logging.every_steps=1", "--logging.progress=0"]
    if quick:  # 32 px, batch 2: 16 updates per epoch, one thread
        cmd += ["--training.batch_size=2", "--training.global_batch=0", "--model.img_size=32",
                "--resolution.min_res=32", "--resolution.max_res=32", "--validation.batch_size=12",
                "--training.threads=1", "--data.num_workers=1"]
    else:
        cmd += ["--training.amp=bf16", "--optim.fused=1", "--training.channels_last=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    folder = RunFolder(runs / "gpu_check")
    t0 = time.monotonic()
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while first.poll() is None:  # SIGTERM once a mid-epoch last.pt exists
        if folder.last_pt.is_file() and time.monotonic() - t0 > (0 if quick else 10):
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    first_out = first.communicate(timeout=300)[0]
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    final = folder.read_final() or {}
    rows = folder.read_rows()
    ok = first.returncode == 124 and second.returncode == 0 and bool(final.get("completed"))
    emit(out, "train", ok, first_exit=first.returncode, second_exit=second.returncode,
         completed=final.get("completed"), epochs=len(rows), data_wait_frac=final.get("data_wait_frac"),
         train_img_s=final.get("train_img_s"), peak_mem_mb=max((r.get("peak_mem_mb") or 0 for r in rows), default=None),
         tail=None if ok else (first_out[-400:] + "\n---\n" + second.stdout[-400:] + second.stderr[-400:]))


def write_data(tmp: Path, n: int, size: int, name: str = "train") -> str:
    from fastvit_reduce.data.synthetic import write_beton
    path = tmp / f"{name}_{n}_{size}.beton"
    return str(path) if path.is_file() else write_beton(path, n, 12, size, write_mode="jpg",
                                                        num_workers=min(8, os.cpu_count() or 1))


def section_loader(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.data.loaders import create_train_loader, set_epoch
    device = torch.device(args.device)
    s = args.sizes
    beton = write_data(tmp, s["images"], s["res"] + s["res"] // 4)
    for threads in sorted({1, s["workers"]}):
        loader = create_train_loader(beton, s["batch"], device, res=s["res"], num_workers=threads, in_memory=True,
                                     batches_ahead=3, drop_last=True, order="random", aug_repeats=1, seed=0,
                                     distributed=False, rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=True)
        for epoch in range(2):  # the first compiles (numba) and warms the page cache
            set_epoch(loader, epoch)
            n, t0 = 0, time.perf_counter()
            for images, _ in loader:
                n += len(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        loader.close()
        emit(out, "loader", n > 0, threads=threads, img_s=round(n / seconds, 1),
             img_s_per_core=round(n / seconds / threads, 1), res=s["res"], stored_px=s["res"] + s["res"] // 4)


def section_bit_exact(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.data.loaders import create_train_loader, set_epoch
    s = args.sizes
    beton = write_data(tmp, s["images"], s["res"] + s["res"] // 4)
    make = lambda device: create_train_loader(  # noqa: E731
        beton, s["batch"], torch.device(device), res=s["res"], num_workers=s["workers"], in_memory=True,
        batches_ahead=3, drop_last=True, order="random", aug_repeats=1, seed=0, distributed=False,
        rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=True)
    a, b = make(args.device), make("cpu")
    for loader in (a, b):
        set_epoch(loader, 0)
    batches = equal = 0
    for (xa, ya), (xb, yb) in zip(a, b):
        batches += 1
        equal += bool(torch.equal(xa.cpu(), xb) and torch.equal(ya.cpu(), yb))
    a.close()
    b.close()
    emit(out, "bit_exact", batches > 0 and equal == batches, compared=f"{args.device} vs cpu", batches=batches,
         equal_batches=equal)


def section_augment(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.augment.randaugment import BatchRandAugment
    device = torch.device(args.device)
    _, cfg = variant(args, tmp, "baseline", next(iter(args.sizes["models"])), "bf16")
    full = augmenter(cfg, device, torch.bfloat16)
    images, labels = batch(args, device)
    ra = BatchRandAugment(cfg["augment.randaugment"])
    runs = {"randaugment": lambda s: ra(images, torch.Generator(device).manual_seed(s)),
            "full": lambda s: full(images, labels, seed=s)}
    for name, fn in runs.items():
        fn(0)
        ms = []
        for s in range(1, args.sizes["steps"] + 1):
            with Timer(device) as t:
                fn(s)
            ms.append(t.ms)
        syncs = count_syncs(device, lambda: [fn(s) for s in range(3)])
        emit(out, "augment", syncs == 0, part=name, ms_per_batch=round(statistics.median(ms), 3),
             batch=args.sizes["batch"], host_syncs=syncs)


def section_ema(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.ema import ModelEma
    from fastvit_reduce.models import create_model
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", strategy="grouped", img_size=32, patch_size=8, embed_dim=64,
                         depth=4, num_heads=2, num_classes=4).to(args.device)
    ema = ModelEma(model, decay=0.5, device=args.device)  # "cuda", as a user writes it: foreach must stay
    shared = model.blocks[0].mlp.fc1.weight
    before = ema.module.blocks[0].mlp.fc1.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=10_000)  # far past the first update: decay 0.5
    moved = ((ema.module.blocks[0].mlp.fc1.weight - before) / (shared - before)).mean().item()
    once = abs(moved - 0.5) < 1e-5
    emit(out, "ema", once and ema.foreach, moved_fraction=round(moved, 6), once=once, foreach=ema.foreach)


def _time_steps(args, device, pair, aug, images, labels) -> float:
    """Median ms of one batch through every variant of ``pair`` (augmentation included once)."""
    import torch

    from fastvit_reduce.seeding import derive

    def step(i):
        x, y = aug(images, labels, seed=derive(0, "augment", 0, i, 0))
        for v in pair:
            torch.manual_seed(derive(0, "model", 0, i, 0))
            v.micro_step(x, y, update=True, group=1)
            v.optimizer_step(1e-4)
    for i in range(args.sizes["warmup"]):
        step(i)
    ms = []
    for i in range(args.sizes["steps"]):
        with Timer(device) as t:
            step(args.sizes["warmup"] + i)
        ms.append(t.ms)
    return statistics.median(ms)


def section_paired(args, out: Path, tmp: Path) -> None:
    import torch
    device = torch.device(args.device)
    model = next(iter(args.sizes["models"]))
    pair = [variant(args, tmp, s, model, "bf16", name=s)[0] for s in STRATEGIES]
    aug = augmenter(pair[0].cfg, device, torch.bfloat16)
    images, labels = batch(args, device)
    ms = _time_steps(args, device, pair, aug, images, labels)
    b = args.sizes["batch"]
    emit(out, "paired", True, model=model, variants=len(pair), amp="bf16", ms_per_batch=round(ms, 2),
         stream_img_s=round(b / ms * 1e3, 1), variant_img_s=round(len(pair) * b / ms * 1e3, 1))


def section_step(args, out: Path, tmp: Path) -> None:
    import torch

    from fastvit_reduce.models import gflops
    device = torch.device(args.device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    images, labels = batch(args, device)
    b = args.sizes["batch"]
    for model in args.sizes["models"]:
        for amp in ("bf16", "fp16"):
            for mode in ("eager", "compiled"):
                if mode == "compiled" and (model, amp) not in args.sizes["compiled"]:
                    continue
                for strategy in STRATEGIES:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    v, cfg = variant(args, tmp, strategy, model, amp, mode == "compiled", name=f"{model}_{strategy}")
                    aug = augmenter(cfg, device, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
                    ms = _time_steps(args, device, [v], aug, images, labels)
                    fwd = gflops(v.model, args.sizes["res"])
                    mfu = 3 * fwd * 1e9 * b / (ms / 1e3) / (peak * 1e12) if peak else None
                    emit(out, "step", True, model=model, strategy=strategy, amp=amp, mode=mode, ms=round(ms, 2),
                         img_s=round(b / ms * 1e3, 1), params=v.stats["params"], gflops=round(fwd, 3),
                         mfu=None if mfu is None else round(mfu, 4),
                         peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                         if device.type == "cuda" else None)
                    del v


CHILDREN = {"host_syncs": section_host_syncs, "train": section_train, "loader": section_loader,
            "bit_exact": section_bit_exact,
            "augment": section_augment, "ema": section_ema, "paired": section_paired, "step": section_step}


# ----------------------------------------------------------------------------- summaries (parent)
def summaries(out: Path, sections: list[str]) -> None:
    """``memory`` (after ``step``) and ``balance`` (after ``loader`` and ``step``) from the lines written."""
    if "step" not in sections:
        return
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["section"] == "step" and r.get("ok")]
    peaks = {}
    for r in steps:
        if r.get("peak_mem_gib") is not None:
            peaks[r["model"]] = max(peaks.get(r["model"], 0), r["peak_mem_gib"])
    emit(out, "memory", bool(steps), peak_gib_per_model=peaks or None,
         note=None if peaks else "CPU: no CUDA memory counter")
    if "loader" not in sections:
        return
    per_core = max((r["img_s_per_core"] for r in rows if r["section"] == "loader" and r.get("ok")), default=None)
    base = [r for r in steps if r["strategy"] == "baseline"]
    paired = next((r for r in rows if r["section"] == "paired" and r.get("ok")), None)
    if per_core and base:
        fastest = max(base, key=lambda r: r["img_s"])
        need_k1 = fastest["img_s"] / per_core
        need_k4 = paired["stream_img_s"] / per_core if paired else None
        emit(out, "balance", True, loader_img_s_per_core=per_core, model=fastest["model"], amp=fastest["amp"],
             mode=fastest["mode"], model_img_s=fastest["img_s"], cores_needed_k1=round(need_k1, 2),
             paired_stream_img_s=paired and paired["stream_img_s"],
             cores_needed_k4=None if need_k4 is None else round(need_k4, 2),
             cores_here=len(os.sched_getaffinity(0)))
    else:
        emit(out, "balance", False, error="needs the loader and step sections")


# ----------------------------------------------------------------------------- command
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_reduce.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder: gpu_check.jsonl is appended to")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")
    p.add_argument("--table", action="store_true", help="print the results as a table at the end")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    args.sizes = sizes(args.device)
    return args


def run_sections(args) -> int:
    """Each section in a child process with its time limit; a failed or timed-out one gets a line."""
    out = Path(args.out) / "gpu_check.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.sections:
            limit = SECTIONS[name] * args.time_scale
            before = len(out.read_text().splitlines()) if out.is_file() else 0
            cmd = [sys.executable, "-m", "fastvit_reduce.bench.gpu_check", "--out", args.out, "--device", args.device,
                   "--child", name, "--tmp", tmp]
            t0 = time.monotonic()
            try:
                code = subprocess.run(cmd, timeout=limit).returncode
                error = None if code == 0 else f"the section's process exited {code}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {limit:.0f} s"
            lines = out.read_text().splitlines()[before:] if out.is_file() else []
            if error or not lines:
                emit(out, name, False, error=error or "the section wrote no line", seconds=round(time.monotonic() - t0, 1))
        summaries(out, args.sections)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if args.table:
        print(table(rows))
    return 0 if rows and all(r["ok"] for r in rows) else 1


def table(rows: list[dict]) -> str:
    """The JSON lines as one line each: section, ok, figures."""
    skip = {"section", "ok", "tail"}
    return "\n".join(f"{r['section']:<11} {'ok  ' if r['ok'] else 'FAIL'} "
                     + " ".join(f"{k}={v}" for k, v in r.items() if k not in skip and v is not None) for r in rows)


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.child:  # one section, inside its own process
        import torch
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        CHILDREN[args.child](args, Path(args.out) / "gpu_check.jsonl", Path(args.tmp))
        sys.stdout.flush()
        os._exit(0)  # why: numba's and ffcv's teardown can print noise or hang; the lines are written
    return run_sections(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
