"""``fastvit-reduce bench`` commands for real, with their child processes:

* ``bench e2e``: the whole command on a tiny sample ImageFolder (4 classes, 64-96 px photos): .beton
  write, one child run per path, JSON summary; and ``--sweep`` with ``--cpu-slots 2``;
* ``bench eval``: one run's weights through our .beton val loader and timm's ImageFolder loader.
  ``fastvit-reduce bench eval`` (a child process, as users run it) evaluates the last.pt of bench
  e2e's ours run both ways; the ours column must equal the trainer's own final evaluation;
* the GPU check's train section on the CPU (the trainer CLI, SIGTERM, resume), structure and
  invariants only, so the check cannot rot (tests/test_bench_gpu.py has the other sections);
* ``bench loader``'s ceiling pool: worker processes, one of them killed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import sample_photos, write_beton

REPO = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 4, 6, 2, 8


# ----------------------------------------------------------------------------- bench gpu (started first: runs beside the rest)
@pytest.fixture(scope="module", autouse=True)
def gpu_run(request, tmp_path_factory):
    """``python -m fastvit_reduce.bench.gpu_check --device cpu --sections train``, started with the
    module when its tests are selected: processes the tests only read, so they run beside the bench
    e2e and bench eval tests, which mostly wait on one child at a time. No test here asserts a time;
    output goes to files (a full pipe would stall it). The sections that start no trainer run in
    tests/test_bench_gpu.py's process."""
    if not any("result" in item.fixturenames for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(out / "stdout", "w") as stdout:
        p = subprocess.Popen([sys.executable, "-m", "fastvit_reduce.bench.gpu_check", "--out", str(out),
                              "--device", "cpu", "--sections", "train"], cwd=REPO, env=env,
                             stdout=stdout, stderr=subprocess.STDOUT, text=True)
    p.out = out
    yield p
    if p.poll() is None:  # a test failed before reading it
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def result(gpu_run):
    p = gpu_run
    p.wait(timeout=600)
    assert p.returncode == 0, (p.out / "stdout").read_text()[-3000:]
    rows = {}
    for line in (p.out / "gpu_check.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["section"], []).append(row)
    return rows


# ----------------------------------------------------------------------------- bench e2e
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sample_photos(tmp_path_factory.mktemp("e2e"), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS)


@pytest.fixture(scope="module")
def quick(folder, tmp_path_factory):
    """``bench e2e --quick`` on the tiny folder, once: its exit code, its JSON and its .beton folder
    (the runs are in ``betons/runs``; bench eval reads the ours run)."""
    import contextlib
    import io

    from fastvit_reduce.bench.e2e import main
    betons = tmp_path_factory.mktemp("quick") / "betons"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"),
                   "--beton-dir", str(betons), "--config", "rn_configs/sample/base.yaml", "--quick",
                   "--max-res", "64", "--write-workers", "1", "--json",
                   "--set", f"training.batch_size={BATCH}", "--set", f"training.global_batch={BATCH}",
                   "--set", f"validation.batch_size={BATCH}", "--set", "data.num_workers=1"])
    return SimpleNamespace(rc=rc, out=json.loads(stdout.getvalue()), betons=betons)


def test_quick_run_prints_both_paths(quick):
    """The whole command on the tiny folder: .beton write, one child run per path, JSON summary."""
    out = quick.out
    assert quick.rc == 0, [r["log"] for r in out["runs"]]
    assert out["beton_write_s"] > 0 and out["epochs"] == 1
    assert [r["path"] for r in out["runs"]] == ["ours", "timm"]
    summary = {r["path"]: r for r in out["summary"]}
    assert set(summary) == {"ours", "timm", "ours/timm", "ours/(timm-import)"}
    for path in ("ours", "timm"):
        row = summary[path]
        assert 0 <= row["top_1"] <= 100 and row["wall_s"] > 0 and row["cpu_s"] > 0, row
        assert row["steady_img_s"] > 0 and row["startup_s"] is not None, row
        assert 0 < row["ffcv_import_s"] < row["startup_s"], row  # measured in the child, part of start-up
    assert summary["ours/(timm-import)"]["wall_s"] > summary["ours/timm"]["wall_s"]
    # --jit-cache warm (the default): an untimed ours run filled the cache; the timed one loaded it
    assert out["jit_cache"] == "warm" and out["jit_prime_s"] > 0
    ours = out["runs"][0]
    assert ours["jit_compiled"] == 0 and ours["jit_loaded"] > 0, ours
    assert (quick.betons / "runs" / "ours_jit_prime" / "final.json").is_file()


# ----------------------------------------------------------------------------- bench eval
def start_cli(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def trained(quick, folder):
    """bench e2e's ours run (its trainer, 1 epoch on the tiny folder) and the photos it was written from."""
    assert quick.rc == 0
    return SimpleNamespace(run=quick.betons / "runs" / "ours_r0", val=folder / "val")


def test_same_weights_through_both_val_pipelines(trained):
    run = trained.run
    # the EMA and the raw weights: two independent commands (read-only on the run), side by side
    ema, raw = [start_cli("-m", "fastvit_reduce.cli", "bench", "eval", str(run), "--val-dir",
                          str(trained.val), *weights, "--json")
                for weights in ([], ["--weights", "raw"])]
    (ema_out, ema_err), (raw_out, raw_err) = ema.communicate(timeout=300), raw.communicate(timeout=300)
    assert ema.returncode == 0, ema_out + ema_err
    (row,) = json.loads(ema_out)
    final = json.loads((run / "final.json").read_text())
    assert row["images"] == CLASSES * VAL_PER_CLASS and row["weights"] == "ema"
    # our column is the trainer's own evaluation of the same EMA weights, to the image
    assert row["ours_top_1"] == pytest.approx(final["final_ema_top_1"], abs=1e-3)
    assert 0 <= row["timm_top_1"] <= 100
    assert row["difference"] == pytest.approx(row["ours_top_1"] - row["timm_top_1"])
    assert raw.returncode == 0, raw_out + raw_err
    assert json.loads(raw_out)[0]["ours_top_1"] == pytest.approx(final["raw_final_top_1"], abs=1e-3)


def test_bad_inputs_are_named(trained, tmp_path, capsys):
    """In this process (``bench eval`` refuses them before loading anything: no process needed)."""
    from fastvit_reduce.cli import main as cli

    val = str(trained.val)
    proc = SimpleNamespace(returncode=cli(["bench", "eval", str(tmp_path), "--val-dir", val]),
                           stderr=capsys.readouterr().err)
    assert proc.returncode == 2 and "no params.json" in proc.stderr
    other = tmp_path / "val"  # same images, one class folder renamed: labels would not match
    for cls in sorted(trained.val.iterdir()):
        (other / cls.name.replace(cls.name[0], "z", 1)).mkdir(parents=True)
        for f in cls.iterdir():
            (other / cls.name.replace(cls.name[0], "z", 1) / f.name).symlink_to(f)
    proc = SimpleNamespace(returncode=cli(["bench", "eval", str(trained.run), "--val-dir", str(other)]),
                           stderr=capsys.readouterr().err)
    assert proc.returncode == 2 and "labels would not match" in proc.stderr


# ----------------------------------------------------------------------------- the GPU check's sections
def test_sigterm_then_resume_section(result):
    [t] = result["train"]
    assert (t["first_exit"], t["second_exit"], t["completed"], t["ok"], t["epochs"]) == (124, 0, True, True, 2)
    assert 0 <= t["data_wait_frac"] <= 1


# ----------------------------------------------------------------------------- bench e2e --sweep
def test_sweep_with_cpu_slots_splits_ours_and_runs_timm_side_by_side(folder, tmp_path, capsys):
    """--sweep with --cpu-slots 2: ours = the paired command as --pair-part 1/2 and 2/2; timm = its
    runs one after the other, and again two at a time; every config ends with a top-1 in each row.
    Two configs, not three: each row still needs two processes (ours' two parts, timm's two runs in
    a row and two at a time), which is what is checked; a part holding two variants of the pair is
    checked by tests/test_train.py (--pair-part) and tests/test_sweep.py (--cpu-slots --paired)."""
    import json

    from fastvit_reduce.bench.e2e import main
    configs = [f"rn_configs/sample/{n}.yaml" for n in ("baseline", "thin")]
    rc = main(["--train-dir", str(folder / "train"), "--val-dir", str(folder / "val"),
               "--beton-dir", str(tmp_path / "betons"), "--config", "rn_configs/sample/base.yaml", "--quick",
               "--max-res", "64", "--write-workers", "1", "--json", "--sweep", *configs, "--cpu-slots", "2",
               "--jit-cache", "cold",
               "--set", f"training.batch_size={BATCH}", "--set", f"training.global_batch={BATCH}",
               "--set", f"validation.batch_size={BATCH}", "--set", "data.num_workers=1",
               "--set", f"model.num_classes={CLASSES}"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out["runs"]
    assert [r["path"] for r in out["runs"]] == ["ours", "timm", "timm x2"]
    assert set(out["ratio"]) == {"ours/timm", "ours/timm x2", "ours/(timm-import)"} and out["cpu_slots"] == 2
    timm_row = [r for r in out["runs"] if r["path"] == "timm"][0]
    assert timm_row["ffcv_import_s"] > 0  # the two timm runs' imports, summed
    # --jit-cache cold: ours' two processes started from an empty cache and compiled
    ours_row = out["runs"][0]
    assert out["jit_cache"] == "cold" and out["jit_prime_s"] is None
    assert all(ours_row["jit_cache"][st]["compiled"] > 0 for st in ("baseline", "thin"))
    assert out["ratio"]["ours/(timm-import)"]["wall_s"] > out["ratio"]["ours/timm"]["wall_s"]
    for row in out["runs"]:
        assert set(row["top_1"]) == {"baseline", "thin"}
        assert all(0 <= t <= 100 for t in row["top_1"].values()), row
    logs = sorted((tmp_path / "betons" / "runs" / "ours_sweep_r0").glob("part*.out"))
    assert [p.name for p in logs] == ["part1.out", "part2.out"]
    params = json.loads((tmp_path / "betons" / "runs" / "ours_sweep_r0" / "thin" / "params.json").read_text())
    assert "--pair-part=2/2" in params["argv"] and params["pair"]["variants"] == ["baseline", "thin"]


# ----------------------------------------------------------------------------- bench loader
def test_bench_ceiling_pool_empty_shard_and_dead_worker(tmp_path):
    """More workers than images is fine; a worker that dies is an error, not a hang."""
    from fastvit_reduce.bench.loader import CeilingPool

    pool = CeilingPool(write_beton(tmp_path / "one.beton", n=1, size=24, write_mode="jpg"), res=16, workers=2)
    try:
        images, seconds = pool.run_epoch()  # worker 1 has an empty shard
        assert images == 1 and seconds > 0
        pool.procs[1].kill()
        pool.procs[1].join(10)
        with pytest.raises(RuntimeError, match="ceiling worker 1 exited with code -9"):
            pool.run_epoch()
    finally:
        pool.close()
