"""The chapter 8 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import numpy as np
import pytest

from m2f_lite.exercises import ch08
from m2f_lite.metrics.pq import pq_compute_single_image


def iou_from_confusion(conf):
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    return np.where(conf.sum(0) > 0, iou, np.nan)


def accuracy(conf):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.diag(conf) / conf.sum(0)


def union_without_subtraction(conf):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.diag(conf) / (conf.sum(0) + conf.sum(1))


def test_ex1_iou_from_confusion():
    ch08.check_ex1(iou_from_confusion)
    with pytest.raises(AssertionError, match="accuracy"):
        ch08.check_ex1(accuracy)
    with pytest.raises(AssertionError, match="twice"):
        ch08.check_ex1(union_without_subtraction)
    with pytest.raises(AssertionError, match="never occurs in the ground truth"):
        ch08.check_ex1(lambda c: np.nan_to_num(iou_from_confusion(c)))
    with pytest.raises(AssertionError, match="transpose"):
        ch08.check_ex1(lambda c: iou_from_confusion(np.asarray(c).T))
    with pytest.raises(AssertionError, match=r"shape \[K\]"):
        ch08.check_ex1(lambda c: None)


def test_ex2_reference_agrees_with_pq_compute_single_image():
    example = ch08.ex2_example()
    expected = ch08.ex2_reference(example)
    stat = pq_compute_single_image(
        {"image_id": 0, "segments_info": example["gt_segments"]},
        {"image_id": 0, "segments_info": example["pred_segments"]},
        example["gt_ids"],
        example["pred_ids"],
        ch08.EX2_CATEGORIES,
    )
    cats = {s["id"]: s["category_id"] for s in example["gt_segments"] + example["pred_segments"]}
    for c in ch08.EX2_CATEGORIES:
        assert stat[c].tp == sum(cats[g] == c for g, _ in expected["tp"])
        assert stat[c].fp == sum(cats[p] == c for p in expected["fp"])
        assert stat[c].fn == sum(cats[g] == c for g in expected["fn"])


def test_ex2_matched_pairs():
    right = ch08.ex2_reference(ch08.ex2_example())
    ch08.check_ex2(right)
    ch08.check_ex2({k: list(v) for k, v in right.items()})  # lists are fine too
    with pytest.raises(AssertionError, match=r"exactly 0\.5"):
        ch08.check_ex2({**right, "tp": right["tp"] | {(1, 11)}})
    with pytest.raises(AssertionError, match="crowd"):
        ch08.check_ex2({**right, "fp": right["fp"] | {13}})
    with pytest.raises(AssertionError, match="crowd region"):
        ch08.check_ex2({**right, "fn": right["fn"] | {3}})
    with pytest.raises(AssertionError, match="missing"):
        ch08.check_ex2({**right, "fp": set()})
    with pytest.raises(AssertionError, match="expected a dict"):
        ch08.check_ex2([(2, 12)])


def pq_one_category(gt_masks, pred_masks, *, strict=True, half=True):
    iou_sum, tp = 0.0, 0
    for g in gt_masks:
        for p in pred_masks:
            iou = np.sum(g & p) / np.sum(g | p)
            if iou > 0.5 or (not strict and iou >= 0.5):
                iou_sum, tp = iou_sum + iou, tp + 1
    fp, fn = len(pred_masks) - tp, len(gt_masks) - tp
    denominator = tp + 0.5 * fp + 0.5 * fn if half else tp + fp + fn
    return iou_sum / denominator, (iou_sum / tp if tp else 0.0), tp / denominator


def test_ex3_pq_one_category():
    ch08.check_ex3(pq_one_category)
    with pytest.raises(AssertionError, match="strictly"):
        ch08.check_ex3(lambda g, p: pq_one_category(g, p, strict=False))
    with pytest.raises(AssertionError, match="one half"):
        ch08.check_ex3(lambda g, p: pq_one_category(g, p, half=False))
    with pytest.raises(AssertionError, match=r"tuple \(pq, sq, rq\)"):
        ch08.check_ex3(lambda g, p: 0.5)


def test_ex4_predict_ap50():
    ch08.check_ex4((51 + 50 * 2 / 3) / 101)
    with pytest.raises(AssertionError, match="101 recall levels"):
        ch08.check_ex4(0.5 + 0.5 * 2 / 3)
    with pytest.raises(AssertionError, match="interpolated"):
        ch08.check_ex4(2 / 3)
    with pytest.raises(AssertionError, match="percentage"):
        ch08.check_ex4(83.5)
    with pytest.raises(AssertionError, match="expected a number"):
        ch08.check_ex4("0.835")
