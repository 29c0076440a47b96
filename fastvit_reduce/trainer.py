"""The training loop: K >= 1 variants (models) stepping in turn on one stream of batches.

``fastvit_reduce.train`` turns a command line into resolved configs, run folders and a ``Dist``,
then calls ``Trainer(...).run()``. This module is the loop itself, in call order:

* ``Variant`` (``fastvit_reduce.variant``): one model's build and step;
* ``Trainer``: builds the variants, resumes them, builds the data source, then ``run``: for each
  epoch ``train_epoch`` (each batch: every variant steps), ``evaluate``, ``end_epoch`` (rows,
  ``best.pt``, ``last.pt``, ``final.json``).

Host synchronisation: losses, finiteness and counters stay on the device; the host reads them and
the ranks agree on stop signals and periodic saves every ``logging.every_steps`` updates and at
epoch ends. docs/training.md describes the recipe, resuming and the exit codes.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import runstate
from .config import ConfigError
from .data.ahead import Ahead, InPlace, hand_over
from .recipe import batch_plan, train_res, updates_per_epoch
from .runs import RunFolder, tensor_hash
from .runtime import (AMP_DTYPES, EXIT_CRASH, EXIT_OK, Dist, Preempted, StopSignal, available_cores,
                      decode_threads, log, peak_mem_mb, set_numerics)
from .seeding import derive
from .variant import Variant


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """K >= 1 variants trained on one stream of batches; ``run()`` returns the exit code.

    ``source_factory(cfg, d, mean=, std=, crop_pct=, start_epoch=, dtype=)`` builds the data
    source (``data.source.FfcvSource`` unless given: the benchmarks pass timm's loaders)."""

    def __init__(self, cfgs: list[dict], d: Dist, folders: list[RunFolder], source_factory=None):
        self.cfgs, self.cfg, self.d = cfgs, cfgs[0], d
        self.t_start = time.monotonic()
        self.plan = batch_plan(self.cfg, d.world)
        set_numerics(d.device, self.cfg["training.deterministic"])
        self.variants = self.build_variants(folders)
        if source_factory is None:  # what "the same run" means for the data (runs.data_changes)
            from .data.betons import data_fingerprints
            for v in self.variants:
                v.data = data_fingerprints(self.cfg)
        self.start_epoch, self.skip, self.epoch_stats = runstate.resume(self.variants, d)
        self.source = self.build_source(source_factory)
        self.threads = self.fix_threads()
        self.overlap = self.choose_overlap()
        self.stop = StopSignal()
        self.source.set_poll(self.poll_stop)
        self.last_save = time.monotonic()
        self.updates_done = 0  # updates stepped by this process (the cadence of host reads)
        self.decode_failed: dict[str, list[int]] = {}  # this epoch's JPEGs that failed to decode, this rank
        self.startup_s = None  # process start -> ready to train (train.main sets it)

    # ------------------------------------------------------------------ build steps
    def build_variants(self, folders: list[RunFolder]) -> list[Variant]:
        """One ``Variant`` per config (the models first: a variant's init seed does not depend on
        what else is built); paired variants must normalise alike, as the batches are made once."""
        soft = self.cfg["augment.mixup"] > 0 or self.cfg["augment.cutmix"] > 0
        variants = [Variant(c, self.d, f, {**self.plan, **batch_plan(c, self.d.world)}, soft)
                    for c, f in zip(self.cfgs, folders)]
        means = {(tuple(v.mean), tuple(v.std), v.crop_pct) for v in variants}
        if len(means) > 1:
            raise ConfigError(f"paired variants normalise differently (mean, std, crop_pct): {sorted(means)}; "
                              "pair models of one family (the batches are prepared once for all)")
        return variants

    def build_source(self, factory):
        """The batches of every variant (one source for all; the first variant's normalisation)."""
        if factory is None:
            from .data.source import FfcvSource as factory
        v0, cfg = self.variants[0], self.cfg
        dtype = AMP_DTYPES.get(cfg["training.amp"], torch.float32)
        source = factory(cfg, self.d, mean=v0.mean, std=v0.std, crop_pct=v0.crop_pct,
                         start_epoch=self.start_epoch, dtype=dtype)
        if len(source) == 0:
            raise ConfigError(f"data.train_dataset: {cfg['data.train_dataset']} gives no full batch of "
                              f"training.batch_size={cfg['training.batch_size']} per process")
        return source

    def fix_threads(self) -> int:
        """Own torch's intra-op thread count (ffcv's Loader set it to data.num_workers)."""
        threads = self.cfg["training.threads"] or available_cores()
        torch.set_num_threads(threads)
        # why read it back: torch fixes a thread's count on its first use of it, from the last
        # value set anywhere; helper threads set 1 (data.ahead.one_torch_thread), so this thread
        # must be first
        if torch.get_num_threads() != threads:
            raise RuntimeError(f"torch kept {torch.get_num_threads()} intra-op threads, not {threads}")
        return threads

    def choose_overlap(self) -> str:
        """``training.overlap`` for this source; logs the thread layout."""
        from .data.source import OVERLAP_WORDS, overlap_mode
        overlap = overlap_mode(self.cfg["training.overlap"], self.source.can_take_turns)
        if overlap == "none":
            self.source.take_turns()
        log.info(f"threads: torch {self.threads} intra-op, {decode_threads(self.cfg)} decode; overlap "
                 f"{overlap}: {OVERLAP_WORDS[overlap]} ({available_cores()} cores for this process)")
        if self.source.uses_ffcv:  # final.json: jit_cache loaded/compiled
            from .data.jit import CACHE_ENV, cache_root
            log.info(f"numba cache of the ffcv pipelines: {cache_root() or 'off'} (${CACHE_ENV})")
        return overlap

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        """Train the remaining epochs of every active variant; return the exit code."""
        cfg, d = self.cfg, self.d
        if d.main:
            for v in self.variants:
                v.folder.write_rows(v.rows)
        if self.start_epoch >= cfg["training.epochs"]:  # last.pt says done; final.json was lost
            for v in self.variants:
                v.exit_reason = "completed"
            self.save_last(self.start_epoch, 0, completed=True)
            return EXIT_OK
        p = self.plan
        log.info(f"training {', '.join(v.name for v in self.variants)}: epochs {self.start_epoch}.."
                 f"{cfg['training.epochs'] - 1} on {d.world} x {d.device.type}, per-GPU batch {p['per_gpu_batch']} "
                 f"x accumulation {p['accum']} x {d.world} = global batch {p['global_batch']}, peak lr {p['peak_lr']:g}")
        try:
            for epoch in range(self.start_epoch, cfg["training.epochs"]):
                self.train_epoch(epoch)
                last = epoch + 1 == cfg["training.epochs"]
                t_eval = time.monotonic()
                due = (epoch + 1) % cfg["validation.every_n_epochs"] == 0 or last
                try:
                    metrics = self.evaluate() if self.source.has_val and due else {}
                except Preempted as e:
                    self.save_interrupted(e, epoch, len(self.source))  # the epoch's steps are done
                self.end_epoch(epoch, metrics, eval_s=time.monotonic() - t_eval)
                if not any(v.active for v in self.variants):
                    break
                if not last and d.all_sum([float(self.stop.received is not None)])[0]:
                    raise Preempted
        except Preempted as e:
            how = "last.pt holds the state" if e.saved else "last.pt holds the last saved state"
            log.info(f"stopped by {self.stop.name}; {how}; re-run the same command to resume")
            return self.stop.exit_code
        finally:
            self.stop.restore()
            self.source.close()
        bad = [v for v in self.variants if v.exit_reason and v.exit_reason != "completed"]
        for v in bad:
            if d.main:
                print(f"error: {v.name}: {v.exit_reason}", file=sys.stderr)
        log.info(f"done: {cfg['training.epochs']} epochs, {self.elapsed(self.variants[0]):.0f} s; results in "
                 + ", ".join(str(v.folder.path / "final.json") for v in self.variants))
        return EXIT_CRASH if bad and len(bad) == len(self.variants) else EXIT_OK

    def poll_stop(self) -> None:
        """While waiting for data: a stop signal ends the wait (the last saved state stands)."""
        if self.stop.received is not None:
            raise Preempted(saved=False)

    def save_interrupted(self, e: Preempted, epoch: int, step: int) -> None:
        """A wait for data ended by a stop signal at an update boundary (``step``): one process
        saves there first, so a stop loses at most the step under way; ranks of a larger run
        are at unknown points of the epoch and keep the last saved state. Re-raises."""
        if e.saved or self.d.world > 1:
            raise e
        self.save_last(epoch, step)
        raise Preempted(saved=True) from None

    def train_epoch(self, epoch: int) -> None:
        """One epoch (or its rest after a mid-epoch resume): for each batch, each variant steps."""
        cfg, d = self.cfg, self.d
        accum, n = self.plan["accum"], len(self.source)
        per_epoch = updates_per_epoch(n, accum)
        skip, self.skip = self.skip, 0
        s = {"wait_s": 0.0, "images": 0, "wall_s": 0.0, **(self.epoch_stats if skip else {})}
        if not skip:
            for v in self.variants:
                v.reset_epoch_sums()
        t_begin = time.monotonic() - s["wall_s"]
        for v in self.variants:
            v.model.train()
        self.epoch_stats = s
        self.decode_failed = {}
        if skip >= n:  # stopped during evaluation: every step of this epoch is done
            return
        bar = tqdm(total=n, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not (d.main and cfg["logging.progress"]))
        make = lambda: self.source.epoch(epoch, skip)  # noqa: E731
        batches = Ahead(make, poll=self.poll_stop) if self.overlap == "ahead" else InPlace(make())
        every = cfg["logging.every_steps"]
        try:
            for i in range(skip, n):
                t0 = time.monotonic()
                try:
                    x, y, ready = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the train loader ended after {i} of {n} batches") from None
                except Preempted as e:
                    if i % accum:  # inside an accumulation group: the last update is the last position
                        raise
                    s["wall_s"] = time.monotonic() - t_begin
                    self.save_interrupted(e, epoch, i)
                s["wait_s"] += time.monotonic() - t0
                hand_over(x, y, ready)
                if self.variants[0].first_batch_hash is None and epoch == 0 and i == 0:
                    h = tensor_hash(x, y)
                    for v in self.variants:
                        v.first_batch_hash = h
                group_start = i - i % accum
                group = min(accum, n - group_start)  # a short last group at the epoch end
                update = i + 1 == group_start + group
                for v in self.variants:
                    if not v.active:
                        continue
                    # drop-path/dropout: the same stream for every variant and every rerun
                    torch.manual_seed(derive(cfg["training.seed"], "model", epoch, i, d.rank))
                    v.timer.start()
                    v.micro_step(x, y, update=update, group=group)
                    if update:
                        v.optimizer_step(v.lr(epoch, i // accum, per_epoch))
                    v.timer.stop()
                del x, y
                s["images"] += cfg["training.batch_size"]
                bar.update(1)
                self.updates_done += update
                # one process reads its stop flag after every update: a Ctrl-C costs at most one step
                alone_stopped = d.world == 1 and self.stop.received is not None
                if update and i + 1 < n and (self.updates_done % every == 0 or alone_stopped):
                    s["wall_s"] = time.monotonic() - t_begin
                    self.between_updates(epoch, i + 1, bar)
        finally:
            batches.close()
            bar.close()
        s["wall_s"] = time.monotonic() - t_begin

    def between_updates(self, epoch: int, step: int, bar) -> None:
        """Every ``logging.every_steps`` updates: one agreement of all ranks on stopping and on the
        periodic save, the loss read back for the progress bar, non-finite variants stopped."""
        minutes = self.cfg["checkpoint.every_minutes"]
        due = self.d.main and minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        stop, due, failed = self.d.all_sum([float(self.stop.received is not None), float(due),
                                            float(self.count_decode_failures())])
        self.check_decode_errors(epoch, int(failed), so_far=True)
        self.check_nonfinite(epoch)
        for w in self.variants:
            w.timer.read()  # why here: a log point, the device is waited for anyway
        v = self.variants[0]
        bar.set_postfix(loss=f"{float(v.loss_sum / v.loss_n.clamp(min=1)):.3f}", refresh=False)
        if stop or due:
            self.save_last(epoch, step)
        if stop:
            raise Preempted

    def count_decode_failures(self) -> int:
        """JPEGs of this epoch that failed to decode on this rank (collected from the source)."""
        for path, ix in self.source.decode_failures().items():
            self.decode_failed.setdefault(path, []).extend(ix)
        return sum(map(len, self.decode_failed.values()))

    def check_decode_errors(self, epoch: int, count: int, so_far: bool = False) -> None:
        """More than ``data.max_decode_errors`` JPEGs of an epoch (all ranks) that failed to decode
        stop the run (``LoaderError``, exit 1) with final.json saying why; fewer are a warning."""
        from .data.loaders import LoaderError
        from .data.source import describe_failures
        limit, where = self.cfg["data.max_decode_errors"], describe_failures(self.decode_failed)
        inspect = "; ".join(f"fastvit-reduce inspect --deep {shlex.quote(p)}" for p in self.decode_failed)
        if count and count <= limit and not so_far:
            log.warning(f"warning: epoch {epoch}: {count} JPEG(s) failed to decode and were used as black "
                        f"images ({where}); to list them all: {inspect}")
        if count <= limit:
            return
        for v in self.variants:
            v.exit_reason = f"{count} JPEGs failed to decode in epoch {epoch}"
            if self.d.main:
                v.folder.write_rows(v.rows)
                v.folder.write_final(self.final(v, completed=False, ranks_in_sync=True))
        raise LoaderError(f"{count} JPEG(s) failed to decode in epoch {epoch}{' so far' if so_far else ''}, "
                          f"more than data.max_decode_errors={limit} ({where or 'on other ranks'}); the file "
                          f"is damaged: rewrite it (last.pt holds the state before this epoch); to list them "
                          f"all: {inspect or 'fastvit-reduce inspect --deep FILE'}")

    def check_nonfinite(self, epoch: int) -> None:
        """Stop each variant whose loss was non-finite for ``training.max_nonfinite`` updates in a row."""
        for v in self.variants:
            if v.active and float(v.consecutive_bad) >= v.cfg["training.max_nonfinite"]:
                v.active = False
                v.exit_reason = (f"non-finite loss for {int(v.consecutive_bad)} consecutive updates "
                                 f"(update {v.updates}, epoch {epoch}); stopped; lower optim.lr, raise "
                                 f"lr.warmup_epochs, set training.clip_grad or training.amp=bf16")
                log.error(f"error: {v.name}: the loss was not finite for {int(v.consecutive_bad)} "
                          f"consecutive updates; this variant stops, the others go on")
                if self.d.main:
                    v.folder.write_final(self.final(v, completed=False, ranks_in_sync=True))

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict]:
        """Top-1/top-5 (%) and loss of each active variant's model and EMA over the whole val set."""
        d = self.d
        models = []  # (variant, prefix, module)
        for v in self.variants:
            if not v.active:
                continue
            models.append((v, "raw_", v.model))
            if v.ema is not None and v.cfg["ema.eval"]:
                models.append((v, "ema_", v.ema.module))
        for _, _, m in models:
            m.eval()
        k = min(5, self.cfg["model.num_classes"])
        sums = torch.zeros(3 * len(models) + 1, dtype=torch.float64, device=d.device)  # top1, top5, loss
        amp = self.variants[0].amp_dtype
        for x, labels in self.source.val():
            for j, (v, _, m) in enumerate(models):
                with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
                    logits = m(x)
                top = logits.topk(k, dim=1).indices  # (B, k)
                hit = top == labels[:, None]
                sums[3 * j] += hit[:, 0].sum()
                sums[3 * j + 1] += hit.any(dim=1).sum()
                sums[3 * j + 2] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            sums[-1] += len(labels)
        if d.world > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        out: dict[str, dict] = {}
        for v in self.variants:
            v.model.train()
        for j, (v, prefix, m) in enumerate(models):
            n = max(sums[-1], 1)
            out.setdefault(v.name, {"val_images": int(sums[-1])}).update({
                f"{prefix}top_1": 100 * sums[3 * j] / n, f"{prefix}top_5": 100 * sums[3 * j + 1] / n,
                f"{prefix}loss": sums[3 * j + 2] / n})
        return out

    # ------------------------------------------------------------------ logging and saving
    def end_epoch(self, epoch: int, metrics: dict, eval_s: float) -> None:
        """Per variant: log the row (EMA first, as timm), best.pt on a new best, last.pt, final.json."""
        d, cfg = self.d, self.cfg
        self.check_nonfinite(epoch)
        in_sync = self.ranks_in_sync()
        completed = epoch + 1 == cfg["training.epochs"]
        failed = int(d.all_sum([float(self.count_decode_failures())])[0])  # train and val
        bad_data = failed > cfg["data.max_decode_errors"]
        for v in self.variants:
            if not v.active and v.exit_reason:
                continue
            m = metrics.get(v.name, {})
            loss_sum, loss_n = d.all_sum([float(v.loss_sum), float(v.loss_n)])
            row = runstate.epoch_row(v, epoch, m, self.epoch_stats, loss=loss_sum / max(loss_n, 1), world=d.world,
                                     res=train_res(cfg, epoch), eval_s=eval_s, peak_mem_mb=peak_mem_mb(d.device),
                                     decode_errors=failed)
            v.rows.append(row)
            head = "ema_" if "ema_top_1" in m else "raw_"
            fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
            log.info(f"{v.name} epoch {epoch}: loss {row['train_loss']:.4f} top-1 {fmt(row['eval_top1'], '.2f')}"
                     f"{' (EMA)' if head == 'ema_' else ''} raw {fmt(row['raw_top_1'], '.2f')} "
                     f"lr {row['lr']:.2e} {row['train_img_s']:.0f} img/s wait {row['data_wait_frac']:.1%} "
                     f"{row['epoch_time_s']:.1f} s")
            top1 = row["eval_top1"]
            if top1 is not None and (v.best is None or top1 > v.best) and not bad_data:
                v.best = top1
                if cfg["checkpoint.save_best"]:
                    self.save(v.folder.best_pt, lambda v=v: runstate.best_state(v, epoch, top1, head.rstrip("_")))
            if completed:
                v.exit_reason = "completed"
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        if not in_sync:
            log.warning(f"epoch {epoch}: ranks hold different weights")
        self.check_decode_errors(epoch, failed)  # raises before last.pt takes this epoch in
        self.save_last(epoch + 1, 0, completed=completed, in_sync=in_sync)

    def save_last(self, epoch: int, step: int, completed: bool = False, in_sync: bool = True) -> None:
        """Write every active variant's ``last.pt`` at (``epoch``, ``step``), then their final.json.

        Paired: each old last.pt becomes prev.pt first; prev.pt files are deleted once all are
        written, so kill -9 mid-way leaves every variant able to go back to one common position."""
        d = self.d
        live = [v for v in self.variants if v.active or not v.saved_final]
        paired = len(live) > 1
        for v in live:
            if paired and d.main and v.folder.last_pt.is_file():
                os.replace(v.folder.last_pt, v.folder.prev_pt)
            self.save(v.folder.last_pt,
                      lambda v=v: runstate.last_state(v, epoch, step, self.epoch_stats, self.elapsed(v)))
        if d.main:
            for v in live:
                v.folder.prev_pt.unlink(missing_ok=True)
                v.folder.write_rows(v.rows)
                v.folder.write_final(self.final(v, completed=completed, ranks_in_sync=in_sync))
        for v in live:
            v.saved_final = not v.active or v.exit_reason == "completed"
        self.last_save = time.monotonic()
        if step:
            log.info(f"saved last.pt at epoch {epoch} step {step}")

    def save(self, path: Path, make_state) -> None:
        """Rank 0 writes ``make_state()`` atomically; every rank learns whether it worked."""
        error = None
        if self.d.main:
            try:
                ckpt.save(make_state(), path)
            except ckpt.CheckpointError as e:
                error = e
        if self.d.all_sum([float(error is not None)])[0]:
            raise error or ckpt.CheckpointError(f"rank 0 could not write {path}")

    def ranks_in_sync(self) -> bool:
        """True when every rank holds bit-identical weights (per-tensor sums agree exactly)."""
        if self.d.world == 1:
            return True
        params = [p for v in self.variants for p in v.model.parameters()]
        sums = torch.stack([p.detach().double().sum() for p in params]
                           + [p.detach().double().abs().sum() for p in params])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def elapsed(self, v: Variant) -> float:
        """Wall seconds spent on this run over all the processes that resumed it."""
        return v.elapsed_before + time.monotonic() - self.t_start

    def final(self, v: Variant, completed: bool, ranks_in_sync: bool) -> dict:
        """``final.json`` of ``v`` (``runstate.final_summary``)."""
        from .data.jit import stats as jit_stats
        process = {"world_size": self.d.world, "startup_s": self.startup_s,
                   "torch_threads": self.threads,  # CPU results are bit-exact only at one count
                   "jit_cache": jit_stats() if self.source.uses_ffcv else None}  # pipelines loaded / compiled
        return runstate.final_summary(v, completed=completed, ranks_in_sync=ranks_in_sync,
                                      elapsed_s=self.elapsed(v), process=process,
                                      paired_with=[w.name for w in self.variants if w is not v])
