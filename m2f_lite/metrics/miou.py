"""Semantic segmentation metrics from a confusion matrix: IoU per class, mIoU, fwIoU, pACC, mACC.

The definitions of detectron2's ``SemSegEvaluator`` (the numbers the Mask2Former paper reports
for ADE20K and Cityscapes), in percent. With ``C[p, g]`` the number of pixels predicted ``p``
whose ground truth is ``g`` (pixels labelled ``ignore_label`` left out):

    IoU_c = C[c, c] / (Σ_g C[c, g] + Σ_p C[p, c] − C[c, c])     mIoU = mean of IoU_c
    ACC_c = C[c, c] / Σ_p C[p, c]                                mACC = mean of ACC_c
    fwIoU = Σ_c (Σ_p C[p, c] / Σ C) · IoU_c                      pACC = Σ_c C[c, c] / Σ C

A class absent from the ground truth of the whole set has IoU and ACC NaN and is left out of
every mean (even if it was predicted), as detectron2 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SemSegMetric:
    """Accumulates a ``[K+1, K+1]`` confusion matrix (rows: prediction, columns: ground truth,
    index K: ignored) over images, then computes the metrics."""

    def __init__(
        self, *, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = (
            list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        )
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.conf_matrix = np.zeros((k + 1, k + 1), dtype=np.int64)  # [K+1 pred, K+1 gt]

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` ``[H, W]`` class indices 0..K-1, ``gt`` ``[H, W]`` 0..K-1 or ``ignore_label``."""
        pred = np.asarray(pred).astype(np.int64, copy=False)
        gt = np.asarray(gt).astype(np.int64, copy=True)
        k = self.num_classes
        if pred.shape != gt.shape:
            raise ValueError(
                f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}"
            )
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(
                f"predicted labels must lie in 0..{k - 1}, got {pred.min()}..{pred.max()}"
            )
        ignored = gt == self.ignore_label
        gt[ignored] = k
        if gt.size and (gt.min() < 0 or gt.max() > k):
            bad = np.unique(gt[(gt < 0) | (gt > k)])[:5].tolist()
            raise ValueError(
                f"ground truth labels must lie in 0..{k - 1} or be ignore_label={self.ignore_label}, got {bad}"
            )
        self.conf_matrix += np.bincount(
            (k + 1) * pred.ravel() + gt.ravel(), minlength=(k + 1) ** 2
        ).reshape(k + 1, k + 1)

    def merge(self, other: SemSegMetric) -> None:
        """Add another metric's counts (e.g. gathered from another process)."""
        self.conf_matrix += other.conf_matrix

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "fwIoU", "IoU-<name>" ..., "mACC", "pACC", "ACC-<name>" ...}`` in percent."""
        conf = self.conf_matrix[:-1, :-1].astype(
            np.float64
        )  # [K pred, K gt], ignored pixels dropped
        tp = np.diagonal(conf)  # [K]
        pos_gt = conf.sum(0)  # [K]
        pos_pred = conf.sum(1)  # [K]
        total = pos_gt.sum()
        union = pos_gt + pos_pred - tp  # [K]
        acc_valid = pos_gt > 0
        iou_valid = acc_valid & (union > 0)
        acc = np.full(self.num_classes, np.nan)
        iou = np.full(self.num_classes, np.nan)
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        weights = pos_gt / total if total > 0 else np.zeros_like(pos_gt)
        nan = float("nan")
        res = {
            "mIoU": 100 * float(iou[iou_valid].mean()) if iou_valid.any() else nan,
            "fwIoU": 100 * float((iou[iou_valid] * weights[iou_valid]).sum())
            if iou_valid.any()
            else nan,
        }
        res.update({f"IoU-{name}": 100 * float(iou[i]) for i, name in enumerate(self.class_names)})
        res["mACC"] = 100 * float(acc[acc_valid].mean()) if acc_valid.any() else nan
        res["pACC"] = 100 * float(tp.sum() / total) if total > 0 else nan
        res.update({f"ACC-{name}": 100 * float(acc[i]) for i, name in enumerate(self.class_names)})
        return res
