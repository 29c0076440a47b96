"""``train.py`` / ``fastvit-reduce train`` in this process (``main``): one run and what it leaves
(logs, checkpoints, params, re-runs), a non-finite loss, configuration errors before any work, the
checks of the inputs, paired runs (K variants step in turn on each batch, decoded and
augmented once) and bit-identical results for the same command.

In-process runs of the real trainer on tiny .beton files (64 train / 24 val images, 4 classes) with
timm's ``test_vit`` at 32 px, 2 epochs of 8 steps, with ffcv's JIT off (``no_jit``);
tests/e2e/test_train_cli.py runs the trainer as real processes (signals, kill -9, torchrun).

A paired variant must be exactly the run it would be alone (same batches, same drop-path stream,
same init), write the same files and stop alone when its loss goes non-finite. Same command, same
weights: every random draw is a pure function of integer keys; the reproducibility run uses the
seed's augmentation (RandAugment, mixup/cutmix, erasing, repeated augmentation) and drop-path, so
every random source of the data path and the model is exercised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import SEED_AUGMENT, paired_configs, write_beton, write_tiny_config
from fastvit_reduce import runs
from fastvit_reduce.config import ConfigError
from fastvit_reduce.report import load_run, markdown_table
from fastvit_reduce.runs import FINAL_KEYS
from fastvit_reduce.train import main

FILES = {"params.json", "log.jsonl", "summary.csv", "final.json", "last.pt", "best.pt", "train.log"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The tiny trainer YAML (tests/conftest.py TINY_TRAIN_YAML) and its .beton files."""
    return write_tiny_config(tmp_path_factory.mktemp("train"))


# ----------------------------------------------------------------------------- one run
def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def final(folder: Path) -> dict:
    return json.loads((folder / "final.json").read_text())


@pytest.mark.usefixtures("no_jit")
def test_one_process_trains_logs_and_refuses_a_changed_config(cfg, capsys):
    """The whole run in this process (it was a ``python runner.py`` process: what it checks needs none;
    tests/e2e/test_train_cli.py starts the processes that get signals)."""
    argv = ["--logging.experiment=single"]
    assert main(["--config", cfg, *argv]) == 0
    run = Path(cfg).parent / "runs" / "single"
    log = rows(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["train_loss"] < log[0]["train_loss"]
    assert all(0 <= r["eval_top1"] <= 100 and 0 <= r["data_wait_frac"] <= 1 and r["train_img_s"] > 0 for r in log)
    # the variant's own step time: part of the epoch's training time, read at log points
    assert all(0 < r["compute_s"] < r["train_time_s"] and r["train_images"] == 64 for r in log)
    assert len((run / "summary.csv").read_text().splitlines()) == 3  # header + one row per epoch
    fin = final(run)
    assert set(FINAL_KEYS) <= set(fin) and fin["completed"] and fin["epochs"] == 2
    assert fin["params"] == 264_260 and fin["best_top_1"] == max(r["eval_top1"] for r in log)
    assert fin["train_images"] == 128 and fin["compute_s"] == pytest.approx(sum(r["compute_s"] for r in log))
    # EMA on: the headline is the EMA's top-1 (as timm), the raw model's sits beside it
    assert fin["headline"] == "ema" and fin["final_ema_top_1"] == log[-1]["ema_top_1"] == fin["top_1"]
    assert fin["raw_final_top_1"] == log[-1]["raw_top_1"] is not None
    assert (run / "summary.csv").read_text().startswith("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,")
    params = json.loads((run / "params.json").read_text())
    assert set(params["versions"]) == {"python", "torch", "timm", "ffcv", "numpy"}
    assert params["git"]["revision"] and params["world_size"] == 1 and "--logging.experiment=single" in params["argv"]
    assert params["config"]["training.epochs"] == 2 and params["config"]["model.arch"] == "test_vit"
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["updates"]) == (2, 0, 16)
    assert torch.load(run / "best.pt", weights_only=True)["top_1"] == fin["best_top_1"]
    assert "epoch 1:" in (run / "train.log").read_text()
    assert f"numba cache of the ffcv pipelines: {os.environ['FASTVIT_REDUCE_JIT_CACHE']}" in (run / "train.log").read_text()
    assert set(fin["jit_cache"]) == {"loaded", "compiled"}

    # re-running a finished run is a no-op; a harmless change is fine; a real change is refused
    before = (run / "log.jsonl").read_text()
    assert main(["--config", cfg, *argv, "--data.num_workers=2", "--logging.progress=1"]) == 0
    assert (run / "log.jsonl").read_text() == before
    capsys.readouterr()
    assert main(["--config", cfg, *argv, "--training.epochs=3", "--optim.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "training.epochs: 2 -> 3" in err and "optim.lr" in err


@pytest.mark.usefixtures("no_jit")
def test_nonfinite_loss_stops_and_keeps_a_finite_checkpoint(cfg, capsys):
    runs_dir = Path(cfg).parent / "runs"
    assert main(["--config", cfg, "--logging.experiment=nan", "--optim.lr=1e30", "--lr.warmup_epochs=0",
                 "--training.max_nonfinite=2", "--logging.every_steps=1"]) == 1
    assert "non-finite loss for 2 consecutive updates" in capsys.readouterr().err
    assert final(runs_dir / "nan")["exit_reason"].startswith("non-finite loss")
    state = torch.load(runs_dir / "nan" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, yaml_text, key", [
    ([], "training:\n  epoch: 3\n", "training.epoch"),                   # unknown YAML key
    (["--training.channels_last=False"], "", "training.channels_last"),   # bool not 0/1
    (["--training.epochs=0"], "", "training.epochs"),                     # out of range
    (["--trainig.epochs=3"], "", "trainig.epochs"),                        # unknown CLI key
    (["--training.amp=fp8"], "", "training.amp"),                          # not a choice
    (["--resolution.min_res=64"], "", "resolution.min_res"),               # min_res > max_res
    (["--data.train_dataset=/nonexistent.beton"], "", "data.train_dataset"),
])
def test_bad_config_exits_2_naming_the_key(cfg, tmp_path, capsys, extra, yaml_text, key):
    argv = ["--config", cfg, f"--logging.folder={tmp_path / 'runs'}", *extra]
    if yaml_text:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "bad.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and key in err
    assert not (tmp_path / "runs").exists()  # no work done


def test_help_lists_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --nnodes=2" in out and "--training.amp='off'" in out and "--data.train_dataset=''" in out


def test_num_classes_below_the_datasets_class_count_is_refused(tmp_path):
    from fastvit_reduce.train import check_inputs

    beton = write_beton(tmp_path / "d.beton", n=4, size=16)
    Path(f"{beton}.classes.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    cfg = {"data.train_dataset": beton, "data.val_dataset": "", "model.num_classes": 4, "training.device": "cpu",
           "resolution.min_res": 16, "resolution.max_res": 16, "resolution.start_ramp": 0,
           "resolution.end_ramp": 0, "resolution.step": 8, "training.epochs": 1}
    with pytest.raises(ConfigError, match=r"model.num_classes=4, but .* has 5 classes"):
        check_inputs(cfg)
    check_inputs({**cfg, "model.num_classes": 5})


def test_a_truncated_beton_is_refused_before_training(cfg, tmp_path, capsys):
    train = Path(cfg).parent / "train.beton"
    cut = tmp_path / "cut.beton"
    cut.write_bytes(train.read_bytes()[:-100])  # the case that used to hang ffcv's loader forever
    assert main(["--config", cfg, f"--data.train_dataset={cut}", "--logging.experiment=cut"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(cut) in err and "damaged" in err


def test_labels_beyond_num_classes_are_refused_without_classes_json(tmp_path, capsys):
    from conftest import write_beton
    write_beton(tmp_path / "six.beton", n=12, num_classes=6, size=16)  # labels 0..5, no .classes.json
    cfg = write_tiny_config(tmp_path)
    assert main(["--config", cfg, f"--data.train_dataset={tmp_path / 'six.beton'}", "--logging.experiment=x"]) == 2
    err = capsys.readouterr().err
    assert "holds labels 0..5, but model.num_classes=4" in err


# ----------------------------------------------------------------------------- paired runs
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return paired_configs(tmp_path_factory.mktemp("paired"))


@pytest.mark.usefixtures("no_jit")
def test_a_paired_variant_is_exactly_its_separate_run(pairs):
    runs_dir = pairs / "runs"
    assert main(["--config", str(pairs / "baseline.yaml"), "--pair-with", str(pairs / "thin.yaml"),
                 str(pairs / "grouped.yaml"), f"--logging.folder={runs_dir / 'paired'}"]) == 0
    for name in ("baseline", "thin", "grouped"):
        assert main(["--config", str(pairs / f"{name}.yaml"), f"--logging.folder={runs_dir / 'alone'}"]) == 0
        paired, alone = runs_dir / "paired" / name, runs_dir / "alone" / name
        assert FILES <= {p.name for p in paired.iterdir()}
        fp, fa = final(paired), final(alone)
        # same parameter count, same batches (hash of the first input batch), same weights
        assert (fp["params"], fp["first_batch_hash"], fp["weights_hash"]) == \
               (fa["params"], fa["first_batch_hash"], fa["weights_hash"])
        assert fp["completed"] and fp["paired_with"] and not fa["paired_with"]
    hashes = {final(runs_dir / "paired" / n)["first_batch_hash"] for n in ("baseline", "thin", "grouped")}
    assert len(hashes) == 1  # every variant saw bit-identical input batches
    params = json.loads((runs_dir / "paired" / "thin" / "params.json").read_text())
    assert params["pair"] == {"variants": ["baseline", "thin", "grouped"], "baseline": "baseline"}

    rows = [load_run(runs_dir / "paired" / n) for n in ("baseline", "thin", "grouped")]
    table = markdown_table(rows)
    assert "per-epoch differences vs baseline (same batches" in table and "thin Δtop-1" in table
    assert "grouped Δloss" in table and "1 seed: no interval" in table  # one seed: said, not hidden
    # each variant's own step time: it shares the wall clock, not the compute
    compute = [final(runs_dir / "paired" / n)["compute_s"] for n in ("baseline", "thin", "grouped")]
    assert all(c > 0 for c in compute) and sum(compute) < final(runs_dir / "paired" / "thin")["total_time_s"]
    # re-running a finished paired command is a no-op
    stamp = (runs_dir / "paired" / "thin" / "final.json").stat().st_mtime_ns
    assert main(["--config", str(pairs / "baseline.yaml"), "--pair-with", str(pairs / "thin.yaml"),
                 str(pairs / "grouped.yaml"), f"--logging.folder={runs_dir / 'paired'}"]) == 0
    assert (runs_dir / "paired" / "thin" / "final.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("yaml_text, key", [
    ("training: {seed: 3}", "training.seed"),
    ("augment: {mixup: 0.5}", "augment.mixup"),
    ("data: {rrc_scale: [0.5, 1.0]}", "data.rrc_scale"),
    ("model: {num_classes: 5}", "model.num_classes"),
])
def test_configs_that_shape_the_batches_differently_are_refused(pairs, tmp_path, capsys, yaml_text, key):
    (tmp_path / "other.yaml").write_text(f"base: {pairs / 'baseline.yaml'}\nreduction: {{strategy: thin}}\n{yaml_text}\n")
    assert main(["--config", str(pairs / "baseline.yaml"), "--pair-with", str(tmp_path / "other.yaml"),
                 f"--logging.folder={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be paired" in err and key in err and "other vs baseline" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_jit")
def test_a_nonfinite_variant_stops_alone(pairs, tmp_path, capsys):
    (tmp_path / "wild.yaml").write_text(f"base: {pairs / 'baseline.yaml'}\noptim: {{lr: 1.0e30}}\n"
                                        "lr: {warmup_epochs: 0}\n")
    assert main(["--config", str(pairs / "baseline.yaml"), "--pair-with", str(tmp_path / "wild.yaml"),
                 f"--logging.folder={tmp_path / 'runs'}", "--training.max_nonfinite=2",
                 "--logging.every_steps=1"]) == 0
    wild, base = final(tmp_path / "runs" / "wild"), final(tmp_path / "runs" / "baseline")
    assert base["completed"] and base["epochs_done"] == 2
    assert not wild["completed"] and wild["exit_reason"].startswith("non-finite loss for 2 consecutive")
    assert "wild: non-finite loss" in capsys.readouterr().err


@pytest.mark.usefixtures("no_jit")
def test_pair_parts_train_the_pair_between_processes_with_the_same_weights(pairs, capsys):
    """``--pair-part I/N``: variants I, I+N, ... of the pair, in their own process; each variant
    ends exactly as in the one-process pair (``..._is_exactly_its_separate_run`` made those), and
    every part records the whole pair, so ``report`` still shows one paired group."""
    pair = ["--config", str(pairs / "baseline.yaml"), "--pair-with", str(pairs / "thin.yaml"), str(pairs / "grouped.yaml")]
    parts = pairs / "runs" / "parts"
    assert main([*pair, "--pair-part", "2/2", f"--logging.folder={parts}"]) == 0
    assert {p.name for p in parts.iterdir()} == {"thin"}  # [baseline, thin, grouped][1::2]
    assert main([*pair, "--pair-part=1/2", f"--logging.folder={parts}"]) == 0
    assert {p.name for p in parts.iterdir()} == {"baseline", "thin", "grouped"}
    one_process = pairs / "runs" / "paired"
    if not (one_process / "thin" / "final.json").is_file():  # this test alone: make the reference
        assert main([*pair, f"--logging.folder={one_process}"]) == 0
    for name in ("baseline", "thin", "grouped"):
        assert final(parts / name)["weights_hash"] == final(one_process / name)["weights_hash"], name
        params = json.loads((parts / name / "params.json").read_text())
        assert params["pair"] == {"variants": ["baseline", "thin", "grouped"], "baseline": "baseline"}
    assert final(parts / "thin")["paired_with"] == []  # trained alone in its process
    table = markdown_table([load_run(parts / n) for n in ("baseline", "thin", "grouped")])
    assert "per-epoch differences vs baseline" in table and "thin Δtop-1" in table
    capsys.readouterr()
    for bad, message in (("3/2", "1 <= I <= N"), ("1/4", "only 3 variant(s)"), ("x", "I/N")):
        assert main([*pair, "--pair-part", bad, f"--logging.folder={parts}"]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- same command, same weights
def run(cfg, name, *extra):
    assert main(["--config", cfg, f"--logging.experiment={name}", *SEED_AUGMENT, *extra]) == 0
    return json.loads((runs.RunFolder(cfg.rsplit("/", 1)[0] + "/runs/" + name).path / "final.json").read_text())


def losses(cfg, name):
    return [r["train_loss"] for r in runs.RunFolder(cfg.rsplit("/", 1)[0] + "/runs/" + name).read_rows()]


@pytest.mark.slow  # 8 training runs
@pytest.mark.usefixtures("no_jit")
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
