"""Shared test fixtures: tiny synthetic ``.beton`` files (``fastvit_reduce.data.synthetic``), a
tiny ViT recipe, and helpers for hostile inputs (a damaged JPEG, a pickle that would run code,
one-line errors, printed commands).

Layout: ``tests/test_<module>.py`` tests ``fastvit_reduce/.../<module>.py`` in this process (or with
small helper processes); ``tests/e2e/`` holds the tests that start the real commands as processes
(trainer, torchrun, sweep, bench, the numba cache across processes). Tests there are marked ``e2e``
and run after the rest; ``scripts/test.sh --quick`` leaves out ``e2e`` and ``slow`` (a test that
starts a fresh interpreter, seconds of imports, or trains many times)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile

import pytest

import fastvit_reduce.data.ffcv_patch  # noqa: F401,I001 — the fast ffcv import, before any test imports ffcv
from fastvit_reduce.data.synthetic import make_images, write_beton  # noqa: F401 — used by test modules

_JIT_CACHE, _JIT_KEY = "FASTVIT_REDUCE_JIT_CACHE", "FASTVIT_REDUCE_JIT_KEY"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts the real commands as processes (tests/e2e/); "
                                       "scripts/test.sh --quick leaves these out")
    config.addinivalue_line("markers", "slow: a fresh interpreter (seconds of imports) or many training runs "
                                        "in one test; left out by scripts/test.sh --quick")
    _session_jit_cache(config)


@pytest.hookimpl(tryfirst=True)  # why: before pytest's own -m deselection sees the items
def pytest_collection_modifyitems(config, items):
    """Mark everything under tests/e2e/ ``e2e``. One process runs it last (the in-process tests fail
    faster); under pytest-xdist (scripts/test.sh, with --no-loadscope-reorder) the modules that
    start processes go first, e2e then those with a test marked slow: the long modules start first
    and the short ones fill the gaps, so the workers end together."""
    e2e = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e") + os.sep
    slow_modules = set()
    for item in items:
        if str(item.path).startswith(e2e):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("slow"):
            slow_modules.add(item.path)
    if "PYTEST_XDIST_WORKER" in os.environ:
        # stable: each module's tests stay together and in file order
        items.sort(key=lambda item: (item.get_closest_marker("e2e") is None, item.path not in slow_modules))
    else:
        items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def _session_jit_cache(config):
    """One numba cache (and its key) for the session, inherited by every trainer the tests start:
    the first process compiles the ffcv pipelines, the others load them (``fastvit_reduce.data.jit``),
    and the user's ``~/.cache`` is left alone. An explicit ``FASTVIT_REDUCE_JIT_CACHE`` is kept."""
    if _JIT_CACHE not in os.environ:
        config._jit_cache = tempfile.mkdtemp(prefix="fvr_jit_")
        os.environ[_JIT_CACHE] = config._jit_cache
        os.environ.setdefault(_JIT_KEY, os.path.join(config._jit_cache, "jit.key"))


def pytest_unconfigure(config):
    folder = getattr(config, "_jit_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(_JIT_CACHE, None)
        if os.environ.get(_JIT_KEY, "").startswith(folder):
            os.environ.pop(_JIT_KEY)

TINY_VIT = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                depth=4, num_heads=2, num_classes=4)


@pytest.fixture
def tiny_beton(tmp_path):
    """Factory: ``tiny_beton(name, n=64, num_classes=4, size=48, seed=0) -> path``."""
    def make(name: str = "data.beton", **kwargs) -> str:
        return write_beton(tmp_path / name, **kwargs)
    return make


def corrupt_jpeg(path, index: int) -> None:
    """Zero 400 bytes of one stored JPEG's compressed data, its markers and headers intact (as disk
    damage would): the structure check passes, libjpeg-turbo's decode fails."""
    from ffcv.reader import Reader
    ptr = int(Reader(str(path)).metadata["f0"]["data_ptr"][index])
    with open(path, "r+b") as f:
        f.seek(ptr)
        scan = ptr + f.read(4096).index(b"\xff\xda") + 30  # inside the scan, past its header
        f.seek(scan)
        f.write(bytes(400))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread (why: on a shared 2-core box, OpenMP threads spinning
    at barriers made small ops ~50x slower). Use per module: ``pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_jit():
    """Run ffcv pipelines as plain Python for this test: no ~5-10 s numba compile for a few tiny images."""
    from ffcv.pipeline.compiler import Compiler
    before = Compiler.is_enabled
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(before)


TINY_TRAIN_YAML = """\
base: {base}
data: {{train_dataset: {train}, val_dataset: {val}, num_workers: 1, batches_ahead: 1}}
resolution: {{min_res: 32, max_res: 32, step: 8}}
model: {{arch: test_vit, num_classes: 4, img_size: 32, patch_size: 8}}
augment: {{randaugment: '', mixup: 0, cutmix: 0, reprob: 0, aug_repeats: 1}}
training: {{epochs: 2, batch_size: 8, global_batch: 0, amp: 'off', device: cpu}}
lr: {{warmup_epochs: 0.25, step_on: update}}
ema: {{decay: 0.9}}
validation: {{batch_size: 16}}
logging: {{folder: {runs}, progress: 0}}
checkpoint: {{every_minutes: 0}}
"""
# the seed's augmentation, for runs that check plumbing rather than a falling loss
SEED_AUGMENT = ["--augment.randaugment=rand-m9-mstd0.5-inc1", "--augment.mixup=0.8", "--augment.cutmix=1.0",
                "--augment.reprob=0.25", "--augment.aug_repeats=3"]


def write_tiny_config(folder, name: str = "tiny.yaml", train_n: int = 64, **extra_yaml) -> str:
    """A trainer YAML on the repo's base recipe, shrunk to timm's ``test_vit`` at 32 px on tiny
    .beton files (``train_n`` train / 24 val images, 4 classes) in ``folder``; returns its path.
    ``extra_yaml``: more top-level YAML text per section name, e.g. reduction="{strategy: thin}"."""
    from pathlib import Path
    folder = Path(folder)
    train = folder / "train.beton"
    if not train.exists():
        write_beton(train, n=train_n, size=40)
        write_beton(folder / "val.beton", n=24, size=40, seed=1)
    base = Path(__file__).resolve().parent.parent / "rn_configs" / "base.yaml"
    text = TINY_TRAIN_YAML.format(base=base, train=train, val=folder / "val.beton", runs=folder / "runs")
    text += "".join(f"{k}: {v}\n" for k, v in extra_yaml.items())
    path = folder / name
    path.write_text(text)
    return str(path)


def sample_photos(folder, classes: int, train_per_class: int, val_per_class: int):
    """A tiny ImageFolder photo set (``fastvit-reduce sample``, 64-96 px JPEGs) at ``folder/sample``."""
    from pathlib import Path

    from fastvit_reduce.sample import build_sample
    out = Path(folder) / "sample"
    build_sample(out, num_classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                 min_size=64, max_size=96)
    return out


def paired_configs(folder):
    """baseline.yaml (``write_tiny_config``), thin.yaml and grouped.yaml on it, in ``folder``."""
    base = write_tiny_config(folder, "baseline.yaml")
    (folder / "thin.yaml").write_text(f"base: {base}\nreduction: {{strategy: thin, mlp_ratio: 2.0}}\n")
    (folder / "grouped.yaml").write_text(f"base: {base}\nreduction: {{strategy: grouped}}\nema: {{decay: 0.5}}\n")
    return folder


# ----------------------------------------------------------------------------- hostile inputs
def one_line_error(capsys, *words) -> str:
    """The captured stderr, which must be one ``error:`` line holding every word."""
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


class Touch:
    """Unpickling this runs ``touch <path>``: the file must never appear."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def printed_commands(text: str, program: str) -> list[list[str]]:
    """Every command in ``text`` that starts a line or follows ': ', from ``program`` to the end of
    its line, as the shell would split it (a line ending in ':' introduces commands, it is none)."""
    found = re.findall(rf"(?:^[ \t]*|: )({re.escape(program)} .*[^:])$", text, flags=re.MULTILINE)
    return [shlex.split(cmd) for cmd in found]
