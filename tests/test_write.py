"""fastvit_reduce.data.write, the ImageFolder → .beton writer (and scripts/write_imagenet.sh), on a generated folder holding every real-ImageNet quirk.

Each test image is a ramp (red grows left→right, green top→bottom, blue = 40 + 80·label), so a
missed EXIF rotation, a CMYK inversion, clipped 16-bit pixels or a swapped label all show up as a
large pixel error. Images are read back through an ffcv ``Loader`` with a centre-crop decoder
and compared with the test's own ground truth resized the same way; tolerance: mean absolute
difference <= 6 grey levels per image (JPEG at quality 90, twice for JPEG inputs, plus libjpeg's
DCT-scaled decode of the large photo; measured values are 0–3).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fastvit_reduce.data import inspect as inspect_cmd
from fastvit_reduce.data import write
from fastvit_reduce.data.betons import read_classes

REPO = Path(__file__).resolve().parents[1]
MAX_RES = 64
CROP = 16
CLASSES = ["n01_alpha", "n02 bêta ü", "n03_gamma"]  # sorted; a space and non-ASCII in one name
JUNK = ["n01_alpha/truncated.JPEG", "n02 bêta ü/empty.JPEG", "n03_gamma/page.JPEG"]


def ramp(w: int, h: int, label: int) -> np.ndarray:
    """(h, w, 3) uint8 test pattern; see the module docstring."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w)[None, :]
    img[..., 1] = np.linspace(0, 255, h)[:, None]
    img[..., 2] = 40 + 80 * label
    return img


def make_imagenet(root: Path) -> dict[str, tuple[int, np.ndarray, tuple[int, int]]]:
    """Write ``root/train`` with every quirk; return {relative path: (label, upright RGB, stored (w, h))}
    for the decodable files (junk and ignored files are written too, but not returned)."""
    split = root / "train"
    for c in CLASSES:
        (split / c).mkdir(parents=True)
    good = {}

    def save(rel, label, pil_image, expected, stored, **kw):
        pil_image.save(split / rel, **kw)
        good[rel] = (label, expected, stored)

    # class 0: JPEG flavours
    rgb = ramp(48, 40, 0)
    save("n01_alpha/rgb.JPEG", 0, Image.fromarray(rgb), rgb, (48, 40), quality=95)
    save("n01_alpha/cmyk.JPEG", 0, Image.fromarray(rgb).convert("CMYK"), rgb, (48, 40), quality=95)
    grey = rgb.mean(axis=2).astype(np.uint8)
    save("n01_alpha/grey.JPEG", 0, Image.fromarray(grey), np.repeat(grey[..., None], 3, 2), (48, 40),
         quality=95)
    save("n01_alpha/png_named.JPEG", 0, Image.fromarray(rgb), rgb, (48, 40), format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": store the upright image turned the other way
    save("n01_alpha/exif_rotated.JPEG", 0, Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90),
         rgb, (48, 40), quality=95, exif=exif.tobytes())
    big = ramp(1600, 1200, 0)
    save("n01_alpha/large.JPEG", 0, Image.fromarray(big), big, (64, 48), quality=90)
    Image.fromarray(rgb).save(split / "n01_alpha/truncated.JPEG", quality=95)
    data = (split / "n01_alpha/truncated.JPEG").read_bytes()
    (split / "n01_alpha/truncated.JPEG").write_bytes(data[: len(data) // 2])
    (split / "n01_alpha/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (split / "n01_alpha/notes.txt").write_text("not an image")

    # class 1: PNG modes, odd names
    rgb = ramp(40, 32, 1)
    save("n02 bêta ü/ünï cødé 画像 01.JPEG", 1, Image.fromarray(rgb), rgb, (40, 32), quality=95)
    rgba = np.dstack([rgb, np.linspace(0, 255, 40, dtype=np.uint8)[None, :].repeat(32, 0)])
    save("n02 bêta ü/with space.png", 1, Image.fromarray(rgba), rgb, (40, 32))  # alpha dropped
    pal = Image.fromarray(rgb).quantize(16)
    save("n02 bêta ü/palette.png", 1, pal, np.asarray(pal.convert("RGB")), (40, 32))
    pal.info["transparency"] = 0
    save("n02 bêta ü/palette_transparent.png", 1, pal, np.asarray(pal.convert("RGB")), (40, 32))
    grey = rgb.mean(axis=2).astype(np.uint8)
    save("n02 bêta ü/grey16.png", 1, Image.fromarray(grey.astype(np.uint16) * 257),
         np.repeat(grey[..., None], 3, 2), (40, 32))
    cv2.imwrite(str(split / "n02 bêta ü/rgb16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    good["n02 bêta ü/rgb16.png"] = (1, rgb, (40, 32))
    (split / "n02 bêta ü/empty.JPEG").write_bytes(b"")

    # class 2: sizes, nesting, junk
    for rel, (w, h), stored in [("tiny_1x1.png", (1, 1), (1, 1)), ("tall_1x40.png", (1, 40), (1, 40)),
                                ("wide_300x2.png", (300, 2), (64, 1)), ("sub/nested.JPEG", (30, 20), (30, 20))]:
        (split / "n03_gamma" / rel).parent.mkdir(exist_ok=True)
        img = ramp(w, h, 2)
        save(f"n03_gamma/{rel}", 2, Image.fromarray(img), img, stored, format="PNG")
    # flat colour: ffcv stores JPEGs with 4:2:0 chroma, which averages a 3x2 ramp's colours away
    img = np.full((2, 3, 3), (90, 160, 200), np.uint8)
    save("n03_gamma/tiny_3x2.JPEG", 2, Image.fromarray(img), img, (3, 2), quality=95)
    (split / "n03_gamma/page.JPEG").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    Image.fromarray(img).save(split / "n03_gamma/.hidden.JPEG", format="PNG")

    # split level: a file and a hidden folder, neither of them a class
    (split / "LOC_synset_mapping.txt").write_text("n01 alpha\n")
    (split / ".ipynb_checkpoints").mkdir()
    Image.fromarray(img).save(split / ".ipynb_checkpoints/x.JPEG", format="PNG")
    return good


def reference_crop(expected: np.ndarray, stored: tuple[int, int]) -> np.ndarray:
    """What ffcv's CenterCropRGBImageDecoder((CROP, CROP), ratio=1) should return for this file."""
    img = expected
    if (img.shape[1], img.shape[0]) != stored:
        img = cv2.resize(img, stored, interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    c = min(h, w)
    img = img[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
    return cv2.resize(img, (CROP, CROP), interpolation=cv2.INTER_AREA)


def write_args(root: Path, out: Path, *extra: str) -> list[str]:
    # max_aspect=0: the 1x40 and 300x2 quirks are written, to check their sizes (by default they
    # are skipped: test_hostile.py)
    return [f"--cfg.data_dir={root}", "--cfg.split=train", f"--cfg.write_path={out}",
            f"--cfg.max_resolution={MAX_RES}", "--cfg.write_mode=proportion",
            "--cfg.compress_probability=0.5", "--cfg.num_workers=2", "--cfg.chunk_size=3",
            "--cfg.max_aspect=0", *extra]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root)


def read_all(path: Path, os_cache: bool) -> tuple[np.ndarray, np.ndarray]:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(path), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    os_cache=os_cache, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((CROP, CROP), 1.0)],
                               "label": [IntDecoder()]})
    images, labels = [], []
    for x, y in loader:
        images.append(np.array(x))  # copy: ffcv reuses its batch buffers
        labels.append(np.array(y).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def test_write_every_quirk_and_read_back(imagenet, tmp_path, capsys, no_jit):
    from ffcv.reader import Reader
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root, good = imagenet
    out = tmp_path / "train.beton"
    assert write.main(write_args(root, out)) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {len(good)} images of 3 classes") and "skipped 3" in summary

    # the expected order and labels: torchvision's make_dataset, hidden files and junk left out
    ours = lambda p: p.lower().endswith(IMG_EXTENSIONS) and not Path(p).name.startswith(".")  # noqa: E731
    order = [os.path.relpath(p, root / "train") for p, _ in
             make_dataset(str(root / "train"), {c: i for i, c in enumerate(CLASSES)}, is_valid_file=ours)]
    order = [p for p in order if p not in JUNK]
    assert sorted(order) == sorted(good)

    meta = Reader(str(out)).metadata
    assert [(int(w), int(h)) for w, h in zip(meta["f0"]["width"], meta["f0"]["height"])] == \
        [good[p][2] for p in order]
    assert set(meta["f0"]["mode"]) == {0, 1}  # proportion mode stored some as JPEG, some raw

    for os_cache in (True, False):  # mmap'ed file, and ffcv's page cache (uses the allocation table)
        images, labels = read_all(out, os_cache)
        assert labels.tolist() == [good[p][0] for p in order]
        for k, rel in enumerate(order):
            ref = reference_crop(good[rel][1], good[rel][2]).astype(int)
            err = np.abs(images[k].astype(int) - ref).mean()
            assert err <= 6, f"{rel}: mean abs pixel error {err:.1f} (os_cache={os_cache})"

    report = json.loads(Path(f"{out}.report.json").read_text())
    assert sorted(os.path.relpath(s["path"], root / "train") for s in report["skipped"]) == JUNK
    assert all(s["error"] for s in report["skipped"])
    assert report["written"] == len(good)
    assert report["written"] + len(report["skipped"]) == report["files_seen"] == len(good) + len(JUNK)
    assert report["ignored_files"] == 4  # .DS_Store, notes.txt, .hidden.JPEG, LOC_synset_mapping.txt
    assert len(report["ignored_examples"]) == 4 and "n01_alpha/.DS_Store" in report["ignored_examples"]
    assert report["classes"] == CLASSES and report["images_per_s"] > 0
    assert report["settings"]["max_resolution"] == MAX_RES
    assert read_classes(out) == CLASSES and read_classes(tmp_path / "none.beton") is None
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []

    assert inspect_cmd.main([str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"samples: {len(good)}" in shown and "classes: 3" in shown and "skipped 3" in shown


def test_on_error_raise_names_the_file(imagenet, tmp_path, capsys):
    root, _ = imagenet
    out = tmp_path / "train.beton"
    assert write.main(write_args(root, out, "--cfg.on_error=raise", "--cfg.num_workers=1")) == 1
    err = capsys.readouterr().err
    assert "cannot decode" in err and any(str(root / "train" / j) in err for j in JUNK)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["no_data_dir", "no_split", "empty_class", "flat_folder",
                                  "no_output_dir", "unknown_key", "dangling_class_link"])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, case):
    root, out = tmp_path / "in", tmp_path / "out" / "train.beton"
    (tmp_path / "out").mkdir()
    argv = [f"--cfg.data_dir={root}", f"--cfg.write_path={out}"]
    if case != "no_data_dir":
        (root / "val").mkdir(parents=True)
    if case == "empty_class":
        for c in ("a", "b"):
            (root / "train" / c).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / "train/a/x.JPEG")
        (root / "train/b/readme.txt").write_text("no images here")
    if case == "flat_folder":
        (root / "train").mkdir()
        Image.new("RGB", (4, 4)).save(root / "train/ILSVRC2012_val_00000001.JPEG")
    if case == "no_output_dir":
        (root / "train/a").mkdir(parents=True)
        argv[1] = f"--cfg.write_path={tmp_path / 'missing' / 'x.beton'}"
    if case == "unknown_key":
        argv.append("--cfg.max_res=64")
    if case == "dangling_class_link":
        (root / "train/a").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / "train/a/x.JPEG")
        (root / "train/b").symlink_to(tmp_path / "unmounted" / "b")
    assert write.main(argv) == 2
    err = capsys.readouterr().err
    expected = {"no_data_dir": "input folder not found", "no_split": "no 'train' folder",
                "empty_class": "hold no image files: b", "flat_folder": "sort them into class folders",
                "no_output_dir": "output folder not found", "unknown_key": "did you mean 'cfg.max_resolution'",
                "dangling_class_link": "broken symlink(s) in"}
    assert expected[case] in err and err.startswith("error: ")
    assert list((tmp_path / "out").iterdir()) == []


def test_scan_skips_hidden_subfolders_and_refuses_unlistable_ones(tmp_path, monkeypatch):
    for rel in ("a/x.JPEG", "a/.ipynb_checkpoints/x-checkpoint.JPEG", "a/sub/y.JPEG", "b/z.png"):
        (tmp_path / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / rel, format="PNG")
    split = write.scan_split(tmp_path, "train")
    assert [os.fsdecode(f) for f in split.files] == ["a/x.JPEG", "a/sub/y.JPEG", "b/z.png"]  # make_dataset order
    assert split.labels.tolist() == [0, 0, 1] and split.ignored == 1

    # a sub-folder that cannot be listed (permissions, a dead mount) must not silently lose its images
    scandir = os.scandir
    def failing(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", failing)
    with pytest.raises(write.InputError, match=r"cannot list .*sub: Permission denied"):
        write.scan_split(tmp_path, "train")


def test_full_disk_fails_cleanly_and_keeps_the_old_file(tmp_path, capsys):
    import resource
    for c in ("a", "b"):  # 4 raw 1000 px images of 3 MB: the 3rd overflows ffcv's first 8 MiB page
        (tmp_path / "in/train" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(ramp(1000, 1000, i)).save(tmp_path / "in/train" / c / f"{i}.png", compress_level=1)
    out = tmp_path / "train.beton"
    out.write_bytes(b"previous dataset")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # a 1 MB file-size limit makes ffcv's page writes (from offset 8 MiB) fail with EFBIG, the
    # same code path as ENOSPC (Python ignores SIGXFSZ, so the write returns an error)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        code = write.main([f"--cfg.data_dir={tmp_path / 'in'}", f"--cfg.write_path={out}",
                           "--cfg.max_resolution=1000", "--cfg.write_mode=raw", "--cfg.num_workers=1"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 1 and f"writing {out} failed after 2 of 4 images (0 skipped)" in err, err
    assert "File too large" in err and "is the disk full?" in err
    assert out.read_bytes() == b"previous dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "train.beton"]


def run_script(*args, script=REPO / "scripts/write_imagenet.sh", **env):
    return subprocess.run(["bash", str(script), *args], text=True, capture_output=True,
                          env={**os.environ, **env}, timeout=60)


def test_write_imagenet_sh(tmp_path, capsys):
    imagenet, out = tmp_path / "imagenet", tmp_path / "ffcv"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (imagenet / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(ramp(20, 16, i)).save(imagenet / split / c / f"{i}.JPEG")
    good = {"IMAGENET_DIR": str(imagenet), "WRITE_DIR": str(out)}

    for args, env, message in [
            ((), {}, "IMAGENET_DIR"),  # no numbers = the default 512 0.50 90
            (("256", "0.5"), {}, "expected MAX_RES COMPRESS_PROB JPEG_QUALITY"),
            (("256", "half", "90"), {}, "COMPRESS_PROB"), (("256", "0.50", "90"), {}, "IMAGENET_DIR"),
            (("256", "0.50", "90"), {"IMAGENET_DIR": str(tmp_path)}, "no train/ folder"),
            (("256", "0.50", "90"), good, "WRITE_DIR")]:
        r = run_script(*args, **{"IMAGENET_DIR": "", "WRITE_DIR": "", **env})
        assert r.returncode == 2 and message in r.stderr and "usage:" in r.stderr, (args, r.stderr)

    # DRY_RUN=1 prints the two commands; run them here (a fresh interpreter costs 6+ s of imports)
    out.mkdir()
    r = run_script("32", "0.50", "90", "--cfg.num_workers=1", "--cfg.subset=1", DRY_RUN="1", PYTHONPATH="", **good)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert [c[:4] for c in commands] == [["env", f"PYTHONPATH={REPO}", str(REPO / ".venv/bin/python"), "-m"]] * 2
    for command in commands:
        assert command[4:6] == ["fastvit_reduce.cli", "write"]
        assert write.main(command[6:]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("wrote 2 images of 2 classes")
    assert sorted(p.name for p in out.glob("*.beton")) == ["train_32_0.50_90.beton", "val_32_0.50_90.beton"]
    assert read_classes(out / "val_32_0.50_90.beton") == ["a", "b"]

    # without a .venv beside the script it runs the `fastvit-reduce` on PATH (as in the Docker image)
    (tmp_path / "repo/scripts").mkdir(parents=True)
    script = tmp_path / "repo/scripts/write_imagenet.sh"
    script.write_text((REPO / "scripts/write_imagenet.sh").read_text())
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin/fastvit-reduce"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\n')
    fake.chmod(0o755)
    r = run_script("32", "0.50", "90", script=script, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", **good)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c.split()[:3] for c in calls] == [["write", f"--cfg.data_dir={imagenet}", "--cfg.split=train"],
                                              ["write", f"--cfg.data_dir={imagenet}", "--cfg.split=val"]]
    assert f"--cfg.write_path={out}/val_32_0.50_90.beton" in calls[1]


def test_a_class_whose_every_file_is_unreadable_is_an_error(tmp_path, capsys):
    """Issue 15: the write used to exit 0 with that class empty (an empty folder is refused up front)."""
    split = tmp_path / "data" / "train"
    for c in ("a_good", "b_broken"):
        (split / c).mkdir(parents=True)
    for k in range(3):
        Image.fromarray(ramp(32, 24, 0)).save(split / "a_good" / f"{k}.JPEG", quality=90)
        (split / "b_broken" / f"{k}.JPEG").write_bytes(b"not a jpeg at all")
    out = tmp_path / "train.beton"
    assert write.main(write_args(tmp_path / "data", out, "--cfg.num_workers=1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 class(es) lost every image to decode errors: b_broken (e.g. ")
    assert not out.exists() and list(tmp_path.glob("train.beton*")) == []


def test_report_names_the_first_50_ignored_files(tmp_path):
    split = tmp_path / "data" / "train" / "a"
    split.mkdir(parents=True)
    Image.fromarray(ramp(32, 24, 0)).save(split / "x.JPEG", quality=90)
    for k in range(60):
        (split / f"notes{k:02d}.txt").write_text("x")
    data = write.scan_split(tmp_path / "data", "train")
    assert data.ignored == 60
    assert data.ignored_examples == [f"a/notes{k:02d}.txt" for k in range(50)]
