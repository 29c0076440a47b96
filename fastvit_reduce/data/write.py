"""``fastvit-reduce write``: one ImageFolder split → an FFCV ``.beton`` that survives real ImageNet.

    fastvit-reduce write --cfg.data_dir=/data/imagenet --cfg.split=train \\
        --cfg.write_path=/data/ffcv/train_256_0.50_90.beton --cfg.max_resolution=256 \\
        --cfg.write_mode=proportion --cfg.compress_probability=0.5 --cfg.jpeg_quality=90
    (scripts/write_imagenet.sh runs it for both splits)

Output fields: ``image`` (ffcv RGBImageField) and ``label`` (IntField, the index of the sorted
class-folder name: torchvision ImageFolder's indices, except that hidden folders are not classes).
Beside the output: ``<write_path>.classes.json`` (class names, index = label) and
``<write_path>.report.json`` (written, skipped [{path, error}], links_not_followed, classes,
seconds, images_per_s, settings).

How it stays safe on 1.28 M images:

* Every file is decoded once, in ffcv's writer workers, inside a ``try``: PIL decodes (JPEGs
  already shrunk by libjpeg's DCT scaling via ``Image.draft``, so no full-size copy of a large
  JPEG is ever held), applies the EXIF orientation, converts any mode (CMYK, L, P, RGBA, 16-bit)
  to RGB uint8 and resizes the long side to ``max_resolution``. A file that fails is recorded
  and its slot left empty; after the workers finish, the empty slots are compacted out of the
  sample table, so the file holds exactly the decodable images, in ImageFolder order.
* ffcv 1.0.2's own worker loop hangs forever when anything raises in a worker (a bad sample, a
  full disk, an OOM kill). ``_SafeWriter`` below replaces that loop and the final step; ffcv
  still does the header, page allocation, field encoding and file format.
* The file is written as ``<write_path>.partial-<pid>``, fsynced and renamed over
  ``write_path`` only on success. Ctrl-C / SIGTERM / an error remove the partial file; after a
  SIGKILL it stays behind under the ``.partial-`` name (never a valid-looking ``.beton``) and
  the next write to the same path deletes it. Workers die with the main process (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fastvit_reduce.config import ConfigError, dump_json, load_config, resolved
from fastvit_reduce.data.folders import (IGNORED_SHOWN, IMG_EXTENSIONS, InputError, Split,  # noqa: F401
                                         WriteError, scan_split)
from fastvit_reduce.settings import WRITE_SECTIONS

# ----------------------------------------------------------------------------- decoding
def fit_size(width: int, height: int, max_res: int) -> tuple[int, int]:
    """(w, h) with the long side shrunk to ``max_res`` (never grown), each side >= 1 px.

    why: ffcv's own resizer truncates, so a 2x300 image at max_res 64 would get width 0.
    """
    if max(width, height) <= max_res:
        return width, height
    scale = max_res / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# EXIF orientation (tag 0x0112) → the PIL transpose that makes the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 — broken EXIF is common and must not cost us the image
        return 1


def _to_rgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB from any PIL mode."""
    if im.mode.startswith("I") or im.mode == "F":
        # why: PIL's convert('RGB') clips 16-bit grey at 255 (a white image); scale instead
        a = np.asarray(im)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a.astype(np.uint32) >> 8  # 0..65535 → 0..255 (PIL keeps the high byte of 16-bit RGB too)
        grey = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        # CMYK, L, 1, P, LA, RGBA, PA, YCbCr ...: alpha is dropped, as torchvision's pil_loader does
        im = im.convert("RGB")
    return np.asarray(im)


def load_rgb(path: str, max_res: int) -> np.ndarray:
    """Decode one image file as upright HxWx3 uint8 RGB with its long side <= ``max_res``.

    Raises on junk (truncated, empty, not an image). JPEGs are decoded at a reduced scale when
    they are >= 2x larger than needed, so large photos never exist at full size in memory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's EXIF / palette-transparency chatter, once per file
        with Image.open(path) as im:
            width, height = im.size
            target = fit_size(width, height, max_res)
            if im.format == "JPEG" and target != (width, height):
                im.draft(im.mode, target)  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
            im.load()
            orientation = _orientation(im)
            if orientation in _ORIENTATION:
                im = im.transpose(_ORIENTATION[orientation])
                if orientation >= 5:  # 90° turns swap the sides
                    target = target[::-1]
            rgb = _to_rgb(im)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"decoded to an unusable array {rgb.dtype} {rgb.shape}")
    if (rgb.shape[1], rgb.shape[0]) != target:
        rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)  # the filter ffcv itself uses
    return np.ascontiguousarray(rgb)


class ImageFolderSource:
    """Indexable samples for ffcv's writer; ``source[i] -> (image, label, error)``.

    Never raises (ffcv 1.0.2 hangs forever if it does): a file that cannot be decoded gives
    ``(None, label, "ErrorType: message")``.
    """

    def __init__(self, split: Split, max_res: int, max_aspect: float = 0.0):
        self.split, self.max_res, self.max_aspect = split, max_res, max_aspect

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, i: int):
        label = int(self.split.labels[i])
        try:
            rgb = load_rgb(self.split.path(i), self.max_res)
        except Exception as e:  # noqa: BLE001 — any decode failure is this file's problem only
            return None, label, f"{type(e).__name__}: {e}".strip()
        h, w = rgb.shape[:2]
        if self.max_aspect and max(h, w) > self.max_aspect * min(h, w):
            # why: such a strip trains as a smear, and its centre crop is under a pixel wide
            return None, label, (f"degenerate aspect ratio: stored {w}x{h} px ({max(h, w) / min(h, w):.0f}:1; "
                                 f"cfg.max_aspect={self.max_aspect:g})")
        return rgb, label, None


# ----------------------------------------------------------------------------- the ffcv writer
def _die_with_parent(parent_pid: int) -> None:
    """Make this worker get SIGKILL when the main process dies (Linux), so none is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker(writer, source, allocator, next_chunk, chunk_size, done, skipped, on_error,
            results, errors, parent_pid, seed_per_sample):
    """One writer process: take chunks of indices, decode, encode into ffcv pages.

    Replaces ffcv.writer.worker_job_indexed_dataset (why: there an exception kills the worker and
    the main process waits for it forever).
    """
    from ffcv.types import ALLOC_TABLE_TYPE
    from ffcv.writer import handle_sample

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is handled by the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    cv2.setNumThreads(1)  # one process per core already
    n, failures = len(source), []
    try:
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        names = writer.metadata_type.names
        with allocator:  # ffcv: on exit, flushes this worker's last page into the file
            while True:
                with next_chunk.get_lock():
                    start = next_chunk.value
                    next_chunk.value = start + chunk_size
                if start >= n:
                    break
                for i in range(start, min(start + chunk_size, n)):
                    image, label, error = source[i]
                    if error is None:
                        if seed_per_sample:  # why: write_mode=proportion picks JPEG-vs-raw with
                            np.random.seed(i)  # np.random; per-index seeds make that reproducible
                        try:
                            handle_sample((image, label), i, names, metadata, allocator, writer.fields)
                        except OSError:
                            raise  # writing a full page failed (disk full ...): fatal, not this image's fault
                        except Exception as e:  # noqa: BLE001 — ffcv could not encode this one
                            error = f"while encoding: {type(e).__name__}: {e}"
                    if error is not None:
                        failures.append((i, error))
                        with skipped.get_lock():
                            skipped.value += 1
                        if on_error == "raise":
                            errors.put(("sample", i, error))
                    with done.get_lock():
                        done.value += 1
        results.put((np.array(allocator.allocations, dtype=ALLOC_TABLE_TYPE), failures))
    except BaseException as e:  # noqa: BLE001 — report anything (disk full, ...) and exit
        errors.put(("fatal", None, f"{type(e).__name__}: {e}"))
        errors.close()
        errors.join_thread()
        os._exit(1)


class _SafeWriter:
    """ffcv's DatasetWriter with our worker loop and a compacting finish (see module doc)."""

    def __init__(self, path: str, fields: dict, page_size: int, num_workers: int, target: Path):
        from ffcv.writer import DatasetWriter
        self.ffcv = DatasetWriter(path, fields, page_size=page_size, num_workers=num_workers)
        self.target = target  # the final name, for messages

    def write(self, source: ImageFolderSource, chunk_size: int, on_error: str,
              seed_per_sample: bool, desc: str) -> list[tuple[int, str]]:
        """Write every sample of ``source``; return the sorted (index, error) of those left out."""
        from ffcv.memory_allocator import MemoryAllocator
        from tqdm import tqdm

        w, n = self.ffcv, len(source)
        w.num_samples = n
        w.prepare()  # ffcv: header + field descriptors into the file, metadata table in /dev/shm
        ctx = mp.get_context("fork")  # ffcv's allocator and metadata table are shared by forking
        procs, progress = [], None
        try:
            allocator = MemoryAllocator(w.fname, w.data_region_start, w.page_size)
            next_chunk, done, skipped = ctx.Value("Q", 0), ctx.Value("Q", 0), ctx.Value("Q", 0)
            results, errors = ctx.Queue(), ctx.Queue()
            num_workers = max(1, min(w.num_workers, -(-n // chunk_size)))
            args = (w, source, allocator, next_chunk, chunk_size, done, skipped, on_error,
                    results, errors, os.getpid(), seed_per_sample)
            procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(num_workers)]
            for p in procs:
                p.start()
            progress = tqdm(total=n, desc=desc, unit="img", smoothing=0.05, dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30)
            gathered = []
            while len(gathered) < num_workers:
                try:
                    gathered.append(results.get(timeout=0.2))
                except queue.Empty:
                    pass
                self._check(procs, errors, source, f"{self.target} failed after {done.value} of "
                            f"{n} images ({skipped.value} skipped)")
                progress.update(done.value - progress.n)
                progress.set_postfix(skipped=skipped.value, refresh=False)
            for p in procs:
                p.join()
            allocations = np.concatenate([a for a, _ in gathered])
            failures = sorted(f for _, fs in gathered for f in fs)
            if done.value != n or len(failures) != skipped.value:
                raise WriteError(f"internal error: {done.value} of {n} images processed, "
                                 f"{len(failures)} failures reported of {skipped.value}")
            self._finish(allocations, failures)
            return failures
        finally:
            if progress is not None:
                progress.close()
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                if p.pid is not None:
                    p.join()
            w.metadata_sm.close()
            w.metadata_sm.unlink()

    @staticmethod
    def _check(procs, errors, source: ImageFolderSource, failed: str) -> None:
        """Raise ``WriteError`` if a worker reported a fatal error / a bad file (on_error=raise),
        or died without a word (SIGKILL by the OOM killer, SIGBUS when /dev/shm is full)."""
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        try:
            kind, i, message = errors.get_nowait()
        except queue.Empty:
            kind = None
        if kind == "sample":
            raise WriteError(f"cannot decode {source.split.path(i)}: {message} "
                             "(stopped because on_error=raise; --cfg.on_error=skip skips such files "
                             "and lists them in the report)")
        if kind == "fatal":
            hint = (" — is the disk full?" if any(s in message for s in
                    (os.strerror(errno.ENOSPC), os.strerror(errno.EFBIG), os.strerror(errno.EDQUOT)))
                    else "")
            raise WriteError(f"writing {failed}: {message}{hint}")
        if dead:
            code = dead[0].exitcode
            hint = {-signal.SIGKILL: " (killed: out of memory?)",
                    -signal.SIGBUS: " (SIGBUS: /dev/shm full? in Docker use --ipc=host or --shm-size)"}
            raise WriteError(f"writing {failed}: a writer process died with exit code "
                             f"{code}{hint.get(code, '')}")

    def _finish(self, allocations: np.ndarray, failures: list[tuple[int, str]]) -> None:
        """Write the sample table without the failed slots, the allocation table and the header.

        Replaces ffcv's DatasetWriter.finalize (why: it would keep empty slots for failed files).
        """
        w = self.ffcv
        keep = np.ones(w.num_samples, dtype=bool)
        keep[[i for i, _ in failures]] = False
        new_id = np.cumsum(keep) - 1  # old sample index → index in the compacted file
        shared = np.frombuffer(w.metadata_sm.buf, dtype=w.metadata_type)
        metadata = shared[keep]       # a copy, so the shared buffer can be released
        del shared
        # a sample that failed while encoding may have left allocations: drop them too
        allocations = allocations[keep[allocations["sample_id"].astype(np.int64)]]
        allocations["sample_id"] = new_id[allocations["sample_id"].astype(np.int64)]
        with open(w.fname, "r+b") as fp:
            fp.seek(w.metadata_start)
            fp.write(metadata.tobytes())  # the rest of the old table's space stays as padding
            table_ptr = fp.seek(0, os.SEEK_END)
            fp.write(allocations.tobytes())
            w.header["num_samples"] = int(keep.sum())
            w.header["alloc_table_ptr"] = table_ptr
            fp.seek(0)
            fp.write(w.header.tobytes())
            fp.flush()
            os.fsync(fp.fileno())  # the data is on disk before the rename makes it visible


# ----------------------------------------------------------------------------- the command
def _page_size(max_res: int) -> int:
    """ffcv page size (a power of two) that holds the largest possible encoded image."""
    from ffcv.writer import MIN_PAGE_SIZE
    need = 2 * 3 * max_res * max_res  # why 2x raw: a JPEG of noise at quality 100 can exceed raw
    return max(4 * MIN_PAGE_SIZE, 1 << (need - 1).bit_length())  # 4 * 2 MiB = ffcv's default


def _remove_stale_partials(target: Path) -> None:
    """Delete ``target.partial-<pid>`` files left by killed writes; refuse if one is still alive."""
    for old in target.parent.glob(target.name + ".partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                print(f"removing {old} (left by an interrupted write)", file=sys.stderr)
                old.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass
            if int(pid) != os.getpid():
                raise InputError(f"another write to {target} is running (pid {pid}, file {old})")


def write_split(data_dir: str, split: str, write_path: str, *, max_resolution: int = 256,
                write_mode: str = "proportion", compress_probability: float = 0.5,
                smart_threshold: int = 224 * 224 * 3, jpeg_quality: int = 90, max_aspect: float = 20.0,
                num_workers: int = 0, chunk_size: int = 100, subset: int = -1,
                on_error: str = "skip", settings: dict | None = None) -> dict:
    """Write ``data_dir/split`` to ``write_path`` (+ .classes.json, .report.json); return the report.

    Raises ``WriteError`` (nothing written, any previous ``write_path`` untouched) on bad input,
    on a bad file under ``on_error='raise'``, when no image decodes, or when writing fails.
    """
    import fastvit_reduce.data.ffcv_patch  # noqa: F401 — before any ffcv module
    from ffcv.fields import IntField, RGBImageField

    if not write_path:
        raise InputError("no output: set --cfg.write_path (e.g. /data/ffcv/train_256_0.50_90.beton)")
    target = Path(write_path).absolute()
    if not target.parent.is_dir():
        raise InputError(f"output folder not found: {target.parent}")
    if target.is_dir():
        raise InputError(f"write_path is a folder: {target}")
    data = scan_split(data_dir, split, subset)
    _remove_stale_partials(target)
    num_workers = num_workers or len(os.sched_getaffinity(0))
    print(f"{split}: {len(data.files)} images in {len(data.classes)} classes under {data.root} "
          f"({data.ignored} other files ignored{_examples(data)}); {shutil.disk_usage(target.parent).free / 1e9:.1f} GB "
          f"free at {target.parent}; {num_workers} workers", file=sys.stderr)
    if data.repeats:
        print(f"{split}: {len(data.repeats)} symbolic link(s) lead to folders or files listed already (a loop, "
              f"or a second way in); each was listed once: {', '.join(data.repeats[:5])}"
              f"{' ...' if len(data.repeats) > 5 else ''} (all in the report)", file=sys.stderr)

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    source = ImageFolderSource(data, max_resolution, max_aspect)
    start = time.perf_counter()
    try:
        writer = _SafeWriter(str(partial), fields, _page_size(max_resolution), num_workers, target)
        failures = writer.write(source, chunk_size, on_error, write_mode == "proportion", desc=split)
        seconds = time.perf_counter() - start
        written = len(source) - len(failures)
        if written == 0:
            raise WriteError(f"none of the {len(source)} images in {data.root} could be decoded "
                             f"(first error: {data.path(failures[0][0])}: {failures[0][1]})")
        _refuse_lost_classes(data, failures)
        report = {
            "output": str(target), "split": split, "source": str(data.root),
            "written": written,
            "skipped": [{"path": data.path(i), "error": err} for i, err in failures],
            "files_seen": len(source), "ignored_files": data.ignored,
            "ignored_examples": data.ignored_examples, "links_not_followed": data.repeats,
            "classes": data.classes, "num_classes": len(data.classes),
            "seconds": round(seconds, 3), "images_per_s": round(len(source) / seconds, 1),
            "bytes": partial.stat().st_size,
            "settings": settings or dict(max_resolution=max_resolution, write_mode=write_mode,
                                         compress_probability=compress_probability,
                                         smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                         max_aspect=max_aspect, num_workers=num_workers, chunk_size=chunk_size,
                                         subset=subset, on_error=on_error),
            "versions": _versions(),
        }
        # the side files first: after the rename nothing is left that could fail half-way
        dump_json(data.classes, f"{target}.classes.json")
        dump_json(report, f"{target}.report.json")
        os.replace(partial, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except OSError as e:
        hint = " — is the disk full?" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise WriteError(f"writing {target} failed: {e}{hint}") from None
    finally:
        partial.unlink(missing_ok=True)
    return report


def _examples(data: Split, shown: int = 5) -> str:
    """``': a.txt, b/.DS_Store, ...'`` for the console (the report lists up to IGNORED_SHOWN)."""
    if not data.ignored_examples:
        return ""
    more = ", ..." if data.ignored > shown else ""
    return ": " + ", ".join(data.ignored_examples[:shown]) + more


def _refuse_lost_classes(data: Split, failures: list[tuple[int, str]]) -> None:
    """Raise ``WriteError`` when every file of some class failed to decode.

    why an error, not a note in the report: an empty class folder is already refused before any
    work; a class whose files are all unreadable is the same broken input found later, and a
    .beton without it would train a head whose class never appears (and the val split's counts
    would no longer match) while the write exits 0.
    """
    kept = np.ones(len(data.labels), dtype=bool)
    kept[[i for i, _ in failures]] = False
    counts = np.bincount(data.labels[kept], minlength=len(data.classes))
    lost = np.flatnonzero(counts == 0)
    if len(lost):
        first = next(i for i, _ in failures if data.labels[i] == lost[0])
        err = dict(failures)[first]
        names = ", ".join(data.classes[c] for c in lost[:10]) + (" ..." if len(lost) > 10 else "")
        raise WriteError(f"{len(lost)} class(es) lost every image to decode errors: {names} "
                         f"(e.g. {data.path(first)}: {err}); nothing written")


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    return {"ffcv": version("ffcv"), "pillow": version("pillow"), "opencv": cv2.__version__,
            "python": sys.version.split()[0]}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # why: SIGTERM then cleans up like Ctrl-C (removes the partial file)


def main(argv: list[str]) -> int:
    """``fastvit-reduce write --cfg.key=value ...``; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nKeys (--cfg.KEY=VALUE):")
        from fastvit_reduce.config import declared_keys
        for key, p in declared_keys(WRITE_SECTIONS).items():
            print(f"  --{key:<26} {p.desc} (default {p.default!r})")
        return 0
    try:
        load_config(argv, sections=WRITE_SECTIONS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {k.split(".", 1)[1]: v for k, v in resolved(WRITE_SECTIONS).items()}
    args = {k: v for k, v in settings.items() if k not in ("data_dir", "split", "write_path")}
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = write_split(settings["data_dir"], settings["split"], settings["write_path"],
                             settings=settings, **args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written; {settings['write_path']} is unchanged", file=sys.stderr)
        return 130
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    skipped = len(report["skipped"])
    print(f"wrote {report['written']} images of {report['num_classes']} classes to {report['output']} "
          f"({report['bytes'] / 1e9:.2f} GB) in {report['seconds']:.1f} s, "
          f"{report['images_per_s']:.1f} img/s; skipped {skipped}"
          f"{' (listed in the report)' if skipped else ''}; report: {report['output']}.report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
