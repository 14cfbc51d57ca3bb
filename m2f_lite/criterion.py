"""The set criterion: the Mask2Former training loss (Sec. 3.3 and Sec. 4 of the paper).

After Hungarian matching (``matcher.py``), each of the L + 1 predictions (the one from the learnable
queries and one after each of the L decoder layers) gets

    L = λ_cls · L_cls + λ_ce · L_ce + λ_dice · L_dice,     λ_cls = 2, λ_ce = λ_dice = 5,

- L_cls: cross-entropy over K + 1 classes for all Q queries; unmatched queries target "no object",
  whose terms are weighted 0.1 (a weighted mean, as ``F.cross_entropy(weight=...)`` computes it);
- L_ce: binary cross-entropy of each matched mask, averaged over K = 12544 importance-sampled points
  (``point_sampling.importance_sampled_points``), summed over masks and divided by the number of
  target masks in the batch (averaged over processes under DDP);
- L_dice: dice loss on the same points, normalised the same way.

Deep supervision sums these over every prediction: the final one gives ``loss_ce``, ``loss_mask``,
``loss_dice``; auxiliary prediction i (0-based, as the official) gives ``loss_ce_i`` etc.
``point_loss=False`` is the paper's ablation: BCE and dice on full masks, the matched predictions
upsampled (bilinear) to the target resolution, as MaskFormer computes them.

Targets must be padded to the padded image size (``pad_target_masks``): the model pads its input,
so its H/4 × W/4 masks cover the padded image, and point coordinates are relative to the whole mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_lite.config import Config
from m2f_lite.matcher import HungarianMatcher, check_targets
from m2f_lite.point_sampling import importance_sampled_points, point_sample, point_sample_binary


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy ``[M, P]`` averaged over points, summed over masks, / num_masks."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [M, P]
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Dice loss 1 − (2·Σ p·t + 1) / (Σ p + Σ t + 1) per mask ``[M, P]``, summed, / num_masks."""
    probs = logits.sigmoid()  # [M, P]
    numerator = 2.0 * (probs * labels).sum(-1)  # [M]
    denominator = probs.sum(-1) + labels.sum(-1)  # [M]
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def pad_target_masks(
    targets: list[dict[str, Tensor]], size: tuple[int, int]
) -> list[dict[str, Tensor]]:
    """Pad every target's ``masks`` ``[N, H, W]`` with False at the bottom and right to ``size``.

    ``size`` is the padded image size (the model's input after padding): the official
    ``MaskFormer.prepare_targets`` does the same before the criterion.
    """
    padded = []
    for b, target in enumerate(targets):
        masks = target["masks"]
        height, width = masks.shape[-2:]
        if height > size[0] or width > size[1]:
            raise ValueError(
                f"targets[{b}]['masks'] is {height}×{width}, larger than size {tuple(size)}"
            )
        out = masks.new_zeros((masks.shape[0], size[0], size[1]))  # [N, Hp, Wp]
        out[:, :height, :width] = masks
        padded.append({**target, "masks": out})
    return padded


class SetCriterion(nn.Module):
    """Class, mask-BCE and dice losses of matched predictions, with deep supervision (module doc).

    ``forward`` returns the unweighted terms; ``total`` weights and sums them:

    >>> losses = criterion(outputs, targets)   # {"loss_ce": ..., "loss_mask": ..., "loss_dice_0": ...}
    >>> loss = criterion.total(losses)         # Σ weight(name) · value
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        point_loss: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        # λ of each term; an auxiliary term ("loss_dice_3") has the weight of its base name.
        self.weight_dict = {
            "loss_ce": class_weight,
            "loss_mask": mask_weight,
            "loss_dice": dice_weight,
        }
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.point_loss = point_loss
        class_weights = torch.ones(num_classes + 1)  # [K+1]
        class_weights[-1] = no_object_weight  # the last class is "no object"
        self.register_buffer("empty_weight", class_weights, persistent=False)

    def weight(self, name: str) -> float:
        """The weight λ of a loss term: ``loss_mask_3`` has the weight of ``loss_mask``."""
        base, _, suffix = name.rpartition("_")
        return self.weight_dict[base if suffix.isdigit() else name]

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """The training loss: Σ_name weight(name) · losses[name]."""
        return sum(self.weight(name) * value for name, value in losses.items())

    def num_masks(self, targets: list[dict[str, Tensor]], device: torch.device) -> float:
        """Target masks per process: the batch's count, averaged over processes under DDP, ≥ 1.

        Every process then divides by the same number, so the gradients DDP averages are those of
        the loss over the whole global batch (the official ``num_masks``).
        """
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)  # sum over processes
            world_size = dist.get_world_size()
        return max(count.item() / world_size, 1.0)

    def loss_labels(
        self,
        pred_logits: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Cross-entropy of all queries ``[B, Q, K+1]``; unmatched ones target no-object (class K)."""
        logits = pred_logits.float()  # [B, Q, K+1]
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # [B, Q]
        for b, (query, target) in enumerate(indices):
            labels = targets[b]["labels"].to(logits.device)  # [N]
            target_classes[b, query.to(logits.device)] = labels[target.to(logits.device)]
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.empty_weight)

    def loss_masks(
        self,
        pred_masks: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> tuple[Tensor, Tensor]:
        """(BCE, dice) of the matched masks: on sampled points, or on full masks (``point_loss=False``)."""
        device = pred_masks.device
        batch = torch.cat([torch.full_like(query, b) for b, (query, _) in enumerate(indices)])
        query = torch.cat([query for query, _ in indices])
        matched = pred_masks[batch.to(device), query.to(device)].float()  # [M, h, w] matched only
        if matched.shape[0] == 0:  # no targets in the batch: zero, but still part of the graph
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()

        counts = [len(query) for query, _ in indices]  # matched masks per image
        if self.point_loss:
            points = importance_sampled_points(
                matched[:, None],
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
            )  # [M, P, 2], no gradient
            logits = point_sample(matched[:, None], points)[:, 0]  # [M, P]
            labels = []  # the targets at the same points, image by image
            for t, p, (_, target) in zip(targets, points.split(counts), indices):
                masks = t["masks"]  # [N, H, W] bool
                rows = target.to(masks.device)  # which of them were matched
                labels.append(point_sample_binary(masks, p.to(masks.device), rows=rows))
            labels = torch.cat(labels).to(device)  # [M, P]
        else:
            logits, labels = [], []
            for t, m, (_, target) in zip(targets, matched.split(counts), indices):
                masks = t["masks"]  # [N, H, W] bool
                up = F.interpolate(
                    m[:, None], masks.shape[-2:], mode="bilinear", align_corners=False
                )
                logits.append(up.flatten(1))  # [M_b, HW]
                labels.append(masks[target.to(masks.device)].flatten(1).to(device, torch.float32))
            logits, labels = torch.cat(logits), torch.cat(labels)  # [M, HW]
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def forward(
        self, outputs: dict[str, Tensor | list], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The loss terms of the final prediction and (with deep supervision) of each auxiliary one.

        Args:
            outputs: ``pred_logits`` ``[B, Q, K+1]``, ``pred_masks`` ``[B, Q, h, w]`` and
                ``aux_outputs`` (a list of dicts with the same keys).
            targets: per image ``labels`` ``[N]`` and ``masks`` ``[N, H, W]`` bool, padded to the
                padded image size (``pad_target_masks``). N may be 0.

        Returns:
            ``{"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}``: unweighted; see ``total``.
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {outputs['pred_logits'].shape[-1]} classes, expected "
                f"num_classes + 1 = {self.num_classes + 1} (the last one is no-object)"
            )
        check_targets(outputs, targets)
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        predictions = [outputs]
        if self.deep_supervision:
            predictions += list(outputs.get("aux_outputs", []))

        losses = {}
        for i, prediction in enumerate(predictions):
            indices = self.matcher(prediction, targets, validate=False)  # checked above
            suffix = "" if i == 0 else f"_{i - 1}"
            losses[f"loss_ce{suffix}"] = self.loss_labels(
                prediction["pred_logits"], targets, indices
            )
            loss_mask, loss_dice = self.loss_masks(
                prediction["pred_masks"], targets, indices, num_masks
            )
            losses[f"loss_mask{suffix}"] = loss_mask
            losses[f"loss_dice{suffix}"] = loss_dice
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights={self.weight_dict}, "
            f"no_object_weight={float(self.empty_weight[-1])}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}, point_loss={self.point_loss}"
        )


def build_criterion(cfg: Config) -> SetCriterion:
    """The criterion of a config: ``cfg.loss`` and ``cfg.model.num_classes`` (the official
    ``MaskFormer.from_config``: the matcher's costs are the loss weights)."""
    loss = cfg.loss
    matcher = HungarianMatcher(
        cost_class=loss.class_weight,
        cost_mask=loss.mask_weight,
        cost_dice=loss.dice_weight,
        num_points=loss.num_points,
        point_matching=loss.point_matching,
    )
    return SetCriterion(
        num_classes=cfg.model.num_classes,
        matcher=matcher,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        deep_supervision=loss.deep_supervision,
        point_loss=loss.point_loss,
    )
