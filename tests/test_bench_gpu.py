"""The GPU check (``fastvit_reduce.bench.gpu_check``) on the CPU: sections write their JSON lines as
they finish, a section that crashes or runs out of time gets a failing line, the summaries follow
from the lines, and the CUDA-path sections report 0 host syncs (the rehearsal runs all of them)."""
import json
import os
import sys

import pytest

from fastvit_reduce.bench import gpu_check


def lines(out):
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


@pytest.mark.slow  # each section in a fresh interpreter
def test_sections_write_one_line_each_and_fail_alone(tmp_path, monkeypatch):
    """``run_sections``: one child process per section; a section that hangs is cut at its limit and
    named, and the others keep their lines. Two sections are enough (each process costs seconds of
    imports): the other sections' figures are checked in this process below."""
    out = tmp_path / "out"
    monkeypatch.setitem(gpu_check.SECTIONS, "train", 2)
    real_run = gpu_check.subprocess.run

    def run(cmd, timeout=None, **kw):
        if cmd[cmd.index("--child") + 1] == "train":  # stands in for a section that never ends
            cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        return real_run(cmd, timeout=timeout, **kw)
    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    code = gpu_check.main(["--out", str(out), "--device", "cpu", "--sections", "train,ema"])
    by = {}
    for r in lines(out):
        by.setdefault(r["section"], []).append(r)
    assert code == 1  # the hung section fails the check
    assert by["train"] == [{"section": "train", "ok": False, "error": "timed out after 2 s", "seconds": by["train"][0]["seconds"]}]
    assert by["ema"][0]["ok"] and by["ema"][0]["once"] and by["ema"][0]["foreach"]  # foreach kept for "cpu"
    assert "memory" not in by and "balance" not in by  # they follow step and loader only


def sections_here(tmp_path, *names) -> dict:
    """Run ``names``' section functions in this process (what each section's child runs); their rows."""
    out = tmp_path / "gpu_check.jsonl"
    args = gpu_check.parse(["--out", str(tmp_path), "--device", "cpu"])
    for name in names:
        gpu_check.CHILDREN[name](args, out, tmp_path)
    by = {}
    for r in lines(tmp_path):
        by.setdefault(r["section"], []).append(r)
    return by


@pytest.mark.slow  # two ffcv pipelines compiled, four variants built and stepped
def test_augment_bit_exact_loader_and_paired_sections(tmp_path):
    by = sections_here(tmp_path, "augment", "bit_exact", "loader", "paired")
    assert [r["part"] for r in by["augment"]] == ["randaugment", "full"]
    assert all(r["ok"] and r["host_syncs"] == 0 for r in by["augment"])  # the CUDA path syncs nothing
    bit = by["bit_exact"][0]
    assert bit["ok"] and bit["batches"] == 6 and bit["equal_batches"] == 6  # 48 images, batch 8
    assert [r["threads"] for r in by["loader"]] == sorted({1, len(os.sched_getaffinity(0))})
    assert all(r["ok"] and r["img_s"] > 0 and r["img_s_per_core"] > 0 for r in by["loader"])
    [paired] = by["paired"]
    assert paired["ok"] and paired["variants"] == 4
    assert paired["variant_img_s"] == pytest.approx(4 * paired["stream_img_s"], rel=1e-2)


def test_balance_and_memory_from_the_lines(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    gpu_check.emit(out, "loader", True, threads=1, img_s=900.0, img_s_per_core=900.0)
    gpu_check.emit(out, "loader", True, threads=16, img_s=12000.0, img_s_per_core=750.0)
    for strategy, img_s in (("baseline", 2700.0), ("grouped", 2900.0)):
        gpu_check.emit(out, "step", True, model="vit_b16", strategy=strategy, amp="bf16", mode="compiled",
                       img_s=img_s, peak_mem_gib=40.5)
    gpu_check.emit(out, "paired", True, stream_img_s=700.0)
    gpu_check.summaries(out, ["loader", "step", "paired"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    memory, balance = rows[-2], rows[-1]
    assert memory == {"section": "memory", "ok": True, "peak_gib_per_model": {"vit_b16": 40.5}, "note": None}
    assert balance["cores_needed_k1"] == 3.0 and balance["cores_needed_k4"] == round(700 / 900, 2)
    assert balance["model_img_s"] == 2700.0  # the baseline's speed, per core of the best loader row


def test_host_syncs_section_counts_none_for_paired_bf16_and_fp16(tmp_path):
    rows = sections_here(tmp_path, "host_syncs")["host_syncs"]
    assert [(r["amp"], r["host_syncs_per_step"], r["ok"]) for r in rows] == [("bf16", 0.0, True), ("fp16", 0.0, True)]


def test_step_section_measures_our_step_per_strategy_and_precision(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    args = gpu_check.parse(["--out", str(tmp_path), "--device", "cpu"])
    args.sizes.update(compiled=set(), steps=1, warmup=1)  # eager only here: tests/test_cuda_paths.py compiles
    args.sizes["models"] = dict(list(args.sizes["models"].items())[:1])
    gpu_check.section_step(args, out, tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["strategy"], r["amp"]) for r in rows] == [(s, a) for a in ("bf16", "fp16") for s in gpu_check.STRATEGIES]
    assert all(r["ok"] and r["ms"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None for r in rows)
    assert rows[0]["params"] > rows[1]["params"]  # baseline, then thin
