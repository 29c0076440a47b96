"""``fastvit-reduce sample --out DIR``: a small ImageNet-layout dataset from photos on disk.

No download: the source photographs are the sample images that ship inside scikit-image's
wheel (``skimage/data/*.png|jpg``; scikit-image's own ``data.*`` loaders would fetch the rest
of its gallery with pooch, so we read only files already present). One class per photo;
every sample is a random crop / rescale / flip / colour jitter of it, re-encoded as JPEG at an
ImageNet-like size (350–500 px on the long side by default). Validation images are other random
crops of the same photos, drawn from a different random stream.

    DIR/train/n00000001_astronaut/n00000001_astronaut_0000.JPEG
    DIR/val/n00000001_astronaut/...
    DIR/sample.json                  the settings and the list of sources

Deterministic: the same settings give byte-identical files (one seeded stream per image). If
``DIR`` already holds a sample made with the same settings it is reused; with different
settings the command refuses rather than mixing two datasets.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# (class name, file inside skimage/data): photographs and natural textures. Left out on purpose:
# horse (a silhouette), logo/text/page (graphics), motorcycle_right (near-copy of the left view).
SOURCES = [
    ("astronaut", "astronaut.png"),
    ("brick", "brick.png"),
    ("camera", "camera.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
]
FORMAT_VERSION = 1  # bump when the generator changes, so an old DIR is not silently reused


def skimage_data_dir() -> Path:
    """The folder of sample images inside the installed scikit-image."""
    try:
        import skimage
    except ImportError:
        raise RuntimeError("scikit-image is not installed: pip install scikit-image "
                           "(or pip install -e .[demo])") from None
    return Path(skimage.__file__).parent / "data"


def load_sources(num_classes: int | None = None) -> list[tuple[str, Image.Image]]:
    """``[(class name, RGB PIL image)]`` for the first ``num_classes`` entries of ``SOURCES``."""
    root = skimage_data_dir()
    chosen = SOURCES[:num_classes] if num_classes else SOURCES
    out = []
    for name, filename in chosen:
        path = root / filename
        if not path.is_file():
            raise RuntimeError(f"scikit-image sample photo missing: {path}")
        with Image.open(path) as im:
            out.append((name, im.convert("RGB")))  # grayscale textures -> 3 equal channels
    return out


def class_folders(names: list[str]) -> list[str]:
    """wnid-like folder names, sorted in ``SOURCES`` order: ``n00000001_astronaut``, ..."""
    return [f"n{i + 1:08d}_{name}" for i, name in enumerate(names)]


def make_view(photo: Image.Image, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """One random crop of ``photo`` (area 25–100 %, aspect 3/4–4/3), resized, flipped, jittered."""
    w, h = photo.size
    for _ in range(10):
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    long_side = int(rng.integers(min_size, max_size + 1))  # px, like ImageNet's ~350-500
    scale = long_side / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.75, 1.25))
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes (no EXIF, no timestamps, so identical inputs give identical bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_sample(out: str | Path, *, seed: int = 0, train_per_class: int = 40, val_per_class: int = 10,
                 min_size: int = 350, max_size: int = 500, num_classes: int | None = None) -> dict:
    """Write the sample dataset to ``out`` (reusing it if it matches); return its manifest."""
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < --min-size <= --max-size, got {min_size} and {max_size}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("--train-per-class and --val-per-class must be at least 1")
    if num_classes is not None and not 2 <= num_classes <= len(SOURCES):
        raise ValueError(f"--num-classes must be between 2 and {len(SOURCES)}, got {num_classes}")
    out = Path(out)
    settings = dict(format_version=FORMAT_VERSION, seed=seed, train_per_class=train_per_class,
                    val_per_class=val_per_class, min_size=min_size, max_size=max_size,
                    num_classes=num_classes or len(SOURCES))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    manifest_path = out / "sample.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings:
            print(f"sample: reusing {out} ({old['images']} images, same settings)")
            return old
        raise FileExistsError(f"{out} holds a sample made with other settings "
                              f"({old.get('settings')}); remove it or choose another --out")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a sample folder; choose an empty or new --out")

    sources = load_sources(num_classes)
    folders = class_folders([name for name, _ in sources])
    tmp = out.with_name(out.name + ".partial")  # why: an interrupted build must not look complete
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for class_id, ((_, photo), folder) in enumerate(zip(sources, folders)):
            (tmp / split / folder).mkdir(parents=True)
            for i in range(per_class):
                # one independent stream per image: the output does not depend on loop order
                rng = np.random.default_rng([seed, split_id, class_id, i])
                img = make_view(photo, rng, min_size, max_size)
                data = encode_jpeg(img, quality=int(rng.integers(85, 96)))
                (tmp / split / folder / f"{folder}_{i:04d}.JPEG").write_bytes(data)
                count += 1
        print(f"sample: {split}: {len(folders)} classes x {per_class} images", flush=True)
    manifest = dict(settings=settings, images=count, classes=folders,
                    sources={f: f"skimage/data/{fn}" for f, (_, fn) in zip(folders, SOURCES)},
                    licence="scikit-image sample data; see skimage/data/README.txt and "
                            "https://scikit-image.org/docs/stable/api/skimage.data.html")
    (tmp / "sample.json").write_text(json.dumps(manifest, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    print(f"sample: wrote {count} images to {out}")
    return manifest


def main(argv: list[str]) -> int:
    """``fastvit-reduce sample --out DIR [--seed N] [--train-per-class N] ...``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="fastvit-reduce sample", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    parser.add_argument("--train-per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=10, help="validation images per class")
    parser.add_argument("--min-size", type=int, default=350, help="smallest long side, px")
    parser.add_argument("--max-size", type=int, default=500, help="largest long side, px")
    parser.add_argument("--num-classes", type=int, default=None,
                        help=f"use the first N of the {len(SOURCES)} photos (default: all)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    try:
        build_sample(args.out, seed=args.seed, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, min_size=args.min_size,
                     max_size=args.max_size, num_classes=args.num_classes)
    except (ValueError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
