"""Checks for the exercises of chapter 9, "Training end to end".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint. The expected answers come from the package:
the schedulers of ``m2f_lite.optim``, its ``param_groups``, the data stream of
``m2f_lite.sampler`` and the resume rules of ``m2f_lite.checkpoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from m2f_lite.checkpoint import RESUME_SAFE_KEYS
from m2f_lite.config import SolverConfig, get_config
from m2f_lite.optim import WarmupMultiStepLR, WarmupPolyLR, param_groups
from m2f_lite.sampler import GlobalBatchSampler

COCO_TRAIN_IMAGES = 118_287  # COCO train2017


def _call(fn: Callable, *args, what: str, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # the student's code: report, do not crash the check
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


def _scheduler(solver: SolverConfig) -> WarmupMultiStepLR | WarmupPolyLR:
    """The package's scheduler for ``solver`` on a one-parameter optimizer with lr = 1."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    common = {
        "max_iter": solver.max_iter,
        "warmup_iters": solver.warmup_iters,
        "warmup_factor": solver.warmup_factor,
    }
    if solver.lr_scheduler == "step":
        return WarmupMultiStepLR(opt, steps=tuple(solver.steps), gamma=solver.gamma, **common)
    return WarmupPolyLR(opt, power=solver.poly_power, **common)


def reference_lr(solver: SolverConfig, it: int) -> float:
    """The package's learning rate after ``it`` optimizer steps (of the "head" parameters)."""
    return solver.base_lr * _scheduler(solver).factor(it)


# --- Ex. 1: the learning rate at iteration i -----------------------------------------------------


def _ex1_cases() -> list[tuple[str, int, str]]:
    """(preset, iteration, what the iteration tests)."""
    return [
        ("shapes_tiny", 0, "the first step (warmup starts at warmup_factor × base_lr)"),
        ("shapes_tiny", 25, "the middle of the linear warmup"),
        ("shapes_tiny", 50, "the end of the warmup (it == warmup_iters)"),
        ("shapes_tiny", 1000, "the middle of the poly decay"),
        ("shapes_tiny", 1999, "the last step"),
        ("ade20k_semantic_r50", 0, "a poly schedule without warmup"),
        ("ade20k_semantic_r50", 80000, "a poly schedule half-way"),
        ("coco_panoptic_r50", 5, "a step schedule during its warmup (factor 1: no-op)"),
        ("coco_panoptic_r50", 327777, "one step before the first lr drop"),
        ("coco_panoptic_r50", 327778, "exactly at the first lr drop (steps count when s <= it)"),
        ("coco_panoptic_r50", 360000, "after both lr drops"),
    ]


def _ex1_hint(solver: SolverConfig, it: int, got: float, want: float) -> str:
    base = solver.base_lr
    if solver.lr_scheduler == "poly":
        linear = want * (1 - it / solver.max_iter) ** (1 - solver.poly_power)
        if math.isclose(got, linear, rel_tol=1e-6):
            return "you decay linearly: poly raises (1 - it/max_iter) to solver.poly_power (0.9)"
    if it < solver.warmup_iters and solver.warmup_factor != 1.0:
        alpha = it / solver.warmup_iters
        if math.isclose(got, want / (solver.warmup_factor * (1 - alpha) + alpha), rel_tol=1e-6):
            return (
                "the warmup is missing: for it < warmup_iters multiply by "
                "f·(1 − it/W) + it/W (f = warmup_factor, W = warmup_iters)"
            )
    if solver.lr_scheduler == "step":
        drops = sum(s < it for s in solver.steps)
        if math.isclose(got, base * solver.gamma**drops, rel_tol=1e-6):
            return "a step s already counts at it == s: use s <= it (bisect_right), not s < it"
        return (
            "step schedule: base_lr × gamma ** (number of steps s with s <= it), times the warmup"
        )
    return "poly schedule: base_lr × warmup(it) × (1 − it/max_iter) ** poly_power"


def check_ex1(lr_fn: Callable[[SolverConfig, int], float]) -> None:
    """Ex. 1: ``lr_at(solver, it)``: the lr after ``it`` steps, for "poly" and "step" schedules,
    compared with the package's schedulers (``m2f_lite.optim``)."""
    for preset, it, what in _ex1_cases():
        solver = get_config(preset).solver
        want = reference_lr(solver, it)
        got = _call(lr_fn, solver, it, what=f"your lr_at(solver of {preset}, {it})")
        assert isinstance(got, int | float) and not isinstance(got, bool), (
            f"lr_at should return a float, got {type(got).__name__}"
        )
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-15), (
            f"{preset} ({solver.lr_scheduler} schedule), it = {it}, {what}: expected lr "
            f"{want:.6g}, got {got:.6g}. Hint: {_ex1_hint(solver, it, got, want)}"
        )


# --- Ex. 2: batch per GPU and epochs --------------------------------------------------------------

EX2_GPUS, EX2_ACCUM = 4, 2


def ex2_expected() -> dict[str, float]:
    """coco_panoptic_r50 on 4 GPUs with ``solver.grad_accum=2``, from the package's sampler."""
    solver = get_config("coco_panoptic_r50").solver
    sampler = GlobalBatchSampler(
        size=COCO_TRAIN_IMAGES,
        global_batch=solver.ims_per_batch,
        world_size=EX2_GPUS,
        grad_accum=EX2_ACCUM,
    )
    iters_per_epoch = COCO_TRAIN_IMAGES / solver.ims_per_batch
    return {
        "micro_batch": sampler.micro_batch,
        "iters_per_epoch": iters_per_epoch,
        "epochs": solver.max_iter / iters_per_epoch,
    }


def check_ex2(answer: dict[str, float] | None) -> None:
    """Ex. 2: ``{"micro_batch", "iters_per_epoch", "epochs"}`` for coco_panoptic_r50 on 4 GPUs
    with ``solver.grad_accum=2`` (COCO train2017: 118,287 images)."""
    keys = {"micro_batch", "iters_per_epoch", "epochs"}
    assert isinstance(answer, dict) and set(answer) == keys, (
        f"answer with a dict with the keys {sorted(keys)}, got {answer!r}"
    )
    want = ex2_expected()
    solver = get_config("coco_panoptic_r50").solver
    got = answer["micro_batch"]
    if got != want["micro_batch"]:
        hint = "solver.ims_per_batch is the global batch: divide it by processes × grad_accum"
        if got == solver.ims_per_batch // EX2_GPUS:
            hint = "you split the batch over the GPUs but forgot the 2 micro-batches per step"
        elif got == solver.ims_per_batch:
            hint = "16 is the global batch, summed over all GPUs and micro-batches"
        raise AssertionError(
            f"micro_batch: expected {want['micro_batch']} images per GPU per forward pass, "
            f"got {got}. Hint: {hint}"
        )
    got = answer["iters_per_epoch"]
    assert abs(got - want["iters_per_epoch"]) <= 1, (
        f"iters_per_epoch: expected about {want['iters_per_epoch']:.0f}, got {got}. Hint: one "
        "optimizer step consumes the global batch (ims_per_batch images), whatever the number of "
        "GPUs or micro-batches"
    )
    got = answer["epochs"]
    assert abs(got - want["epochs"]) <= 0.5, (
        f"epochs: expected about {want['epochs']:.1f}, got {got}. Hint: solver.max_iter "
        f"({solver.max_iter}) divided by the iterations per epoch (the recipe's file name says "
        "50ep)"
    )


# --- Ex. 3: parameter groups ---------------------------------------------------------------------


class _Toy(nn.Module):
    """A model with one parameter of every kind that ``param_groups`` treats differently."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(4))
        self.query_feat = nn.Embedding(5, 4)
        self.decoder = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.class_head = nn.Linear(4, 3)


def ex3_model() -> nn.Module:
    """The toy model of exercise 3 (a backbone, an embedding, linear layers and norms)."""
    torch.manual_seed(0)
    return _Toy()


EX3_ARGS = {"base_lr": 1e-4, "weight_decay": 0.05, "backbone_multiplier": 0.1}


def ex3_expected(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{parameter name: (lr, weight_decay)}`` from the package's ``param_groups``."""
    by_id = {}
    for group in param_groups(model, **EX3_ARGS):
        for p in group["params"]:
            by_id[id(p)] = (group["lr"], group["weight_decay"])
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def check_ex3(groups_fn: Callable[..., dict[str, tuple[float, float]]]) -> None:
    """Ex. 3: ``lr_and_decay(model, *, base_lr, weight_decay, backbone_multiplier)`` returns
    ``{parameter name: (lr, weight_decay)}`` with the official rules, compared with the package's
    ``m2f_lite.optim.param_groups``."""
    model = ex3_model()
    want = ex3_expected(model)
    got = _call(groups_fn, model, what="your lr_and_decay", **EX3_ARGS)
    assert isinstance(got, dict), f"return a dict {{name: (lr, weight_decay)}}, got {type(got)}"
    missing = sorted(set(want) - set(got))
    assert not missing, (
        f"no (lr, weight_decay) for {missing}; use the names of model.named_parameters()"
    )
    for name, (lr, decay) in want.items():
        g_lr, g_decay = got[name]
        module_path = name.rsplit(".", 1)[0]
        if not math.isclose(g_lr, lr, rel_tol=1e-9):
            hint = (
                "parameters of modules whose name contains 'backbone' get base_lr × "
                "backbone_multiplier, the others base_lr"
            )
            raise AssertionError(f"{name}: expected lr {lr:g}, got {g_lr:g}. Hint: {hint}")
        if not math.isclose(g_decay, decay, rel_tol=1e-9, abs_tol=1e-15):
            if name.endswith("bias") and decay > 0:
                hint = (
                    f"{module_path} is neither a norm layer nor an embedding: the official "
                    "code keeps the weight decay on its bias (unlike many other codebases)"
                )
            elif decay == 0:
                hint = (
                    f"{module_path} is a normalisation layer or an nn.Embedding (the queries): "
                    "weight_decay_norm = weight_decay_embed = 0 for its parameters"
                )
            else:
                hint = "only norm layers, embeddings and Swin's position tables skip the decay"
            raise AssertionError(
                f"{name}: expected weight decay {decay:g}, got {g_decay:g}. Hint: {hint}"
            )


# --- Ex. 4: what does resume do? ------------------------------------------------------------------


def ex4_expected() -> dict[str, Any]:
    """shapes_tiny trained to 1000 steps, resumed with ``solver.max_iter=2000`` (and base_lr)."""
    solver = get_config("shapes_tiny", ["solver.max_iter=2000"]).solver
    return {
        "first_iteration": 1001,
        "lr": reference_lr(solver, 1000),
        "change_base_lr": "applied" if "solver.base_lr" in RESUME_SAFE_KEYS else "refused",
    }


def check_ex4(answer: dict[str, Any] | None) -> None:
    """Ex. 4: ``{"first_iteration", "lr", "change_base_lr"}`` (module doc of the chapter)."""
    keys = {"first_iteration", "lr", "change_base_lr"}
    assert isinstance(answer, dict) and set(answer) == keys, (
        f"answer with a dict with the keys {sorted(keys)}, got {answer!r}"
    )
    want = ex4_expected()
    got = answer["first_iteration"]
    assert got == want["first_iteration"], (
        f"first_iteration: expected {want['first_iteration']}, got {got}. Hint: the checkpoint "
        "stores the optimizer steps done (1000); the loop runs range(start_iter + 1, max_iter + 1)"
    )
    got = answer["lr"]
    assert isinstance(got, int | float) and math.isclose(got, want["lr"], rel_tol=1e-4), (
        f"lr: expected {want['lr']:.4g}, got {got}. Hint: the schedule is rebuilt from the new "
        "config (max_iter = 2000), not loaded: the poly factor is (1 − 1000/2000)^0.9, not the "
        "≈ 0 the 1000-step run ended with"
    )
    got = answer["change_base_lr"]
    assert got == want["change_base_lr"], (
        f"change_base_lr: expected {want['change_base_lr']!r}, got {got!r}. Hint: "
        "check_resume_config allows only the fields in RESUME_SAFE_KEYS to differ"
    )
