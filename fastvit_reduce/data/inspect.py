"""``fastvit-reduce inspect FILE.beton [--json] [--deep]``: what a .beton holds, and whether it decodes.

Prints the sample count, per-class counts (min / max), the stored image sizes and JPEG share,
the bytes per image, and the writer's report (``FILE.beton.report.json``) when present, after
``verify_beton`` has checked the file's structure. Then it decodes JPEGs with ffcv's own decoder
(libjpeg-turbo, as training does): ``SAMPLE_JPEGS`` of them spread evenly over the file (a few
seconds), or every one with ``--deep``, and lists the samples that fail: damage inside a JPEG's
compressed data keeps its markers and header, so only decoding finds it.
Exit code: 0 healthy, 1 damaged, 2 usage error or missing file.

    fastvit-reduce inspect /data/ffcv/train.beton [--json] [--deep]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from fastvit_reduce.config import ConfigError, file_problem
from fastvit_reduce.data.betons import (ALLOC_TABLE, FIELD_TYPES, IMAGE_MODES, _Layout, jpeg_size, read_classes,
                                         verify_beton)


SAMPLE_JPEGS = 1000  # JPEGs a plain `inspect` decodes (~2 s at ImageNet sizes); --deep decodes all


def decode_jpegs(path: str | Path, sample: int | None = None, progress: bool = False) -> tuple[list[int], int, int]:
    """Decode the JPEGs of a structurally sound .beton with ffcv's own decoder (libjpeg-turbo, as
    training does): all of them, or ``sample`` spread evenly over the file. Returns (indices that
    fail to decode or whose frame size differs from the sample table, number decoded, number of
    JPEGs). Raw images
    have nothing to decode beyond ``verify_beton``'s size check. ``ConfigError`` on structural damage."""
    import fastvit_reduce.data.ffcv_patch  # noqa: F401 — before any ffcv module
    from ffcv.libffcv import imdecode

    verify_beton(path)
    lay = _Layout(Path(path))
    table = np.fromfile(lay.path, dtype=ALLOC_TABLE, offset=lay.table_ptr)
    size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    bad, checked, total = [], 0, 0
    fd = os.open(lay.path, os.O_RDONLY)
    try:
        for k, t in enumerate(lay.type_ids):
            if t != 2:
                continue
            col = lay.column(k)
            jpegs = np.flatnonzero(col["mode"] == IMAGE_MODES["jpg"])
            total += len(jpegs)
            if sample is not None and len(jpegs) > sample:
                jpegs = jpegs[np.linspace(0, len(jpegs) - 1, sample).round().astype(np.int64)]
            for n, i in enumerate(jpegs):
                rec = col[i]
                raw = os.pread(fd, size_of[int(rec["data_ptr"])], int(rec["data_ptr"]))
                h, w = int(rec["height"]), int(rec["width"])
                out = np.empty((h, w, 3), dtype=np.uint8)
                failed = imdecode(np.frombuffer(raw, dtype=np.uint8), out, h, w, h, w, 0, 0, 1, 1, False, False)
                if failed != 0 or jpeg_size(raw) != (w, h):  # 0 = decoded
                    bad.append(int(i))
                checked += 1
                if progress and n % 10000 == 0:
                    print(f"inspect --deep: {n}/{len(jpegs)}", file=sys.stderr, flush=True)
    finally:
        os.close(fd)
    return sorted(set(bad)), checked, total


def deep_check(path: str | Path, progress: bool = False) -> list[int]:
    """The indices of every JPEG that fails to decode (``decode_jpegs`` on all of them)."""
    return decode_jpegs(path, None, progress)[0]


def summarize(path: str | Path) -> dict:
    """Facts about a .beton (and its .classes.json / .report.json) as a JSON-able dict."""
    path = Path(path)
    lay = _Layout(path)
    kinds = {name: FIELD_TYPES[t][0] for name, t in zip(lay.names, lay.type_ids)}
    columns = {name: lay.column(k) for k, name in enumerate(lay.names)}
    out = {"path": str(path), "bytes": lay.size, "samples": lay.num_samples, "page_size": lay.page_size,
           "fields": kinds}
    sizes = np.fromfile(path, dtype=ALLOC_TABLE, offset=lay.table_ptr)["size"]
    out["data_bytes_per_sample"] = float(sizes.sum() / max(1, lay.num_samples))

    images = [f for f, kind in kinds.items() if kind == "RGBImageField"]
    if images:
        meta = columns[images[0]]
        long_side = np.maximum(meta["width"], meta["height"])
        out["image"] = {
            "field": images[0],
            "width": _stats(meta["width"]), "height": _stats(meta["height"]),
            "long_side": _stats(long_side),
            "jpeg_fraction": float((meta["mode"] == IMAGE_MODES["jpg"]).mean()) if len(meta) else 0.0,
        }
    problems = []  # why: a broken side file is reported, not mistaken for a broken .beton
    try:
        classes = read_classes(path)
    except ConfigError as e:
        classes = None
        problems.append(str(e))
    labels = [f for f, kind in kinds.items() if kind == "IntField"]
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
    dec = s.get("decoded")
    if dec and dec["jpegs"]:
        which = "every JPEG" if dec["all"] else f"{dec['checked']} of {dec['jpegs']} JPEGs (evenly spread; --deep: all)"
        lines.append(f"decoded {which}: {len(dec['failed'])} fail")
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
    """``fastvit-reduce inspect FILE.beton [--json] [--deep]``; returns the exit code
    (0 healthy, 1 damaged, 2 usage error or missing file)."""
    files = [a for a in argv if not a.startswith("-")]
    unknown = [a for a in argv if a.startswith("-") and a not in ("--json", "--deep", "-h", "--help")]
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    if len(files) != 1 or unknown:
        print("error: usage: fastvit-reduce inspect FILE.beton [--json] [--deep]", file=sys.stderr)
        return 2
    path = Path(files[0])
    problem = file_problem(path, "file")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    deep = "--deep" in argv
    try:
        verify_beton(path)
        bad, checked, jpegs = decode_jpegs(path, None if deep else SAMPLE_JPEGS, progress=deep)
        summary = summarize(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 — ffcv raises assorted types on foreign files
        print(f"error: {path}: not a readable ffcv .beton ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    summary["decoded"] = {"jpegs": jpegs, "checked": checked, "all": checked == jpegs, "failed": bad}
    print(json.dumps(summary, indent=2) if "--json" in argv else _format(summary))
    if bad:
        shown = ", ".join(map(str, bad[:50])) + (f", ... ({len(bad)} in all)" if len(bad) > 50 else "")
        where = "" if summary["decoded"]["all"] else f" (of {checked} decoded; --deep decodes all {jpegs})"
        print(f"error: {path}: {len(bad)} image(s) fail to decode: {shown}{where}", file=sys.stderr)
        return 1
    return 0
