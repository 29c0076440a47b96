"""The image files of one ImageFolder split, listed as torchvision's ImageFolder lists them, but
safe from symbolic links: every real folder is walked once and every real file counted once.

``scan_split`` is the first step of ``fastvit-reduce write`` (``data.write``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as torchvision does)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class WriteError(RuntimeError):
    """The write failed; the message says why and names the file. Nothing was written."""


class InputError(WriteError):
    """Bad input found before any work started (missing folder, empty class, ...)."""


# ----------------------------------------------------------------------------- the split on disk
@dataclass
class Split:
    """The image files of one split in ImageFolder order, with their labels."""

    root: Path              # <data_dir>/<split>, absolute
    classes: list[str]      # sorted class-folder names; index = label
    files: np.ndarray       # (N,) bytes, path relative to root (why: one numpy buffer is shared
                            # by forked workers; 1.28 M Python strings would be copied page by page)
    labels: np.ndarray      # (N,) int64
    ignored: int            # hidden and non-image files skipped while scanning
    ignored_examples: list[str] = field(default_factory=list)  # the first IGNORED_SHOWN, relative to root
    repeats: list[str] = field(default_factory=list)  # links to a folder or file listed already, not followed

    def path(self, i: int) -> str:
        return str(self.root / os.fsdecode(self.files[i]))


IGNORED_SHOWN = 50  # ignored files named in the report (the count covers all)


def _unlistable(e: OSError) -> None:
    """A folder we cannot list would silently drop its images (os.walk's default): an error."""
    raise InputError(f"cannot list {e.filename}: {e.strerror or e}")


def _walk(top: str, seen: set[str], repeats: list[str], root: Path) -> list[tuple[str, list[str], set[str]]]:
    """``(dirpath, file names, names of the files that are symbolic links)`` of every folder
    below ``top``, following links to folders as ``os.walk(followlinks=True)`` does, but entering
    each real folder once: a link to a folder in ``seen`` (a loop back up, or a second way into
    one folder) is noted in ``repeats`` (relative to ``root``) and not followed.

    Why not os.walk: it follows a loop ~40 levels deep, until the path is too long, listing
    every image once per level."""
    out, stack = [], [top]
    while stack:
        dirpath = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))  # real folders claim first
        except OSError as e:
            _unlistable(e)
        names, links, subdirs = [], [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if not is_dir:
                names.append(entry.name)
                if entry.is_symlink():
                    links.append(entry.name)
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                repeats.append(os.path.relpath(entry.path, root))
            else:
                seen.add(real)
                subdirs.append(entry.path)
        out.append((dirpath, names, set(links)))
        stack.extend(sorted(subdirs, reverse=True))
    return out


def scan_split(data_dir: str | Path, split: str, subset: int = -1) -> Split:
    """List ``data_dir/split/<class>/**/<image>`` like torchvision's ImageFolder (sorted walk,
    symlinks followed, same extensions); hidden files/folders and non-images are not samples.
    Unlike ImageFolder, each real folder is walked once and each real file listed once: links
    that would list one again (a loop, a link into another class) are kept in ``Split.repeats``.

    Raises ``InputError`` for a missing folder, no classes, a class without images, or a folder
    that cannot be listed.
    """
    if not str(data_dir):
        raise InputError("no input folder: set --cfg.data_dir (the folder holding train/ and val/)")
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise InputError(f"input folder not found: {data_dir}")
    root = data_dir / split
    if not root.is_dir():
        hint = (f" (it looks like the {split} folder itself: pass its parent)"
                if data_dir.name == split else "")
        raise InputError(f"no '{split}' folder in {data_dir}{hint}; expected "
                         f"{data_dir}/{split}/<class>/<image> (ImageFolder layout)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dangling = [e.name for e in entries if e.is_symlink() and not os.path.exists(e.path)]
    if dangling:  # why: most likely a class folder on an unmounted disk; skipping it shifts every label
        raise InputError(f"broken symlink(s) in {root}: {', '.join(dangling[:10])}")
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    ignored_files = [e.name for e in entries if not e.is_dir()]
    if not classes:
        loose = sum(1 for e in entries if e.name.lower().endswith(IMG_EXTENSIONS))
        detail = (f"; it holds {loose} images directly: sort them into class folders first "
                  "(ImageNet's val needs e.g. valprep.sh)" if loose else "")
        raise InputError(f"no class folders in {root}{detail}")

    files, labels, empty, ignored = [], [], [], len(ignored_files)
    examples = ignored_files[:IGNORED_SHOWN]
    repeats: list[str] = []
    seen = {os.path.realpath(root)}  # class folders are their own classes, whatever links point in
    for name in classes:
        real = os.path.realpath(root / name)
        if real in seen:  # a class folder that is a link to another class's folder
            repeats.append(name)
        seen.add(real)

    def ignore(dirpath: str, names: list[str]) -> None:
        nonlocal ignored
        ignored += len(names)
        room = IGNORED_SHOWN - len(examples)
        examples.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(names)[:max(0, room)])

    walks = [[] if name in repeats else sorted(_walk(str(root / name), seen, repeats, root)) for name in classes]
    # a file reached through a link counts once: not if its target is a listed file, nor twice
    regular: set[str] = set()
    if any(links for walk in walks for _, _, links in walk):
        for walk in walks:
            for dirpath, fnames, links in walk:
                real_dir = os.path.realpath(dirpath)
                regular.update(os.path.join(real_dir, f) for f in fnames if f not in links)
    for label, (name, walk) in enumerate(zip(classes, walks)):
        found = []
        # why sorted: the same file order as torchvision's make_dataset (sorted(os.walk(...))); the
        # walk is complete before the loop starts, so hidden sub-folders are dropped here, not pruned
        for dirpath, fnames, links in walk:
            if any(part.startswith(".") for part in Path(dirpath).relative_to(root / name).parts):
                ignore(dirpath, fnames)
                continue
            skipped = []
            for f in sorted(fnames):
                if f.startswith(".") or not f.lower().endswith(IMG_EXTENSIONS):
                    skipped.append(f)
                    continue
                path = os.path.join(dirpath, f)
                if f in links:
                    real = os.path.realpath(path)
                    if real in regular:
                        repeats.append(os.path.relpath(path, root))
                        continue
                    regular.add(real)
                found.append(os.fsencode(os.path.relpath(path, root)))
            ignore(dirpath, skipped)
        if subset > 0:
            found = found[:subset]
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        links = f" (links to folders listed already, not followed: {', '.join(repeats[:5])})" if repeats else ""
        raise InputError(f"{len(empty)} class folder(s) in {root} hold no image files: "
                         f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}{links}")
    return Split(root, classes, np.array(files), np.array(labels, dtype=np.int64), ignored, examples, repeats)


