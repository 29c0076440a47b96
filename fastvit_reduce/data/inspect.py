"""``fastvit-reduce inspect FILE.beton [--json]``: what a .beton holds.

Prints the sample count, per-class counts (min / max), the stored image sizes and JPEG share,
the bytes per image, and the writer's report (``FILE.beton.report.json``) when present.
Reads only the header, the sample table and the allocation table (no image is decoded).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fastvit_reduce.config import ConfigError
from fastvit_reduce.data.loaders import read_classes


def summarize(path: str | Path) -> dict:
    """Facts about a .beton (and its .classes.json / .report.json) as a JSON-able dict."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    reader = Reader(str(path))
    names = reader.metadata.dtype.names  # ffcv's sample table: one unnamed column per field
    columns = {field: reader.metadata[names[k]] for k, field in enumerate(reader.field_names)}
    out = {"path": str(path), "bytes": path.stat().st_size, "samples": int(reader.num_samples),
           "page_size": int(reader.page_size),
           "fields": {f: type(h).__name__ for f, h in reader.handlers.items()}}
    sizes = reader.alloc_table["size"]
    out["data_bytes_per_sample"] = float(sizes.sum() / max(1, reader.num_samples))

    images = [f for f, h in reader.handlers.items() if isinstance(h, RGBImageField)]
    if images:
        meta = columns[images[0]]
        long_side = np.maximum(meta["width"], meta["height"])
        out["image"] = {
            "field": images[0],
            "width": _stats(meta["width"]), "height": _stats(meta["height"]),
            "long_side": _stats(long_side),
            "jpeg_fraction": float((meta["mode"] == 0).mean()) if len(meta) else 0.0,
        }
    problems = []  # why: a broken side file is reported, not mistaken for a broken .beton
    try:
        classes = read_classes(path)
    except ConfigError as e:
        classes = None
        problems.append(str(e))
    labels = [f for f, h in reader.handlers.items() if isinstance(h, IntField)]
    if labels:
        values = columns[labels[0]].astype(np.int64)
        num_classes = max(len(classes or []), int(values.max()) + 1 if len(values) else 0)
        counts = np.bincount(values[values >= 0], minlength=num_classes)
        out["labels"] = {"field": labels[0], "num_classes": num_classes,
                         "per_class_min": int(counts.min()) if len(counts) else 0,
                         "per_class_max": int(counts.max()) if len(counts) else 0,
                         "empty_classes": int((counts == 0).sum()),
                         "negative": int((values < 0).sum())}
        if classes is not None and len(values) and values.max() >= len(classes):
            problems.append(f"label {int(values.max())} but only {len(classes)} names in "
                            f"{path}.classes.json")
    out["classes"] = classes
    report, out["report"] = Path(f"{path}.report.json"), None
    if report.is_file():
        try:
            out["report"] = json.loads(report.read_text())
        except ValueError as e:
            problems.append(f"{report}: not valid JSON ({e})")
    if problems:
        out["problems"] = problems
    return out


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def _format(s: dict) -> str:
    lines = [f"{s['path']}  ({s['bytes'] / 1e9:.3f} GB, page {s['page_size'] >> 20} MiB)",
             f"samples: {s['samples']}   fields: "
             + ", ".join(f"{k} ({v})" for k, v in s["fields"].items()),
             f"stored bytes per sample: {s['data_bytes_per_sample'] / 1e3:.1f} kB"]
    if "labels" in s:
        lab = s["labels"]
        source = "names from .classes.json" if s["classes"] is not None else "no .classes.json"
        lines.append(f"classes: {lab['num_classes']} ({source})   per class: min {lab['per_class_min']}, "
                     f"max {lab['per_class_max']}, empty {lab['empty_classes']}")
    if "image" in s:
        im = s["image"]
        lines.append("stored size px: " + ", ".join(
            f"{k} {im[k]['min']}..{im[k]['max']} (median {im[k]['median']:g})"
            for k in ("width", "height", "long_side") if im[k]) + f"; JPEG {100 * im['jpeg_fraction']:.1f} %")
    for problem in s.get("problems", []):
        lines.append(f"PROBLEM: {problem}")
    rep = s["report"]
    if rep is None:
        lines.append("report: none (not written by fastvit-reduce write)")
    else:
        settings = rep.get("settings", {})
        shown = {k: settings[k] for k in ("max_resolution", "write_mode", "compress_probability",
                                          "jpeg_quality", "subset") if k in settings}
        lines.append(f"report: wrote {rep['written']}, skipped {len(rep['skipped'])}, "
                     f"from {rep.get('source', '?')} in {rep['seconds']:.1f} s "
                     f"({rep['images_per_s']:.1f} img/s); "
                     + " ".join(f"{k}={v}" for k, v in shown.items()))
        for item in rep["skipped"][:10]:
            lines.append(f"  skipped {item['path']}: {item['error']}")
        if len(rep["skipped"]) > 10:
            lines.append(f"  ... and {len(rep['skipped']) - 10} more in {s['path']}.report.json")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``fastvit-reduce inspect FILE.beton [--json]``; returns the exit code."""
    files = [a for a in argv if not a.startswith("-")]
    unknown = [a for a in argv if a.startswith("-") and a not in ("--json", "-h", "--help")]
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    if len(files) != 1 or unknown:
        print("error: usage: fastvit-reduce inspect FILE.beton [--json]", file=sys.stderr)
        return 2
    path = Path(files[0])
    if not path.is_file():
        print(f"error: file not found: {path}", file=sys.stderr)
        return 2
    try:
        summary = summarize(path)
    except Exception as e:  # noqa: BLE001 — ffcv raises assorted types on foreign files
        print(f"error: {path}: not a readable ffcv .beton ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if "--json" in argv else _format(summary))
    return 0
