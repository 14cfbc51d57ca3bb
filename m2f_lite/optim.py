"""Optimiser and learning-rate schedules of the official recipes (``train_net.py``, detectron2).

Mask2Former trains with AdamW (lr 1e-4, weight decay 0.05) and three exceptions, all from the
official ``Trainer.build_optimizer``:

- parameters of any module whose name contains ``backbone`` get ``lr × BACKBONE_MULTIPLIER`` (0.1);
- Swin's ``relative_position_bias_table`` and ``absolute_pos_embed`` get no weight decay;
- parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...) get
  ``WEIGHT_DECAY_NORM`` (0.0) and those of ``nn.Embedding`` (the queries) ``WEIGHT_DECAY_EMBED`` (0.0).

Biases of other layers keep the weight decay, as in the official code. The official code makes one
parameter group per tensor; :func:`param_groups` merges tensors with the same (lr, weight decay)
into one named group, which AdamW treats identically (its update is element-wise).

The whole-model gradient norm is clipped to ``CLIP_VALUE`` (0.01, L2) before every step: the
engine calls ``torch.nn.utils.clip_grad_norm_`` over all parameters, as the official
``FullModelGradientClippingOptimizer`` does inside ``step``.

Schedules (per iteration, as detectron2's ``LRScheduler`` hook steps them):

- ``step`` (``WarmupMultiStepLR``, COCO): ``lr(it) = base · warmup(it) · γ^{#{s ∈ steps: s ≤ it}}``;
- ``poly`` (``WarmupPolyLR``, ADE20K, Cityscapes): ``lr(it) = base · warmup(it) · (1 − it/max_iter)^0.9``;

with the linear warmup ``warmup(it) = f·(1 − it/W) + it/W`` for ``it < W`` and 1 afterwards
(``f`` = ``WARMUP_FACTOR``, ``W`` = ``WARMUP_ITERS``; the official recipes use f = 1, so their
warmup is a no-op).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from m2f_lite.config import Config

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)  # the official list (detectron2's FrozenBatchNorm2d has no parameters)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")  # Swin


def param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 0.1,
) -> list[dict]:
    """AdamW parameter groups with the official per-parameter lr and weight decay (module doc).

    Returns groups ``{"name", "params", "lr", "weight_decay"}`` named ``backbone``,
    ``backbone_no_decay``, ``head`` and ``head_no_decay`` (empty ones left out; a "no decay" group
    holds the norm, embedding and Swin table parameters, whose decay is ``weight_decay_norm``,
    ``weight_decay_embed`` or 0). Frozen parameters (``requires_grad=False``) are left out.
    """
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_backbone = "backbone" in module_name
            lr = base_lr * backbone_multiplier if in_backbone else base_lr
            decay = weight_decay
            if any(name in param_name for name in NO_DECAY_NAMES):
                decay = 0.0
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            name = ("backbone" if in_backbone else "head") + (
                "" if decay == weight_decay else "_no_decay"
            )
            groups.setdefault((name, lr, decay), []).append(param)
    return [
        {"name": name, "params": params, "lr": lr, "weight_decay": decay}
        for (name, lr, decay), params in groups.items()
    ]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.solver``'s lr and weight decays."""
    s = cfg.solver
    groups = param_groups(
        model,
        base_lr=s.base_lr,
        weight_decay=s.weight_decay,
        weight_decay_norm=s.weight_decay_norm,
        weight_decay_embed=s.weight_decay_embed,
        backbone_multiplier=s.backbone_multiplier,
    )
    return torch.optim.AdamW(groups, lr=s.base_lr, weight_decay=s.weight_decay)


def warmup_factor_at(it: int, *, warmup_iters: int, warmup_factor: float) -> float:
    """detectron2's linear warmup: ``f·(1 − it/W) + it/W`` for ``it < W``, else 1."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


class WarmupMultiStepLR(LRScheduler):
    """``lr = base · warmup(it) · gamma^(number of steps ≤ it)`` (detectron2's WarmupMultiStepLR).

    Steps beyond ``max_iter`` are ignored, as detectron2 ignores them (with a warning there).
    ``last_epoch`` counts iterations.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_iter: int,
        steps: tuple[int, ...],
        gamma: float = 0.1,
        warmup_iters: int = 10,
        warmup_factor: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if list(steps) != sorted(steps):
            raise ValueError(f"steps={steps}: expected increasing iterations")
        self.steps = [s for s in steps if s <= max_iter]
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        """The multiplier of the base lr at iteration ``it``."""
        warmup = warmup_factor_at(
            it, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor
        )
        return warmup * self.gamma ** bisect_right(self.steps, it)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class WarmupPolyLR(LRScheduler):
    """``lr = base · warmup(it) · (1 − it/max_iter)^power`` (DeepLab's WarmupPolyLR, which the
    official ``train_net.py`` imports from detectron2's DeepLab project; constant ending 0)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_iter: int,
        power: float = 0.9,
        warmup_iters: int = 0,
        warmup_factor: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        self.max_iter = max_iter
        self.power = power
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        """The multiplier of the base lr at iteration ``it``."""
        warmup = warmup_factor_at(
            it, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor
        )
        return warmup * math.pow(1.0 - it / self.max_iter, self.power)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def build_lr_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, *, last_iter: int = -1
) -> LRScheduler:
    """``WarmupMultiStepLR`` (``solver.lr_scheduler="step"``) or ``WarmupPolyLR`` (``"poly"``).

    ``last_iter``: the last iteration done (resume: steps done − 1; the optimizer's groups must
    then hold ``initial_lr``, as a loaded optimizer state does). The schedule is rebuilt from the
    config rather than loaded, so that a resumed run with a new ``solver.max_iter`` follows it.
    """
    s = cfg.solver
    if s.lr_scheduler == "step":
        return WarmupMultiStepLR(
            optimizer,
            max_iter=s.max_iter,
            steps=tuple(s.steps),
            gamma=s.gamma,
            warmup_iters=s.warmup_iters,
            warmup_factor=s.warmup_factor,
            last_epoch=last_iter,
        )
    if s.lr_scheduler == "poly":
        return WarmupPolyLR(
            optimizer,
            max_iter=s.max_iter,
            power=s.poly_power,
            warmup_iters=s.warmup_iters,
            warmup_factor=s.warmup_factor,
            last_epoch=last_iter,
        )
    raise ValueError(f"solver.lr_scheduler={s.lr_scheduler!r}: expected 'step' or 'poly'")
