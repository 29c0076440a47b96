"""fastvit_reduce.trainer: a Variant's optimizer. The trainer's runs are tested through the
command: tests/test_train.py in this process, tests/e2e/test_train_cli.py as real processes."""
from __future__ import annotations

from types import SimpleNamespace


def test_optimizer_has_no_weight_decay_on_1d_params_pos_embed_and_cls_token():
    from fastvit_reduce.models import create_model
    from fastvit_reduce.trainer import Variant

    model = create_model("test_vit", strategy="grouped", num_classes=4, img_size=32, patch_size=8)
    cfg = {"optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.fused": 1}
    opt = Variant.build_optimizer(SimpleNamespace(cfg=cfg, model=model, plan={"peak_lr": 1e-3}))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(p.ndim > 1 for n, p in model.named_parameters() if n in decayed)
    assert {"pos_embed", "cls_token"} <= set(names.values()) and not decayed & {"pos_embed", "cls_token"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)  # shared MLP tensors once
