"""``fastvit-reduce bench loader --data IMAGEFOLDER_DIR``: train-loader throughput, images/s.

Writes the folder's images once to a temporary .beton (every image stored as JPEG quality 90,
long side at most ``--max-res``, default 256 like ``fastvit-reduce write``), then times full
epochs of each variant, interleaved, after one warm-up epoch each (worker start-up, numba JIT):

  (a) torchvision ImageFolder + PIL RandomResizedCrop + flip + PILToTensor, DataLoader with
      ``--workers`` persistent worker processes — the ordinary timm/torchvision path;
  (b) our ffcv train loader (``create_train_loader``: crop, flip, uint8 batches, no RandAugment);
  (c) (a) + timm's PIL RandAugment   vs   (b) + our batched RandAugment on the batch;
  (d) the decode+crop ceiling: ``--workers`` processes that only decode the stored JPEG bytes
      (libjpeg-turbo, through ffcv's own C functions) and random-crop/resize them, summed.

Everything runs on the CPU here (the batched RandAugment is meant for the GPU; on the CPU it
competes with the decode threads). Same batch size and drop_last for all loaders. (d) sums
per-process rates, as if each had a core to itself; on a busy machine that flatters (d).

    fastvit-reduce bench loader --data /tmp/sample/train --res 224 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RANDAUG_FILL = (124, 116, 104)  # timm's img_mean fill: ImageNet mean x 255, rounded


# ----------------------------------------------------------------------------- the data
def scan_folder(root: Path) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """``(good samples, classes, unreadable files)`` of an ImageFolder; every good file decodes.

    Why decode up front: an exception inside ffcv's DatasetWriter hangs it forever, and a bad file
    would crash the torchvision baseline mid-benchmark.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        hint = " (for a sample dataset, point at its train/ folder)" if (root / "train").is_dir() else ""
        raise ValueError(f"{root}: not an ImageFolder with class subfolders of images: {e}{hint}") from None
    good, bad = [], []
    for path, label in folder.samples:
        try:
            with Image.open(path) as im:
                im.convert("RGB").load()
            good.append((path, label))
        except Exception:  # noqa: BLE001 — any undecodable file is skipped and reported
            bad.append(path)
    if not good:
        raise ValueError(f"{root}: none of the {len(bad)} image files could be decoded")
    return good, folder.classes, bad


def write_beton(root: Path, path: Path, max_res: int, workers: int) -> None:
    """The folder's images as JPEG (quality 90), long side <= ``max_res``: ``fastvit-reduce write``'s
    writer (unreadable files skipped), so the loader reads what the product writes."""
    from fastvit_reduce.data.write import write_split
    write_split(str(root.parent), root.name, str(path), max_resolution=max_res, write_mode="jpg",
                jpeg_quality=90, num_workers=workers)


# ----------------------------------------------------------------------------- the variants
def timm_randaugment(spec: str, res: int):
    """timm's PIL RandAugment as ``create_transform`` builds it, with the Pillow 13 posterize guard."""
    from timm.data.auto_augment import rand_augment_transform

    from fastvit_reduce.bench.timm_path import guard_posterize

    guard_posterize()
    return rand_augment_transform(spec, dict(translate_const=int(res * 0.45), img_mean=RANDAUG_FILL))


def torchvision_loader(root: Path, samples, res, batch_size, workers, randaug: str = ""):
    """(a)/(c): torchvision ImageFolder + PIL transforms through a DataLoader."""
    import torch
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    steps = [transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip()]
    if randaug:
        steps.append(timm_randaugment(randaug, res))
    dataset = ImageFolder(str(root), transform=transforms.Compose(steps + [transforms.PILToTensor()]))
    dataset.samples = dataset.imgs = list(samples)  # without the unreadable files, if any
    dataset.targets = [label for _, label in samples]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)


def ffcv_loader(beton: Path, res, batch_size, workers):
    """(b): our train loader, as the trainer builds it (single process, no repeats)."""
    import torch

    from fastvit_reduce.data.loaders import create_train_loader

    return create_train_loader(beton, batch_size, torch.device("cpu"), res=res, num_workers=workers,
                               in_memory=1, batches_ahead=3, drop_last=True, order="random",
                               aug_repeats=1, seed=0, distributed=False, rrc_scale=[0.08, 1.0],
                               rrc_ratio=[3 / 4, 4 / 3], hflip=1)


def batch_randaugment(spec: str):
    """(c) ours: our BatchRandAugment with timm's fill, a seeded CPU generator per batch (as the
    trainer draws it)."""
    import torch

    from fastvit_reduce.augment.randaugment import BatchRandAugment

    ra, generator, calls = BatchRandAugment(spec, fill=RANDAUG_FILL), torch.Generator(), [0]

    def apply(images):
        calls[0] += 1
        return ra(images, generator.manual_seed(calls[0]))
    return apply


def _ceiling_worker(beton: str, shard: int, shards: int, res: int, tasks, results) -> None:
    """(d) one process: decode + random-crop/resize its shard of stored JPEGs, once per task."""
    import fastvit_reduce.data.ffcv_patch  # noqa: F401 — a spawned process: the fast ffcv import first
    from ffcv.fields.rgb_image import IMAGE_MODES, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader

    reader = Reader(beton)
    meta = reader.metadata[f"f{reader.field_names.index('image')}"][shard::shards]
    alloc = reader.alloc_table
    size_at = dict(zip(alloc["ptr"].tolist(), alloc["size"].tolist()))
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    jpegs = [np.asarray(data[p:p + size_at[p]]) for p in meta["data_ptr"].tolist()]  # bytes in RAM
    # initial=0: a shard may be empty when there are fewer images than workers
    temp = np.empty(int(meta["height"].max(initial=0)) * int(meta["width"].max(initial=0)) * 3, np.uint8)
    out = np.empty((res, res, 3), np.uint8)
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    assert (meta["mode"] == IMAGE_MODES["jpg"]).all()
    results.put("ready")
    while tasks.get() is not None:
        start = time.perf_counter()
        for jpeg, h, w in zip(jpegs, meta["height"].tolist(), meta["width"].tolist()):
            image = temp[:h * w * 3].reshape(h, w, 3)
            imdecode(jpeg, image, h, w, h, w, 0, 0, 1, 1, False, False)
            i, j, ch, cw = get_random_crop(h, w, scale, ratio)
            resize_crop(image, i, i + ch, j, j + cw, out)
        results.put((len(jpegs), time.perf_counter() - start))


class CeilingPool:
    """``workers`` processes decoding in parallel; one call = one pass over the data, summed."""

    def __init__(self, beton: Path, res: int, workers: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # why: the parent already runs ffcv/torch threads
        self.tasks = [ctx.SimpleQueue() for _ in range(workers)]
        self.results = ctx.Queue()  # why not SimpleQueue: get() needs a timeout to notice a dead worker
        self.procs = [ctx.Process(target=_ceiling_worker, daemon=True,
                                  args=(str(beton), k, workers, res, self.tasks[k], self.results))
                      for k in range(workers)]
        for p in self.procs:
            p.start()
        try:
            for _ in self.procs:
                if self._get() != "ready":
                    raise RuntimeError("ceiling worker failed to start")
        except BaseException:
            self.terminate()
            raise

    def _get(self):
        """The next worker message; raise if a worker died (a bare get() would wait forever)."""
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [(k, p.exitcode) for k, p in enumerate(self.procs) if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"ceiling worker {dead[0][0]} exited with code {dead[0][1]} "
                                       "(its error is printed above)") from None

    def run_epoch(self) -> tuple[int, float]:
        """(images, seconds) with seconds = images / (sum of per-process images/s)."""
        for q in self.tasks:
            q.put(1)
        parts = [self._get() for _ in self.procs]
        images = sum(n for n, _ in parts)
        return images, images / sum(n / s for n, s in parts if n)  # an empty shard adds no rate

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        self.terminate(grace_s=10)

    def terminate(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the workers to exit, then kill the rest."""
        for p in self.procs:
            p.join(grace_s)
            if p.is_alive():
                p.terminate()
                p.join(5)


def run_epoch(loader, augment=None) -> tuple[int, float]:
    """(images, seconds) for one full epoch of a loader yielding (images, labels)."""
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        if augment is not None:
            images = augment(images)
        n += images.shape[0]
    return n, time.perf_counter() - start


# ----------------------------------------------------------------------------- the report
ROWS = [("torchvision_img_s", "(a) torchvision ImageFolder + PIL RRC/flip"),
        ("ffcv_img_s", "(b) ffcv train loader (ours)"),
        ("torchvision_randaug_img_s", "(c) (a) + timm PIL RandAugment"),
        ("ffcv_randaug_img_s", "(c) (b) + BatchRandAugment (ours)"),
        ("ceiling_img_s", "(d) decode+crop ceiling")]


def machine() -> str:
    """One line: CPU model, cores, load and library versions."""
    from importlib.metadata import version

    import PIL
    import timm
    import torch

    model = platform.processor() or "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores (load {load}); torch {torch.__version__}, "
            f"ffcv {version('ffcv')}, timm {timm.__version__}, Pillow {PIL.__version__}")


def table(result: dict, args, header: str) -> str:
    """The printed table: images/s and ratios to (a) and (d)."""
    base, ceiling = result["torchvision_img_s"], result["ceiling_img_s"]
    lines = [header,
             f"{result['images']} images, res {result['res']}, batch {args.batch_size}, "
             f"{result['workers']} workers, max_res {args.max_res}, {args.epochs} timed epochs "
             f"(+1 warm-up), RandAugment '{args.randaug}'",
             "", f"{'variant':<44}{'img/s':>9}{'vs (a)':>9}{'vs (d)':>9}"]
    for key, name in ROWS:
        v = result[key]
        if v is None:
            lines.append(f"{name:<44}{'n/a':>9}{'n/a':>9}{'n/a':>9}")
        else:
            lines.append(f"{name:<44}{v:>9.0f}{v / base:>8.2f}x{v / ceiling:>8.2f}x")
    if result["ffcv_randaug_img_s"] is not None:
        lines.append(f"\nwith RandAugment, ours / torchvision: "
                     f"{result['ffcv_randaug_img_s'] / result['torchvision_randaug_img_s']:.2f}x")
    return "\n".join(lines)


def bench(args) -> dict:
    """Write the temporary .beton, time the variants interleaved, return the JSON dict."""
    import torch

    root = Path(args.data)
    samples, _, bad = scan_folder(root)
    if bad:
        print(f"bench: skipping {len(bad)} unreadable files, e.g. {bad[0]}", file=sys.stderr)
    ra_spec = args.randaug
    with tempfile.TemporaryDirectory(prefix="fvr-bench-") as tmp:
        beton = Path(tmp) / "bench.beton"
        start = time.perf_counter()
        write_beton(root, beton, args.max_res, args.workers)
        print(f"bench: wrote {len(samples)} images to a temporary .beton in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        # why this order: torchvision's DataLoader forks its workers at the first epoch; fork
        # them before ffcv starts numba's TBB threads (forking after those is unsafe)
        variants = {key: (torchvision_loader(root, samples, args.res, args.batch_size,
                                             args.workers, spec), None)
                    for key, spec in (("torchvision_img_s", ""), ("torchvision_randaug_img_s", ra_spec))}
        for loader, _ in variants.values():
            run_epoch(loader)  # warm-up: worker start-up
        variants["ffcv_img_s"] = (ffcv_loader(beton, args.res, args.batch_size, args.workers), None)
        ours_ra = batch_randaugment(ra_spec)
        variants["ffcv_randaug_img_s"] = (variants["ffcv_img_s"][0], ours_ra)
        ours_ra(torch.zeros(args.batch_size, 3, args.res, args.res, dtype=torch.uint8))  # warm-up
        run_epoch(variants["ffcv_img_s"][0])  # warm-up: numba JIT
        pool = CeilingPool(beton, args.res, args.workers)
        try:
            pool.run_epoch()  # warm-up: page cache, first-touch
            totals = {k: [0, 0.0] for k in [*variants, "ceiling_img_s"]}
            for epoch in range(args.epochs):  # interleaved, so load changes hit all variants alike
                for key, (loader, augment) in variants.items():
                    n, s = run_epoch(loader, augment)
                    totals[key][0] += n
                    totals[key][1] += s
                n, s = pool.run_epoch()
                totals["ceiling_img_s"][0] += n
                totals["ceiling_img_s"][1] += s
                print(f"bench: timed epoch {epoch + 1}/{args.epochs} done", file=sys.stderr)
        finally:
            pool.close()
    result = {key: None for key, _ in ROWS}
    result.update({k: round(n / s, 1) for k, (n, s) in totals.items()})
    result.update(images=len(samples), res=args.res, workers=args.workers)
    return result


def main(argv: list[str]) -> int:
    """``fastvit-reduce bench loader --data DIR [--res 224] [--workers N] ...``; exit code."""
    parser = argparse.ArgumentParser(prog="fastvit-reduce bench loader",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ImageFolder root: DIR/<class>/<image>")
    parser.add_argument("--res", type=int, default=224, help="output resolution, px")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader workers / ffcv threads / ceiling processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--max-res", type=int, default=256,
                        help="long side of images stored in the .beton, px (256 = the default of "
                             "`fastvit-reduce write`; 512 keeps 350-500 px photos at their own "
                             "size, so (b) and (d) decode as many pixels as (a))")
    parser.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", help="timm RandAugment spec")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    for name in ("res", "workers", "batch_size", "epochs", "max_res"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not Path(args.data).is_dir():
        print(f"error: --data folder not found: {args.data}", file=sys.stderr)
        return 2
    header = machine()
    try:
        result = bench(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result, args, header))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
