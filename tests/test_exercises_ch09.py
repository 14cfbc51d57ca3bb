"""The chapter 9 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import math
from bisect import bisect_right

import pytest
from torch import nn

from m2f_lite.exercises import ch09


def lr_at(solver, it):
    if it < solver.warmup_iters:
        alpha = it / solver.warmup_iters
        warmup = solver.warmup_factor * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if solver.lr_scheduler == "poly":
        return solver.base_lr * warmup * (1 - it / solver.max_iter) ** solver.poly_power
    return solver.base_lr * warmup * solver.gamma ** bisect_right(solver.steps, it)


def test_ex1_lr_at():
    ch09.check_ex1(lr_at)

    def no_warmup(solver, it):
        return lr_at(solver.__class__(**{**vars(solver), "warmup_iters": 0}), it)

    with pytest.raises(AssertionError, match="warmup is missing"):
        ch09.check_ex1(no_warmup)

    def linear(solver, it):
        if solver.lr_scheduler == "poly":
            return lr_at(solver, it) * (1 - it / solver.max_iter) ** (1 - solver.poly_power)
        return lr_at(solver, it)

    with pytest.raises(AssertionError, match="linearly"):
        ch09.check_ex1(linear)

    def strict_steps(solver, it):
        if solver.lr_scheduler == "step":
            return solver.base_lr * solver.gamma ** sum(s < it for s in solver.steps)
        return lr_at(solver, it)

    with pytest.raises(AssertionError, match="bisect_right"):
        ch09.check_ex1(strict_steps)
    with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
        ch09.check_ex1(lambda solver, it: 1 / 0)


def test_ex2_batch_and_epochs():
    right = {"micro_batch": 2, "iters_per_epoch": 118287 / 16, "epochs": 368750 * 16 / 118287}
    ch09.check_ex2(right)
    assert math.isclose(right["epochs"], ch09.ex2_expected()["epochs"])
    with pytest.raises(AssertionError, match="forgot the 2 micro-batches"):
        ch09.check_ex2({**right, "micro_batch": 4})
    with pytest.raises(AssertionError, match="global batch"):
        ch09.check_ex2({**right, "micro_batch": 16})
    with pytest.raises(AssertionError, match="iters_per_epoch"):
        ch09.check_ex2({**right, "iters_per_epoch": 118287 / 4})  # per-GPU batch
    with pytest.raises(AssertionError, match="epochs"):
        ch09.check_ex2({**right, "epochs": 368750 * 4 / 118287})
    with pytest.raises(AssertionError, match="keys"):
        ch09.check_ex2(None)


NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def lr_and_decay(model, *, base_lr, weight_decay, backbone_multiplier):
    out = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            lr = base_lr * (backbone_multiplier if "backbone" in module_name else 1.0)
            decay = 0.0 if isinstance(module, (*NORMS, nn.Embedding)) else weight_decay
            out[f"{module_name}.{name}" if module_name else name] = (lr, decay)
    return out


def test_ex3_param_groups():
    ch09.check_ex3(lr_and_decay)

    def biases_without_decay(model, **kwargs):
        out = lr_and_decay(model, **kwargs)
        return {k: (lr, 0.0 if k.endswith("bias") else wd) for k, (lr, wd) in out.items()}

    with pytest.raises(AssertionError, match="keeps the weight decay on its bias"):
        ch09.check_ex3(biases_without_decay)

    def decay_everywhere(model, **kwargs):
        return {
            k: (lr, kwargs["weight_decay"]) for k, (lr, _) in lr_and_decay(model, **kwargs).items()
        }

    with pytest.raises(AssertionError, match=r"normalisation layer or an nn\.Embedding"):
        ch09.check_ex3(decay_everywhere)

    def no_multiplier(model, **kwargs):
        return lr_and_decay(model, **{**kwargs, "backbone_multiplier": 1.0})

    with pytest.raises(AssertionError, match="backbone_multiplier"):
        ch09.check_ex3(no_multiplier)
    with pytest.raises(AssertionError, match="no \\(lr, weight_decay\\)"):
        ch09.check_ex3(lambda model, **kwargs: {})


def test_ex4_resume():
    right = {"first_iteration": 1001, "lr": 1e-3 * 0.5**0.9, "change_base_lr": "refused"}
    ch09.check_ex4(right)
    with pytest.raises(AssertionError, match="range"):
        ch09.check_ex4({**right, "first_iteration": 1000})
    with pytest.raises(AssertionError, match="rebuilt from the new config"):
        ch09.check_ex4({**right, "lr": 0.0})
    with pytest.raises(AssertionError, match="RESUME_SAFE_KEYS"):
        ch09.check_ex4({**right, "change_base_lr": "applied"})
    with pytest.raises(AssertionError, match="keys"):
        ch09.check_ex4({"first_iteration": 1001})
