"""One model of a run: its build (timm + strategy, fused AdamW, scaler, EMA, DDP/compile) and its step.

``Variant.micro_step`` is the forward and backward of one micro-batch; ``optimizer_step`` the update
(skipped on the device after a non-finite loss), the lr, clipping and the EMA. ``trainer.Trainer``
steps every variant of a (paired) run on each batch; the GPU check measures this same step.
"""
from __future__ import annotations

import contextlib

import torch
from timm.data import resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ema import ModelEma
from .models import gflops, mlp_stats, model_from_cfg
from .recipe import check_determinism, check_resolutions, lr_at, needs_dynamic_size, train_resolutions
from .runs import RunFolder
from .runtime import AMP_DTYPES, Dist, log
from .seeding import derive
from .steptime import ComputeTimer


def compiled(model: nn.Module, resolutions: int) -> nn.Module:
    """``torch.compile(model)`` that never falls back to eager without a word: Dynamo may compile
    once per train resolution (progressive resizing) plus slack, and hitting that limit is an error
    (Dynamo's default is to run the frame eagerly from then on, silently)."""
    import torch._dynamo.config as dynamo
    dynamo.recompile_limit = max(dynamo.recompile_limit, resolutions + 2)
    dynamo.fail_on_recompile_limit_hit = True
    return torch.compile(model)



class Variant:
    """Everything one model of a (paired) run owns: model, optimizer, scaler, EMA, DDP/compile
    wrappers, run folder and log rows."""

    def __init__(self, cfg: dict, d: Dist, folder: RunFolder, plan: dict, soft_targets: bool):
        self.cfg, self.d, self.folder, self.plan = cfg, d, folder, plan
        self.name = folder.name
        self.model = self.build_model()
        self.optimizer = self.build_optimizer()
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.amp_dtype = AMP_DTYPES.get(cfg["training.amp"])
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg["training.amp"] == "fp16")
        self.criterion = (SoftTargetCrossEntropy() if soft_targets
                          else nn.CrossEntropyLoss(label_smoothing=cfg["training.label_smoothing"]))
        self.ddp = (DistributedDataParallel(self.model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
                    if d.world > 1 else None)
        wrapped = self.ddp or self.model
        self.train_model = compiled(wrapped, len(train_resolutions(cfg))) if cfg["training.compile"] else wrapped
        self.ema = (ModelEma(self.model, cfg["ema.decay"], shared_tensors=cfg["ema.shared_tensors"])
                    if cfg["ema.decay"] > 0 else None)
        # counters (device tensors: read by the host every logging.every_steps updates)
        dev = d.device
        self.updates, self.best, self.rows, self.elapsed_before = 0, None, [], 0.0
        self.consecutive_bad = torch.zeros((), device=dev)   # updates in a row with a non-finite loss
        self.group_bad = torch.zeros((), device=dev)          # non-finite micro-steps in this group
        self.active, self.exit_reason, self.saved_final = True, None, False
        self.first_batch_hash = None
        self.timer = ComputeTimer(dev)  # this variant's own step time (a paired run shares the wall clock)
        self.data = None  # fingerprints of the .beton files (set by Trainer; None for other sources)
        self.reset_epoch_sums()

    def build_model(self) -> nn.Module:
        """timm ViT + strategy on the device; records its size and timm's mean/std/crop_pct."""
        cfg, img = self.cfg, self.cfg["model.img_size"]
        check_determinism(cfg, self.d.device.type)
        dynamic = needs_dynamic_size(cfg)
        # same seed for every variant: those built from the full model start from the same
        # weights before their surgery; thin draws its own widths from the same stream
        model = model_from_cfg(cfg, dynamic_img_size=dynamic, seed=derive(cfg["training.seed"], "init"))
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if dynamic and patch:
            check_resolutions(cfg, patch)
        stats = mlp_stats(model)
        self.stats = {"params": stats["params"], "mlp_params": stats["mlp_params"],
                      "gflops": round(gflops(model, img), 4)}
        data_cfg = resolve_data_config({}, model=model)  # timm: the arch's mean/std/crop_pct
        self.mean, self.std = data_cfg["mean"], data_cfg["std"]
        self.crop_pct = cfg["data.crop_pct"] or data_cfg["crop_pct"]
        log.info(f"{self.name}: {cfg['model.arch']} ({cfg['reduction.strategy']}) {self.stats['params']:,} params, "
                 f"{stats['mlp_params']:,} in {stats['unique_mlps']} MLPs (hidden {stats['mlp_hidden']}), "
                 f"{self.stats['gflops']:.3f} GFLOPs/img at {img}px")
        model.to(self.d.device)
        if cfg["training.channels_last"]:
            model.to(memory_format=torch.channels_last)
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        """timm's AdamW param groups (no decay on 1-D params and ``no_weight_decay()`` names)."""
        cfg = self.cfg
        kwargs = dict(lr=self.plan["peak_lr"], weight_decay=cfg["optim.weight_decay"],
                      betas=tuple(cfg["optim.betas"]), eps=cfg["optim.eps"])
        if cfg["optim.fused"]:
            try:
                return create_optimizer_v2(self.model, "adamw", fused=True, **kwargs)
            except (RuntimeError, ValueError) as e:
                log.info(f"fused AdamW unavailable here ({e}); using foreach")
        return create_optimizer_v2(self.model, "adamw", foreach=True, **kwargs)

    def lr(self, epoch: int, update: int, per_epoch: int) -> float:
        """The lr of update ``update`` of ``epoch`` (``recipe.lr_at``: timm's schedule)."""
        return lr_at(self.cfg, self.plan["peak_lr"], epoch, update, per_epoch)

    def reset_epoch_sums(self, carry: dict | None = None) -> None:
        dev = self.d.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.loss_n = torch.zeros((), dtype=torch.float64, device=dev)
        self.lr_sum, self.lr_n = 0.0, 0
        self.timer.reset(carry.get("compute_s", 0.0) if carry else 0.0)
        if carry:
            self.loss_sum += carry.get("loss_sum", 0.0)
            self.loss_n += carry.get("loss_n", 0.0)
            self.lr_sum, self.lr_n = carry.get("lr_sum", 0.0), carry.get("lr_n", 0)

    # ------------------------------------------------------------------ one step
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, update: bool, group: int) -> None:
        """Forward and backward on one micro-batch (gradients of a group accumulate)."""
        sync = self.ddp.no_sync() if self.ddp is not None and not update else contextlib.nullcontext()
        with sync:
            with torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.criterion(self.train_model(x), y)
            self.scaler.scale(loss / group).backward()
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_n += finite
        self.group_bad += ~finite
        # the graph is freed by backward; the next variant's forward starts with this one's
        # activations gone

    def optimizer_step(self, lr: float) -> None:
        """One update from the group's gradients, skipped when a loss of the group was non-finite on
        any rank: the weights and AdamW's state stay as they were. Skipped or not, the update is
        counted and the EMA updated, as timm's train.py does when its GradScaler skips a step.

        No host read on the paths a GPU runs: fused AdamW skips on the device (its ``found_inf``),
        and under fp16 the GradScaler's own ``found_inf``, which a non-finite loss reaches through
        one poisoned gradient. Only foreach AdamW (``optim.fused=0``, the CPU demo) asks the host."""
        bad = self.d.all_max_(self.group_bad.clone()) > 0  # () bool on the device
        self.group_bad.zero_()
        self.consecutive_bad.copy_(torch.where(bad, self.consecutive_bad + 1, torch.zeros_like(self.consecutive_bad)))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.lr_sum, self.lr_n = self.lr_sum + lr, self.lr_n + 1
        if self.fused or not bad.item():
            self.apply_update(bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None and self.updates % self.cfg["ema.every"] == 0:
            self.ema.update(self.model, step=self.updates)

    def apply_update(self, bad: torch.Tensor) -> None:
        """The optimizer (and GradScaler) step; fused AdamW skips it on the device when ``bad``."""
        clip, scaler, opt = self.cfg["training.clip_grad"], self.scaler, self.optimizer
        if scaler.is_enabled():
            if self.fused:  # the scaler's found_inf then covers a non-finite loss too
                g = next(p.grad for p in self.model.parameters() if p.grad is not None)
                g.add_(torch.where(bad, float("nan"), 0.0).to(g.dtype))
            if clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            scaler.step(opt)  # fused: grad_scale and found_inf go to the kernel, no host read
            scaler.update()
            return
        if clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.fused:
            opt.found_inf = bad.float()  # torch's fused AdamW skips the step where found_inf is 1
            opt.step()
            del opt.found_inf
        else:
            opt.step()
