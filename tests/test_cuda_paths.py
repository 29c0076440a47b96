"""The CUDA code paths, tested on the CPU: streams, host syncs, skipped updates, compile, determinism.

* streams: ``torch.cuda``'s stream/event pieces are replaced by recorders, and the real trainer runs
  with a side stream in every ``training.overlap`` mode: the augmentation must run on the side
  stream, everything else (model step, optimizer, EMA, evaluation, checkpoints) on the main one,
  which waits for each batch's event before using it;
* host syncs: the aten ops of steady steps (augmentation with the CUDA path of RandAugment, K=2
  paired micro-steps, optimizer steps with a skip forced, EMA, the loop's bookkeeping) for
  AMP off/bf16/fp16, none of which may be an op that makes a CUDA host wait;
* a skipped update (non-finite loss) means the same on every path: weights and AdamW state kept,
  the update counted and the EMA updated, as timm's train.py does;
* ``torch.compile`` of K=2 paired variants under bf16 + fused AdamW + channels_last and progressive
  resizing: no graph break, one graph per resolution at most, never a silent fall back to eager;
* ``training.deterministic=1`` with a resampled position embedding is refused on CUDA.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import write_tiny_config
from fastvit_reduce import checkpoint as ckpt
from fastvit_reduce import trainer as trainer_mod
from fastvit_reduce.augment import batch as batch_mod
from fastvit_reduce.config import ConfigError, load_config, resolved
from fastvit_reduce.data import source as source_mod
from fastvit_reduce.ema import ModelEma
from fastvit_reduce.settings import SECTIONS
from fastvit_reduce.train import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ----------------------------------------------------------------------------- streams
class FakeStream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)


class FakeEvent:
    def __init__(self, *a, **k):
        self.stream = None

    def record(self, stream=None):
        self.stream = stream or current()


_local = threading.local()
MAIN = FakeStream("main")


def current():
    return getattr(_local, "stream", MAIN)


class fake_stream_ctx:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.before, _local.stream = current(), self.stream

    def __exit__(self, *exc):
        _local.stream = self.before


@pytest.mark.parametrize("overlap", ["ahead", "decode", "none"])
def test_the_side_stream_is_never_current_outside_the_augmentation(tmp_path, monkeypatch, overlap):
    seen = {}  # what -> set of stream names it ran on
    batches = []  # (event, waited-for by main before the step that used it)

    def on(what, fn):
        def wrapped(*a, **k):
            seen.setdefault(what, set()).add(current().name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch.cuda, "stream", fake_stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    init = source_mod.FfcvSource.__init__

    def with_side_stream(self, *a, **k):
        init(self, *a, **k)
        self.side_stream = FakeStream("side")
    monkeypatch.setattr(source_mod.FfcvSource, "__init__", with_side_stream)
    monkeypatch.setattr(batch_mod.BatchAugment, "__call__", on("augment", batch_mod.BatchAugment.__call__))
    step = trainer_mod.Variant.micro_step

    def micro_step(self, x, y, **k):
        seen.setdefault("micro_step", set()).add(current().name)
        batches.append(len(MAIN.waited))
        return step(self, x, y, **k)
    monkeypatch.setattr(trainer_mod.Variant, "micro_step", micro_step)
    monkeypatch.setattr(trainer_mod.Variant, "optimizer_step", on("optimizer_step", trainer_mod.Variant.optimizer_step))
    monkeypatch.setattr(ModelEma, "update", on("ema", ModelEma.update))
    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", on("evaluate", trainer_mod.Trainer.evaluate))
    monkeypatch.setattr(ckpt, "save", on("save", ckpt.save))
    MAIN.waited.clear()
    config = write_tiny_config(tmp_path)
    assert main(["--config", config, f"--training.overlap={overlap}", "--logging.experiment=s"]) == 0
    assert seen["augment"] == {"side"}
    for what in ("micro_step", "optimizer_step", "ema", "evaluate", "save"):
        assert seen[what] == {"main"}, (what, seen)
    events = MAIN.waited
    assert events and all(e.stream is not None and e.stream.name == "side" for e in events)
    assert batches == list(range(1, len(batches) + 1))  # step k came after main waited for batch k


# ----------------------------------------------------------------------------- host syncs
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "masked_scatter",
            "_assert_async", "unique", "_unique2", "repeat_interleave", "equal"}


class SyncRecorder(TorchDispatchMode):
    """Names of the ops that would make a CUDA host wait (recorded while ``active``)."""

    def __init__(self):
        super().__init__()
        self.active, self.found = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.active:
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))
            if name in SYNC_OPS or bool_index:
                self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_steady_steps_make_no_host_sync(tmp_path, monkeypatch, amp):
    from fastvit_reduce.augment import randaugment
    monkeypatch.setattr(randaugment, "_choose_path", lambda device, path=None: "where")  # the CUDA path
    rec = SyncRecorder()
    host_reads = []
    for name in ("cpu", "tolist", "numpy"):  # no dispatch on a CPU tensor: watch the methods
        original = getattr(torch.Tensor, name)

        def watched(self, *a, __name=name, __original=original, **k):
            if rec.active:
                host_reads.append(__name)
            return __original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, watched)
    epoch = source_mod.FfcvSource.epoch

    def steps(self, e, skip=0):  # recording from the second batch on; one non-finite batch
        for i, (x, y, ready) in enumerate(epoch(self, e, skip)):
            if i == 3:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            rec.active = i >= 1 and e == 0
            yield x, y, ready
        rec.active = False
    monkeypatch.setattr(source_mod.FfcvSource, "epoch", steps)
    evaluate = trainer_mod.Trainer.evaluate

    def epoch_end(self, *a, **k):
        rec.active = False  # evaluation and logging at the epoch end may read back
        return evaluate(self, *a, **k)
    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", epoch_end)
    config = write_tiny_config(tmp_path, reduction="{strategy: baseline}")
    pair = write_tiny_config(tmp_path, "grouped.yaml", reduction="{strategy: grouped, group_size: 2}")
    with rec:
        code = main(["--config", config, "--pair-with", pair, f"--training.amp={amp}", "--optim.fused=1",
                     "--training.overlap=decode", "--logging.every_steps=1000", "--training.epochs=1",
                     "--augment.randaugment=rand-m9-mstd0.5-inc1", "--augment.mixup=0.8", "--augment.cutmix=1.0",
                     "--augment.reprob=0.25", "--training.max_nonfinite=100"])
    assert code == 0
    assert rec.found == [] and host_reads == [], (rec.found, host_reads)
    final = (tmp_path / "runs" / "tiny" / "final.json").read_text()
    assert '"updates": 8' in final  # the skipped update counts, as in timm


# ----------------------------------------------------------------------------- skipped updates
def _variant(tmp_path, fused: int, amp: str):
    from fastvit_reduce.recipe import batch_plan
    from fastvit_reduce.runs import RunFolder
    from fastvit_reduce.runtime import Dist
    load_config(["--config", write_tiny_config(tmp_path), f"--optim.fused={fused}", f"--training.amp={amp}",
                 "--ema.decay=0.5"], SECTIONS)
    cfg = resolved(SECTIONS)
    return trainer_mod.Variant(cfg, Dist("cpu"), RunFolder(tmp_path / f"v{fused}{amp}"), batch_plan(cfg, 1), False)


@pytest.mark.parametrize("fused, amp", [(1, "off"), (0, "off"), (1, "fp16"), (0, "fp16"), (1, "bf16")])
def test_a_skipped_update_means_the_same_on_every_path(tmp_path, fused, amp):
    torch.manual_seed(0)
    v = _variant(tmp_path, fused, amp)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    v.micro_step(x, y, update=True, group=1)
    v.optimizer_step(1e-3)  # one good update: AdamW has state, the EMA copied the model (decay 0 at step 1)
    with torch.no_grad():
        for p in v.ema.module.parameters():
            p.add_(1.0)  # the EMA away from the model, to see it move
    weights = {k: t.clone() for k, t in v.model.state_dict().items()}
    state = {k: t.clone() for k, t in v.optimizer.state_dict()["state"][0].items()}
    ema = [p.clone() for p in v.ema.module.parameters()]
    v.micro_step(torch.full_like(x, float("nan")), y, update=True, group=1)
    v.optimizer_step(1e-3)
    assert all(torch.equal(weights[k], t) for k, t in v.model.state_dict().items())  # weights kept
    assert all(torch.equal(state[k], t) for k, t in v.optimizer.state_dict()["state"][0].items())  # AdamW kept
    assert v.updates == 2 and int(v.consecutive_bad) == 1  # counted, and remembered as bad
    moved = [e - p for e, p in zip(ema, v.ema.module.parameters())]
    assert all(torch.allclose(m, torch.full_like(m, 0.5)) for m in moved)  # the EMA updated (decay 0.5)


# ----------------------------------------------------------------------------- compile
@pytest.mark.slow  # inductor compiles the paired step
def test_compiled_paired_variants_never_fall_back_to_eager(tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    graphs, runs = [], []

    def backend(gm, example_inputs):  # aot_eager: dynamo's graphs and guards, without inductor's minutes
        from torch._dynamo.backends.common import aot_autograd
        graphs.append(len(gm.graph.nodes))
        inner = aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

        def run(*args):
            runs.append(1)
            return inner(*args)
        return run
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **k: real_compile(model, backend=backend))
    config = write_tiny_config(tmp_path, reduction="{strategy: baseline}")
    pair = write_tiny_config(tmp_path, "grouped.yaml", reduction="{strategy: grouped, group_size: 2}")
    code = main(["--config", config, "--pair-with", pair, "--training.compile=1", "--training.amp=bf16",
                 "--optim.fused=1", "--training.channels_last=1", "--training.epochs=2",
                 "--resolution.min_res=16", "--resolution.max_res=32", "--resolution.start_ramp=0",
                 "--resolution.end_ramp=1", "--model.img_size=32"])
    assert code == 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch._dynamo.config.fail_on_recompile_limit_hit and torch._dynamo.config.recompile_limit >= 5
    steps = 2 * 8  # 2 epochs x 8 batches, each through both variants' compiled forward
    assert len(runs) == 2 * steps  # every step of both variants ran a compiled graph: no eager fallback
    assert 2 <= len(graphs) <= 2 * 2  # at most one graph per variant and resolution (16, then 32)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- determinism
def test_deterministic_cuda_with_a_resampled_pos_embed_is_refused():
    from fastvit_reduce.recipe import check_determinism
    load_config(["--training.deterministic=1", "--model.img_size=224", "--resolution.min_res=160",
                 "--resolution.max_res=224", "--resolution.end_ramp=10"], SECTIONS)
    cfg = resolved(SECTIONS)
    with pytest.raises(ConfigError, match="bicubically.*no deterministic CUDA"):
        check_determinism(cfg, "cuda")
    check_determinism(cfg, "cpu")  # CPU kernels are deterministic
    check_determinism({**cfg, "resolution.min_res": 224}, "cuda")  # one resolution: nothing resampled


def test_the_ema_keeps_foreach_when_given_its_own_device_by_another_name():
    model = torch.nn.Linear(3, 3)
    assert ModelEma(model, device="cpu").foreach and ModelEma(model).foreach
    assert Path(trainer_mod.__file__).name == "trainer.py"


@pytest.mark.slow  # a fresh interpreter that compiles an ffcv pipeline
def test_another_numba_without_the_cache_internals_compiles_uncached_with_one_warning(tmp_path):
    """The box's numba may differ: the cache's private imports failing must cost one warning,
    never an ImportError (a planted failing import stands in for a numba that moved them)."""
    import subprocess
    import sys
    from conftest import write_beton
    beton = write_beton(tmp_path / "d.beton", n=16, size=24, write_mode="jpg")
    code = f"""
import sys, warnings
import numba.core.caching
del numba.core.caching._SourceFileBackedLocatorMixin  # a numba that moved one of the private classes
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from fastvit_reduce.data import jit
    from fastvit_reduce.data.loaders import create_train_loader, set_epoch
    loader = create_train_loader({beton!r}, 8, "cpu", res=16, num_workers=1, in_memory=True, batches_ahead=1,
                                 drop_last=True, order="random", aug_repeats=1, seed=0, distributed=False,
                                 rrc_scale=(0.08, 1.0), rrc_ratio=(0.75, 4 / 3), hflip=True)
    set_epoch(loader, 0)
    n = sum(len(x) for x, _ in loader)
    loader.close()
mine = [str(w.message) for w in caught if "cache internals" in str(w.message)]
print(n, jit.MISSING is not None, len(mine), jit.stats())
"""
    env = dict(__import__("os").environ, FASTVIT_REDUCE_JIT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:3] == ["16", "True", "1"], r.stdout
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.nbi"))
