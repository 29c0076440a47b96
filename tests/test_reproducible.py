"""Same command, same weights: every random draw is a pure function of integer keys.

In-process runs of the real trainer (``main``) on 64 tiny images, 2 epochs of 8 steps, with the
seed's augmentation (RandAugment, mixup/cutmix, erasing, repeated augmentation) and drop-path, so
every random source of the data path and the model is exercised. ffcv's JIT is off (``no_jit``);
test_loaders.py checks the compiled pipeline gives the same batches.
"""
from __future__ import annotations

import json

import pytest

from conftest import SEED_AUGMENT, write_tiny_config
from fastvit_reduce import runs
from fastvit_reduce.train import main

pytestmark = pytest.mark.usefixtures("no_jit")


def run(cfg, name, *extra):
    assert main(["--config", cfg, f"--logging.experiment={name}", *SEED_AUGMENT, *extra]) == 0
    return json.loads((runs.RunFolder(cfg.rsplit("/", 1)[0] + "/runs/" + name).path / "final.json").read_text())


def losses(cfg, name):
    return [r["train_loss"] for r in runs.RunFolder(cfg.rsplit("/", 1)[0] + "/runs/" + name).read_rows()]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("repro"))


def test_same_seed_twice_and_other_loader_settings_give_bit_identical_weights(cfg, capsys):
    a = run(cfg, "a")
    b = run(cfg, "b")
    c = run(cfg, "c", "--data.num_workers=2", "--data.batches_ahead=3")
    assert a["weights_hash"] == b["weights_hash"] == c["weights_hash"]
    assert a["first_batch_hash"] == b["first_batch_hash"] == c["first_batch_hash"]
    assert losses(cfg, "a") == losses(cfg, "b") == losses(cfg, "c")
    # how batches meet the step (turns, a batch ahead, in series) changes no result either
    for mode in ("none", "ahead", "decode"):
        other = run(cfg, f"overlap_{mode}", f"--training.overlap={mode}")
        assert other["weights_hash"] == a["weights_hash"], mode
        log_text = (runs.RunFolder(cfg.rsplit("/", 1)[0] + f"/runs/overlap_{mode}").path / "train.log").read_text()
        assert f"overlap {mode}:" in log_text
    d = run(cfg, "d", "--training.seed=1")
    assert d["weights_hash"] != a["weights_hash"] and d["first_batch_hash"] != a["first_batch_hash"]

    folder = cfg.rsplit("/", 1)[0] + "/runs/"
    capsys.readouterr()
    assert runs.main([folder + "a", folder + "c"]) == 0
    assert capsys.readouterr().out.startswith("equal: final weights")
    assert runs.main([folder + "a", folder + "d"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("different:") and "first batches differ" in out and "first differing epoch: 0" in out
    assert runs.main([folder + "a", folder + "nope"]) == 2
