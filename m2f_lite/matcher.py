"""Hungarian matching of predictions to targets on point-sampled costs (Sec. 3.3 of the paper).

Mask2Former, like DETR and MaskFormer, trains with a *set* loss: each target is assigned to exactly
one of the Q predictions by a minimum-cost bipartite matching, and the unmatched predictions learn
"no object". The cost of pairing prediction i with target j is (the paper's λ: Sec. 4)

    C[i, j] = λ_cls · (−p_i(c_j)) + λ_ce · BCE(m_i, m_j) + λ_dice · Dice(m_i, m_j),
    λ_cls = 2, λ_ce = λ_dice = 5,

with p_i(c_j) the predicted probability of the target's class (−p rather than −log p, as in DETR)
and the mask terms computed on K = 12544 points drawn uniformly at random, *the same points for all
predictions and targets of an image*, so that one [Q, K] × [K, N] product gives every pair.
The assignment is scipy's ``linear_sum_assignment``, one image at a time.

``point_matching=False`` is the paper's ablation: costs on full masks, with the targets resized
(nearest) to the prediction's H/4 × W/4 resolution, as MaskFormer's matcher does.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from m2f_lite.point_sampling import point_sample, point_sample_binary, uniform_points


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction against every target: ``[Q, P] × [N, P] → [Q, N]``.

    BCE(x, t) = t·softplus(−x) + (1 − t)·softplus(x) is linear in t, so the whole table is two
    matrix products (the official ``batch_sigmoid_ce_loss``).
    """
    cost_if_one = F.softplus(-logits)  # [Q, P] −log σ(x): the BCE where the target is 1
    cost_if_zero = cost_if_one + logits  # [Q, P] −log(1 − σ(x)) = softplus(x) = softplus(−x) + x
    total = cost_if_one @ targets.T + cost_if_zero @ (1.0 - targets).T  # [Q, N]
    return total / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction against every target: ``[Q, P] × [N, P] → [Q, N]``.

    1 − (2·Σ p·t + 1) / (Σ p + Σ t + 1), with p = σ(logit) and +1 smoothing (official ``batch_dice_loss``).
    """
    probs = logits.sigmoid()  # [Q, P]
    numerator = 2.0 * probs @ targets.T  # [Q, N]
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]  # [Q, N]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def resize_masks_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(masks[:, None].float(), size, mode="nearest")[:, 0]`` for boolean ``[N, H, W]``
    masks, by indexing rows and columns (no float copy of the full-resolution masks)."""
    height, width = masks.shape[-2:]
    rows = (torch.arange(size[0], device=masks.device) * (height / size[0])).floor().long()
    cols = (torch.arange(size[1], device=masks.device) * (width / size[1])).floor().long()
    return masks[:, rows.clamp(max=height - 1)][:, :, cols.clamp(max=width - 1)]  # [N, h, w]


def finite_cost(cost: Tensor) -> Tensor:
    """Replace NaN and ±inf in a cost matrix by a finite cost worse than any finite assignment.

    scipy raises "cost matrix is infeasible" on NaN/inf (a diverging model produces NaN logits). The
    replacement ``max + n·(max − min) + 1`` (n = pairs to match) is larger than anything an
    assignment could save elsewhere, so non-finite pairs are used only when unavoidable, and the
    optimum among finite pairs is untouched. (HF transformers uses the float32 maximum instead.)
    """
    finite = torch.isfinite(cost)
    if bool(finite.all()):
        return cost
    if not bool(finite.any()):
        return torch.zeros_like(cost)  # nothing to prefer: any assignment is as good
    low, high = cost[finite].min(), cost[finite].max()
    worst = high + min(cost.shape) * (high - low) + 1.0
    return torch.where(finite, cost, worst)


def solve_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost matching of a ``[Q, N]`` cost matrix: (rows, cols), int64, ``min(Q, N)`` pairs.

    Rows come out sorted. Computed in float64 on the CPU (scipy), after ``finite_cost``.
    """
    cost = finite_cost(cost.detach().to("cpu", torch.float64))
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def check_targets(outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
    """Raise a ``ValueError`` naming what is wrong if ``targets`` does not fit ``outputs``.

    Each target's masks must cover the same (padded) image as the predictions: point coordinates
    are relative to the whole mask, so masks at the unpadded size would be sampled at the wrong
    places. ``criterion.pad_target_masks`` pads them, as the official ``prepare_targets``.
    """
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise ValueError(f"outputs has no {key!r} (keys: {sorted(outputs)})")
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if logits.dim() != 3 or masks.dim() != 4 or logits.shape[:2] != masks.shape[:2]:
        raise ValueError(
            f"expected pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w], got "
            f"{tuple(logits.shape)} and {tuple(masks.shape)}"
        )
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions")
    num_classes = logits.shape[-1] - 1
    h, w = masks.shape[-2:]
    for b, target in enumerate(targets):
        labels, target_masks = target["labels"], target["masks"]
        if labels.dim() != 1 or target_masks.dim() != 3 or len(labels) != len(target_masks):
            raise ValueError(
                f"targets[{b}]: expected labels [N] and masks [N, H, W], got "
                f"{tuple(labels.shape)} and {tuple(target_masks.shape)}"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{b}]['labels'] must be in [0, {num_classes}) (pred_logits has K+1 = "
                f"{num_classes + 1} columns), got {labels.tolist()}"
            )
        height, width = target_masks.shape[-2:]
        if not math.isclose(height / h, width / w, rel_tol=0.02):
            raise ValueError(
                f"targets[{b}]['masks'] is {height}×{width} but pred_masks is {h}×{w}: the aspect "
                "ratios differ, so the masks do not cover the same image. Pad the target masks to "
                "the padded image size first (m2f_lite.criterion.pad_target_masks)."
            )


class HungarianMatcher(nn.Module):
    """Assign targets to predictions, one image at a time, by minimum matching cost (module doc).

    Targets must be padded to the padded image size (see ``check_targets``); their resolution
    may differ from the predictions' (H vs H/4): point coordinates are normalised.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        point_matching: bool = True,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice cannot all be 0")
        if point_matching and num_points < 1:
            raise ValueError(f"num_points must be >= 1 with point_matching, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.point_matching = point_matching
        self._warned_more_targets = False

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, masks: Tensor
    ) -> Tensor:
        """The cost ``[Q, N]`` of pairing each prediction with each target of one image.

        Args:
            pred_logits: ``[Q, K+1]`` class logits. pred_masks: ``[Q, h, w]`` mask logits.
            labels: ``[N]`` target classes. masks: ``[N, H, W]`` bool target masks.
        """
        device = pred_masks.device
        # In float32 even under autocast (the official disables it here too).
        with torch.autocast(device_type=device.type, enabled=False):
            probs = pred_logits.float().softmax(-1)  # [Q, K+1]
            cost_class = -probs[:, labels]  # [Q, N]
            mask_logits = pred_masks.float()  # [Q, h, w]
            if self.point_matching:
                points = uniform_points(1, self.num_points, device)  # [1, P, 2] shared by all masks
                pred = point_sample(mask_logits[None], points)[0]  # [Q, P] (queries as channels)
                target = point_sample_binary(masks, points[0].to(masks.device)).to(device)  # [N, P]
            else:
                pred = mask_logits.flatten(1)  # [Q, hw]
                target = resize_masks_nearest(masks, mask_logits.shape[-2:]).flatten(1)  # [N, hw]
                target = target.to(device, torch.float32)
            cost_mask = pairwise_sigmoid_ce(pred, target)  # [Q, N]
            cost_dice = pairwise_dice(pred, target)  # [Q, N]
        return (
            self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice
        )

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *, validate: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's targets to its predictions.

        Args:
            outputs: ``pred_logits`` ``[B, Q, K+1]`` and ``pred_masks`` ``[B, Q, h, w]`` (other keys,
                such as ``aux_outputs``, are ignored).
            targets: per image, ``labels`` ``[N]`` and ``masks`` ``[N, H, W]`` bool, padded like the
                images.
            validate: check ``targets`` against ``outputs`` (``check_targets``, which reads the
                labels' range: a device sync per image). The criterion checks once and passes
                False for each of its predictions.

        Returns:
            Per image ``(query_indices, target_indices)``, int64 on the CPU, ``min(Q, N)`` pairs,
            query indices sorted. An image without targets gives two empty tensors. With more
            targets than queries (N > Q), Q targets are matched and the other N − Q get no mask
            loss; a warning says so once per matcher.
        """
        if validate:
            check_targets(outputs, targets)
        num_queries = outputs["pred_logits"].shape[1]
        indices = []
        for b, target in enumerate(targets):
            num_targets = len(target["labels"])
            if num_targets == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if num_targets > num_queries and not self._warned_more_targets:
                warnings.warn(
                    f"image {b} has {num_targets} targets but there are only {num_queries} queries: "
                    f"{num_targets - num_queries} targets stay unmatched (they get no mask loss). "
                    "Use more queries (model.num_queries) for such images. Warned once.",
                    stacklevel=2,
                )
                self._warned_more_targets = True
            cost = self.cost_matrix(
                outputs["pred_logits"][b],
                outputs["pred_masks"][b],
                target["labels"],
                target["masks"],
            )
            indices.append(solve_assignment(cost))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
            f"num_points={self.num_points}, point_matching={self.point_matching}"
        )
