"""``fastvit-reduce inspect FILE.beton [--json]``: what a .beton holds.

Prints the sample count, per-class counts (min / max), the stored image sizes and JPEG share,
the bytes per image, and the writer's report (``FILE.beton.report.json``) when present.
Reads only the header, the sample table and the allocation table (no image is decoded), after
``verify_beton`` has checked the file's structure; ``--deep`` also decodes every image and lists
the samples that fail. Exit code: 0 healthy, 1 damaged, 2 usage error or missing file.

    fastvit-reduce inspect /data/ffcv/train.beton [--json] [--deep]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from fastvit_reduce.config import ConfigError
from fastvit_reduce.data.loaders import read_classes


# ffcv 1.0.2's format (ffcv/types.py, writer.py, memory_allocator.py): header | field descriptors
# | sample table ("metadata", one record per sample) | zero padding to a page | data pages, each
# written in full (page_size bytes), no allocation crossing a page | allocation table
# (sample_id, ptr, size) to the end of the file; the header's alloc_table_ptr points at it.
_ALLOCATING_TYPES = {2, 3, 4, 5, 6}  # type ids whose encode() mallocs once per sample (rgb, bytes, ...)
_PROBE_ALL_JPEGS = 65536             # up to this many JPEGs, check every one's SOI/EOI markers


class _Layout:
    """Header, field descriptors and sample table of a .beton, checked against the file size."""

    def __init__(self, path: Path):
        from ffcv.types import (CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                                get_handlers, get_metadata_type)
        from ffcv.utils import decode_null_terminated_string
        from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

        self.path, self.size = path, path.stat().st_size
        if self.size < HeaderType.itemsize:
            self.fail(f"{self.size} bytes, shorter than ffcv's {HeaderType.itemsize}-byte header")
        header = np.fromfile(path, dtype=HeaderType, count=1)[0]
        if header["version"] != CURRENT_VERSION:
            self.fail(f"format version {header['version']}, ffcv 1.0.2 reads version {CURRENT_VERSION} "
                      "(not a .beton, or its header is overwritten)")
        self.page_size, self.num_samples = int(header["page_size"]), int(header["num_samples"])
        self.num_fields, self.table_ptr = int(header["num_fields"]), int(header["alloc_table_ptr"])
        if not (MIN_PAGE_SIZE <= self.page_size < MAX_PAGE_SIZE) or self.page_size & (self.page_size - 1):
            self.fail(f"page size {self.page_size} is not a power of two in [2 MiB, 4 GiB)")
        if not 1 <= self.num_fields <= 64:
            self.fail(f"header says {self.num_fields} fields")
        desc_end = HeaderType.itemsize + self.num_fields * FieldDescType.itemsize
        if desc_end > self.size:
            self.fail("the file ends inside the field descriptors")
        desc = np.fromfile(path, dtype=FieldDescType, count=self.num_fields, offset=HeaderType.itemsize)
        bad = [int(t) for t in desc["type_id"] if TYPE_ID_HANDLER.get(int(t)) is None]
        if bad:
            self.fail(f"field type id {bad[0]} is not one of ffcv's built-in fields")
        try:
            self.names = [decode_null_terminated_string(n) for n in desc["name"]]
        except UnicodeDecodeError:
            self.fail("a field name is not ASCII (field descriptors overwritten)")
        self.type_ids = [int(t) for t in desc["type_id"]]
        self.handlers = get_handlers(desc)
        self.metadata_type = get_metadata_type(self.handlers)
        self.metadata_start = desc_end
        self.metadata_end = desc_end + self.num_samples * self.metadata_type.itemsize
        if self.metadata_end > self.size:
            self.fail(f"the sample table of {self.num_samples} samples ends at byte {self.metadata_end}, "
                      f"past the end of the file ({self.size} bytes): truncated?")
        if not self.metadata_end <= self.table_ptr <= self.size:
            self.fail(f"allocation table pointer {self.table_ptr} is outside [{self.metadata_end}, "
                      f"{self.size}] (header overwritten, or the file is truncated)")
        self.metadata = np.fromfile(path, dtype=self.metadata_type, count=self.num_samples,
                                    offset=self.metadata_start)

    def column(self, k: int) -> np.ndarray:
        """Field ``k``'s column of the sample table (ffcv names them f0, f1, ...)."""
        return self.metadata[self.metadata_type.names[k]]

    def fail(self, what: str):
        raise ConfigError(f"{self.path}: damaged .beton: {what}")


def verify_beton(path: str | Path) -> int:
    """Check a .beton's structure against ffcv 1.0.2's format; return its number of samples.

    Checks the header, the field descriptors, the sample table's size, the allocation table (one
    entry per sample and allocating field, every (ptr, size) inside the data pages, none crossing
    a page, the table filling the file's end exactly), that every image's pointer is its own
    allocation with a plausible size, and the JPEG start/end markers (every JPEG in files of up to
    65,536 JPEGs, else the first and last one of every page). Nothing is decoded: raw pixels that
    were zeroed cannot be told from black images; ``inspect --deep`` decodes every JPEG.
    Raises ``ConfigError`` with one line naming the file and the damage.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.types import ALLOC_TABLE_TYPE

    lay = _Layout(Path(path))
    fail, n, page = lay.fail, lay.num_samples, lay.page_size
    table_bytes = lay.size - lay.table_ptr
    if table_bytes % ALLOC_TABLE_TYPE.itemsize:
        fail(f"the allocation table ({table_bytes} bytes from byte {lay.table_ptr}) is not a whole "
             f"number of {ALLOC_TABLE_TYPE.itemsize}-byte entries: truncated or appended to")
    table = np.fromfile(lay.path, dtype=ALLOC_TABLE_TYPE, offset=lay.table_ptr)
    per_sample = sum(t in _ALLOCATING_TYPES for t in lay.type_ids)
    if len(table) != n * per_sample:
        fail(f"{len(table)} allocation entries for {n} samples x {per_sample} allocating field(s): "
             "truncated or overwritten")
    if not len(table):
        return n
    sid, ptr, size = (table[k].astype(np.int64) for k in ("sample_id", "ptr", "size"))
    if (sid >= n).any() or (np.bincount(sid.clip(0, n), minlength=n + 1)[:n] != per_sample).any():
        fail("the allocation table does not list each sample's data exactly once (overwritten)")
    if lay.table_ptr % page:
        fail(f"the allocation table starts at byte {lay.table_ptr}, not at a page boundary "
             f"({page} B pages): data pages truncated or overwritten")
    outside = (ptr < lay.metadata_end) | (ptr + size > lay.table_ptr) | (size < 0)
    if outside.any():
        i = int(np.argmax(outside))
        fail(f"sample {sid[i]}'s data (byte {ptr[i]}, {size[i]} bytes) lies outside the data pages "
             f"[{lay.metadata_end}, {lay.table_ptr})")
    crossing = (size > 0) & (ptr // page != (ptr + size - 1) // page)
    if crossing.any():
        i = int(np.argmax(crossing))
        fail(f"sample {sid[i]}'s data (byte {ptr[i]}, {size[i]} bytes) crosses a page boundary")

    order = np.argsort(ptr)
    ptr_sorted, sid_sorted, size_sorted = ptr[order], sid[order], size[order]
    jpeg, raw = IMAGE_MODES["jpg"], IMAGE_MODES["raw"]
    for k, t in enumerate(lay.type_ids):
        if t != 2:  # RGBImageField: (mode, width, height, data_ptr)
            continue
        col = lay.column(k)
        data_ptr = col["data_ptr"].astype(np.int64)
        at = np.searchsorted(ptr_sorted, data_ptr).clip(0, len(ptr_sorted) - 1)
        own = (ptr_sorted[at] == data_ptr) & (sid_sorted[at] == np.arange(n))
        if not own.all():
            fail(f"image {int(np.argmin(own))}'s pointer is not its own allocation (sample table overwritten)")
        mode, w, h = col["mode"], col["width"].astype(np.int64), col["height"].astype(np.int64)
        nbytes = size_sorted[at]
        bad = ((mode != jpeg) & (mode != raw)) | (w < 1) | (h < 1) | \
              ((mode == raw) & (nbytes != w * h * 3)) | ((mode == jpeg) & (nbytes < 4))
        if bad.any():
            i = int(np.argmax(bad))
            fail(f"image {i} has mode {mode[i]}, {w[i]}x{h[i]} px and {nbytes[i]} bytes of data: "
                 "sample table overwritten")
        _check_jpeg_markers(lay, np.flatnonzero(mode == jpeg), data_ptr, nbytes)
    return n


def _check_jpeg_markers(lay: _Layout, jpegs: np.ndarray, ptr: np.ndarray, nbytes: np.ndarray) -> None:
    """Every JPEG (or the first and last of each page in big files) starts FFD8 and ends FFD9."""
    if len(jpegs) > _PROBE_ALL_JPEGS:
        pages = ptr[jpegs] // lay.page_size
        order = np.lexsort((ptr[jpegs], pages))
        first = np.r_[True, pages[order][1:] != pages[order][:-1]]
        last = np.r_[pages[order][1:] != pages[order][:-1], True]
        jpegs = jpegs[order][first | last]
    fd = os.open(lay.path, os.O_RDONLY)
    try:
        for i in jpegs:
            p, s = int(ptr[i]), int(nbytes[i])
            if os.pread(fd, 2, p) != b"\xff\xd8" or os.pread(fd, 2, p + s - 2) != b"\xff\xd9":
                lay.fail(f"image {i}'s JPEG data (byte {p}, {s} bytes) lacks its start/end markers "
                         "(overwritten)")
    finally:
        os.close(fd)


def label_range(path: str | Path) -> tuple[int, int, int]:
    """``(min_label, max_label, num_samples)`` of the first IntField, read from the .beton's own
    sample table (ffcv stores IntField values there), so a missing ``.classes.json`` cannot hide a
    label beyond ``model.num_classes``. (0, -1, n) when the file has no samples; raises
    ``ConfigError`` when it has no IntField or its header is damaged."""
    lay = _Layout(Path(path))
    ints = [k for k, t in enumerate(lay.type_ids) if t == 1]
    if not ints:
        lay.fail("no integer (label) field")  # why fail(): names the file; not strictly damage
    labels = lay.column(ints[0])
    if not len(labels):
        return 0, -1, 0
    return int(labels.min()), int(labels.max()), lay.num_samples


def deep_check(path: str | Path, progress: bool = False) -> list[int]:
    """Decode every image of a structurally sound .beton with ffcv's own JPEG decoder
    (libjpeg-turbo, as training does); return the indices that fail. Raw images have nothing to
    decode beyond ``verify_beton``'s size check. Raises ``ConfigError`` on structural damage."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.types import ALLOC_TABLE_TYPE

    verify_beton(path)
    lay = _Layout(Path(path))
    table = np.fromfile(lay.path, dtype=ALLOC_TABLE_TYPE, offset=lay.table_ptr)
    size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    bad = []
    fd = os.open(lay.path, os.O_RDONLY)
    try:
        for k, t in enumerate(lay.type_ids):
            if t != 2:
                continue
            col = lay.column(k)
            for i in np.flatnonzero(col["mode"] == IMAGE_MODES["jpg"]):
                rec = col[i]
                data = np.frombuffer(os.pread(fd, size_of[int(rec["data_ptr"])], int(rec["data_ptr"])),
                                     dtype=np.uint8)
                h, w = int(rec["height"]), int(rec["width"])
                out = np.empty((h, w, 3), dtype=np.uint8)
                if imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False) != 0:  # 0 = decoded
                    bad.append(int(i))
                if progress and i % 10000 == 0:
                    print(f"inspect --deep: {i}/{lay.num_samples}", file=sys.stderr, flush=True)
    finally:
        os.close(fd)
    return sorted(set(bad))


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
    if not path.is_file():
        print(f"error: file not found: {path}", file=sys.stderr)
        return 2
    try:
        verify_beton(path)
        bad = deep_check(path, progress=True) if "--deep" in argv else None
        summary = summarize(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 — ffcv raises assorted types on foreign files
        print(f"error: {path}: not a readable ffcv .beton ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    if bad is not None:
        summary["undecodable"] = bad
    print(json.dumps(summary, indent=2) if "--json" in argv else _format(summary))
    if bad:
        shown = ", ".join(map(str, bad[:50])) + (f", ... ({len(bad)} in all)" if len(bad) > 50 else "")
        print(f"error: {path}: {len(bad)} image(s) fail to decode: {shown}", file=sys.stderr)
        return 1
    return 0
