""".beton files without ffcv: their format, a structure check, and the facts a run needs from them.

Everything here reads ffcv 1.0.2's file format with numpy alone (no torch, no ffcv import), so the
trainer's checks, ``--dry-run``, ``inspect`` and ``sweep`` stay fast. The format
(ffcv/types.py, writer.py, memory_allocator.py): header | field descriptors | sample table
("metadata", one record per sample) | zero padding to a page | data pages, each written in full
(page_size bytes), no allocation crossing a page | allocation table (sample_id, ptr, size) to the
end of the file; the header's alloc_table_ptr points at it. tests/test_betons.py checks these
dtypes against ffcv's own.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fastvit_reduce.config import ConfigError, file_problem, read_text

# ffcv 1.0.2's dtypes (ffcv/types.py; little-endian whatever the machine)
FORMAT_VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_PTR_SIZE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# type id -> (ffcv field class, its column in the sample table)
FIELD_TYPES = {
    0: ("FloatField", np.dtype("<f8")),
    1: ("IntField", np.dtype("<i8")),
    2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
    3: ("BytesField", _PTR_SIZE),
    4: ("NDArrayField", np.dtype("<u8")),
    5: ("JSONField", _PTR_SIZE),
    6: ("TorchTensorField", np.dtype("<u8")),
}
IMAGE_MODES = {"jpg": 0, "raw": 1}  # RGBImageField's mode column
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 1 << 21, 1 << 32  # ffcv/writer.py
# the fields the trainer reads, in the order the writer stores them (the loaders yield this order)
TRAIN_FIELDS = [("image", "RGBImageField"), ("label", "IntField")]
_ALLOCATING_TYPES = {2, 3, 4, 5, 6}  # type ids whose encode() mallocs once per sample (rgb, bytes, ...)
_PROBE_ALL_JPEGS = 65536             # up to this many JPEGs, check every one's SOI/EOI markers


class _Layout:
    """Header, field descriptors and sample table of a .beton, checked against the file size."""

    def __init__(self, path: Path):
        self.path, self.size = path, path.stat().st_size
        if self.size < HEADER.itemsize:
            self.fail(f"{self.size} bytes, shorter than ffcv's {HEADER.itemsize}-byte header")
        header = np.fromfile(path, dtype=HEADER, count=1)[0]
        if header["version"] != FORMAT_VERSION:
            self.fail(f"format version {header['version']}, ffcv 1.0.2 reads version {FORMAT_VERSION} "
                      "(not a .beton, or its header is overwritten)")
        self.page_size, self.num_samples = int(header["page_size"]), int(header["num_samples"])
        self.num_fields, self.table_ptr = int(header["num_fields"]), int(header["alloc_table_ptr"])
        if not (MIN_PAGE_SIZE <= self.page_size < MAX_PAGE_SIZE) or self.page_size & (self.page_size - 1):
            self.fail(f"page size {self.page_size} is not a power of two in [2 MiB, 4 GiB)")
        if not 1 <= self.num_fields <= 64:
            self.fail(f"header says {self.num_fields} fields")
        desc_end = HEADER.itemsize + self.num_fields * FIELD_DESC.itemsize
        if desc_end > self.size:
            self.fail("the file ends inside the field descriptors")
        desc = np.fromfile(path, dtype=FIELD_DESC, count=self.num_fields, offset=HEADER.itemsize)
        bad = [int(t) for t in desc["type_id"] if int(t) not in FIELD_TYPES]
        if bad:
            self.fail(f"field type id {bad[0]} is not one of ffcv's built-in fields")
        try:
            self.names = [n.tobytes().decode("ascii").split("\x00")[0] for n in desc["name"]]
        except UnicodeDecodeError:
            self.fail("a field name is not ASCII (field descriptors overwritten)")
        self.type_ids = [int(t) for t in desc["type_id"]]
        self.metadata_type = np.dtype([("", FIELD_TYPES[t][1]) for t in self.type_ids], align=True)
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
    allocation with a plausible size, and the JPEG start/end markers and frame size against the
    sample table (every JPEG in files of up to 65,536 JPEGs, else the first and last one of every
    page). Nothing is decoded: raw pixels that were zeroed cannot be told from black images;
    ``inspect`` decodes a sample of the JPEGs, ``inspect --deep`` all of them.
    Raises ``ConfigError`` with one line naming the file and the damage.
    """
    lay = _Layout(Path(path))
    fail, n, page = lay.fail, lay.num_samples, lay.page_size
    table_bytes = lay.size - lay.table_ptr
    if table_bytes % ALLOC_TABLE.itemsize:
        fail(f"the allocation table ({table_bytes} bytes from byte {lay.table_ptr}) is not a whole "
             f"number of {ALLOC_TABLE.itemsize}-byte entries: truncated or appended to")
    table = np.fromfile(lay.path, dtype=ALLOC_TABLE, offset=lay.table_ptr)
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
        _check_jpeg_markers(lay, np.flatnonzero(mode == jpeg), data_ptr, nbytes, w, h)
    return n


def _check_jpeg_markers(lay: _Layout, jpegs: np.ndarray, ptr: np.ndarray, nbytes: np.ndarray,
                        width: np.ndarray, height: np.ndarray) -> None:
    """Every JPEG (or the first and last of each page in big files) starts FFD8, ends FFD9, and its
    frame header gives the size the sample table says: libjpeg-turbo scales a larger JPEG down to
    fit, or decodes a smaller one into a corner, over whatever the buffer held, without an error."""
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
            head = os.pread(fd, min(s, 4096), p)
            if head[:2] != b"\xff\xd8" or os.pread(fd, 2, p + s - 2) != b"\xff\xd9":
                lay.fail(f"image {i}'s JPEG data (byte {p}, {s} bytes) lacks its start/end markers "
                         "(overwritten)")
            size = jpeg_size(head)
            if size is None and len(head) < s:  # large metadata segments before the frame header
                size = jpeg_size(os.pread(fd, s, p))
            if size != (int(width[i]), int(height[i])):
                found = "no frame header" if size is None else f"a {size[0]}x{size[1]} px frame"
                lay.fail(f"image {i}'s JPEG data holds {found}, but the sample table says "
                         f"{width[i]}x{height[i]} px (overwritten)")
    finally:
        os.close(fd)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header (SOF0..SOF15), following the marker segments
    from the start; None when ``data`` ends first or is not a JPEG stream."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
            if pos + 9 > len(data):
                return None
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


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


def check_beton(path: str | Path) -> int:
    """Number of samples in ``path``; ``ConfigError`` in one line unless it is a .beton with the
    fields ``image`` (RGBImageField) and ``label`` (IntField), in that order, and at least one sample."""
    if not str(path):
        raise ConfigError("no dataset given (empty .beton path)")
    path = Path(path)
    problem = file_problem(path, "dataset")
    if problem:
        raise ConfigError(problem)
    try:
        lay = _Layout(path)
    except OSError as e:
        raise ConfigError(f"cannot read dataset {path}: {e.strerror or e}") from None
    found = [(name, FIELD_TYPES[t][0]) for name, t in zip(lay.names, lay.type_ids)]
    if found != TRAIN_FIELDS:
        raise ConfigError(f"{path}: expected the fields " + ", ".join(f"{n} ({t})" for n, t in TRAIN_FIELDS)
                          + " in that order (as fastvit-reduce write stores them), found "
                          + (", ".join(f"{n} ({t})" for n, t in found) or "none"))
    if lay.num_samples == 0:
        raise ConfigError(f"{path}: holds no samples (an empty .beton)")
    return lay.num_samples


def check_datasets(train_path: str | Path, val_path: str | Path) -> None:
    """Check both files, and that their ``.classes.json`` lists match when both exist."""
    check_beton(train_path)
    check_beton(val_path)
    train_classes, val_classes = read_classes(train_path), read_classes(val_path)
    if train_classes is None or val_classes is None or train_classes == val_classes:
        return
    diff = sorted(set(train_classes) ^ set(val_classes))[:5]
    detail = f"e.g. {diff} in only one of them" if diff else "same names, different order"
    raise ConfigError(f"class lists differ between train {train_path} ({len(train_classes)} classes) "
                      f"and val {val_path} ({len(val_classes)} classes): {detail}")


def read_classes(beton_path: str | Path) -> list[str] | None:
    """Class names from ``<beton_path>.classes.json`` (written by the writer), or None if absent."""
    path = Path(f"{beton_path}.classes.json")
    if not path.is_file():
        return None
    try:
        classes = json.loads(read_text(path, "class list"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{path}: expected a JSON list of class names")
    return classes


def fingerprint(path: str | Path) -> dict:
    """What identifies a .beton's contents without reading its images: ``{"path", "bytes",
    "samples", "sha256"}``, the hash over the header, field descriptors and sample table (every
    label and every image's size and data pointer; 31 MB for ImageNet's train split)."""
    lay = _Layout(Path(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = lay.metadata_end
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return {"path": str(Path(path).absolute()), "bytes": lay.size, "samples": lay.num_samples,
            "sha256": digest.hexdigest()[:16]}


def data_fingerprints(cfg: dict) -> dict:
    """``{"train": fingerprint, "val": fingerprint or None}`` of a run's datasets (None for a path
    that is not a readable .beton: the checks before training name it)."""
    out = {}
    for split in ("train", "val"):
        path = cfg[f"data.{split}_dataset"]
        try:
            out[split] = fingerprint(path) if path and not file_problem(path, "dataset") else None
        except (OSError, ConfigError):
            out[split] = None
    return out


def stored_size(path: str) -> dict | None:
    """Median stored width/height/short side (px) of a .beton's images, from its metadata."""
    try:
        lay = _Layout(Path(path))
    except (OSError, ConfigError):  # a missing/odd file: the checks elsewhere name it
        return None
    images = [k for k, t in enumerate(lay.type_ids) if t == 2]
    if not images or not lay.num_samples:
        return None
    meta = lay.column(images[0])
    w, h = meta["width"].astype(np.float64), meta["height"].astype(np.float64)
    return {"median_width": float(np.median(w)), "median_height": float(np.median(h)),
            "median_short_side": float(np.median(np.minimum(w, h))),
            "median_long_side": float(np.median(np.maximum(w, h)))}
