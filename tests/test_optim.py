"""Optimiser groups, learning-rate schedules and gradient clipping, as the official train_net.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_run import make_shapes, tiny_config
from torch import nn

from m2f_lite import engine
from m2f_lite.config import get_config
from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.optim import (
    NORM_TYPES,
    WarmupMultiStepLR,
    WarmupPolyLR,
    build_lr_scheduler,
    build_optimizer,
    param_groups,
)


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(Path("unused"), Path("unused")))
    # a tiny Swin in place of the ResNet: its relative_position_bias_table must not decay
    m.backbone = build_backbone(
        "swin_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    return m


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_follow_the_official_rules(model):
    groups = param_groups(model, base_lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
    of = _group_of(groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(of) == len(trainable) == sum(len(g["params"]) for g in groups)  # each exactly once
    modules = dict(model.named_modules())
    seen = {"norm": 0, "embedding": 0, "bias_table": 0, "backbone": 0, "decayed_bias": 0}
    for name, p in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        module, group = modules[module_name], of[id(p)]
        assert group["lr"] == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4)
        seen["backbone"] += name.startswith("backbone.")
        if isinstance(module, NORM_TYPES):
            assert group["weight_decay"] == 0.0, name
            seen["norm"] += 1
        elif isinstance(module, nn.Embedding):
            assert group["weight_decay"] == 0.0, name
            seen["embedding"] += 1
        elif param_name == "relative_position_bias_table":
            assert group["weight_decay"] == 0.0, name
            seen["bias_table"] += 1
        else:  # conv / linear weights and their biases keep the decay, as in the official code
            assert group["weight_decay"] == 0.05, name
            seen["decayed_bias"] += param_name == "bias"
    assert all(seen.values()), seen  # every rule was exercised
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "head", "head_no_decay"}


def test_frozen_parameters_are_left_out(model):
    first = next(model.backbone.parameters())
    first.requires_grad_(False)
    try:
        groups = param_groups(model, base_lr=1e-4, weight_decay=0.05)
        assert id(first) not in _group_of(groups)
    finally:
        first.requires_grad_(True)


def test_build_optimizer_is_adamw_with_the_config_values(model):
    cfg = get_config("coco_panoptic_r50")
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert (
        lrs["backbone"] == pytest.approx(cfg.solver.base_lr * 0.1)
        and lrs["head"] == cfg.solver.base_lr
    )


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_multistep_schedule_matches_detectron2_at_key_iterations():
    # detectron2 WarmupMultiStepLR: linear warmup from factor f, then gamma at each step
    s = WarmupMultiStepLR(_optimizer(), max_iter=368750, steps=(327778, 355092), gamma=0.1, warmup_iters=10, warmup_factor=0.001)  # fmt: skip
    expected = {0: 0.001, 5: 0.001 * 0.5 + 0.5, 9: 0.001 * 0.1 + 0.9, 10: 1.0, 327777: 1.0,
                327778: 0.1, 355091: 0.1, 355092: 0.01, 368749: 0.01}  # fmt: skip
    for it, factor in expected.items():
        assert s.factor(it) == pytest.approx(factor, rel=1e-12), it
    # the official recipes use warmup factor 1: no warmup at all
    official = build_lr_scheduler(get_config("coco_panoptic_r50"), _optimizer())
    assert [official.factor(i) for i in (0, 5, 10)] == [1.0, 1.0, 1.0]
    # steps beyond max_iter are ignored (detectron2 warns and drops them)
    assert WarmupMultiStepLR(_optimizer(), max_iter=100, steps=(50, 200)).factor(
        150
    ) == pytest.approx(0.1)


def test_poly_schedule_matches_detectron2():
    s = WarmupPolyLR(_optimizer(), max_iter=160000, power=0.9, warmup_iters=0)
    for it in (0, 1, 80000, 159999):
        assert s.factor(it) == pytest.approx((1 - it / 160000) ** 0.9, rel=1e-12)
    warm = WarmupPolyLR(_optimizer(), max_iter=100, power=0.9, warmup_iters=10, warmup_factor=0.1)
    assert warm.factor(5) == pytest.approx((0.1 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)


def test_stepping_sets_every_group_and_resuming_rebuilds_the_same_lr(model):
    cfg = get_config("ade20k_semantic_r50", ["solver.max_iter=20"])
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    for it in range(7):
        for g in opt.param_groups:
            base = cfg.solver.base_lr * (0.1 if g["name"].startswith("backbone") else 1.0)
            assert g["lr"] == pytest.approx(base * (1 - it / 20) ** 0.9), (it, g["name"])
        opt.step()
        sched.step()
    resumed_opt = build_optimizer(cfg, model)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed = build_lr_scheduler(cfg, resumed_opt, last_iter=6)
    assert [g["lr"] for g in resumed_opt.param_groups] == pytest.approx(
        [g["lr"] for g in opt.param_groups]
    )
    assert resumed.last_epoch == sched.last_epoch == 7


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match=r"solver\.lr_scheduler='cosine'"):
        build_lr_scheduler(get_config("shapes_tiny", ["solver.lr_scheduler=cosine"]), _optimizer())


def test_engine_clips_the_whole_model_gradient_before_each_step(tmp_path, monkeypatch):
    norms = []

    def optimizer_with_probe(cfg, model):
        opt = build_optimizer(cfg, model)

        def probe(optimizer, args, kwargs):
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            norms.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads])
                    )
                )
            )

        opt.register_step_pre_hook(probe)
        return opt

    monkeypatch.setattr(engine, "build_optimizer", optimizer_with_probe)
    root = make_shapes(tmp_path / "shapes")
    cfg = tiny_config(
        root,
        tmp_path / "run",
        "solver.max_iter=2",
        "solver.clip_value=0.01",
        "solver.checkpoint_period=100",
    )
    engine.train(cfg)
    assert len(norms) == 2 and all(n <= 0.01 * (1 + 1e-5) for n in norms), norms
    records = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    logged = [r["grad_norm"] for r in records if "grad_norm" in r]  # measured before clipping
    assert len(logged) == 2 and all(n > 0.01 and math.isfinite(n) for n in logged)
