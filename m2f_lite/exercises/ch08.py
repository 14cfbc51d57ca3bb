"""Checks for the exercises of chapter 8, "Metrics: mIoU, AP and PQ".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint. The expected answers are computed with the
package's metrics (``SemSegMetric``, ``pq_compute_single_image``) and with pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from m2f_lite.metrics.miou import SemSegMetric
from m2f_lite.metrics.pq import pq_compute_single_image


def _call(fn: Callable, *args, what: str):
    try:
        return fn(*args)
    except Exception as error:  # the student's code: report, do not crash the check
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


# --- Ex. 1: IoU from a confusion matrix ---------------------------------------------------------


def _ex1_confusion() -> np.ndarray:
    """A 5-class confusion matrix [p, g]: class 3 is predicted but absent from the ground truth,
    class 4 is in the ground truth but never predicted."""
    return np.array(
        [
            [50, 3, 0, 0, 2],
            [4, 30, 5, 0, 0],
            [1, 2, 20, 0, 6],
            [0, 0, 3, 0, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=np.int64,
    )


def _reference_iou(conf: np.ndarray) -> np.ndarray:
    k = len(conf)
    metric = SemSegMetric(num_classes=k)
    metric.conf_matrix[:k, :k] = conf  # the last row/column (ignored pixels) stays 0
    result = metric.compute()
    return np.array([result[f"IoU-{c}"] / 100 for c in range(k)])


def check_ex1(iou_fn: Callable[[np.ndarray], Any]) -> None:
    """Ex. 1: ``iou_from_confusion(conf [K, K]) -> [K]`` with NaN for classes absent from the ground truth."""
    conf = _ex1_confusion()
    out = _call(iou_fn, conf.copy(), what="your iou_from_confusion")
    out = np.asarray(out, dtype=np.float64) if out is not None else None
    assert out is not None and out.shape == (5,), (
        f"expected an array of shape [K] = [5] for a 5×5 confusion matrix, got "
        f"{None if out is None else out.shape}"
    )
    expected = _reference_iou(conf)
    if np.allclose(out, expected, equal_nan=True):
        return
    tp = np.diag(conf).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = tp / conf.sum(0)
        no_subtraction = tp / (conf.sum(0) + conf.sum(1))
    present = conf.sum(0) > 0
    if np.allclose(out[present], accuracy[present]):
        raise AssertionError(
            "that is C[c, c] / Σ_p C[p, c], the accuracy (recall) of each class. IoU divides by "
            "the union: predicted pixels + ground-truth pixels − C[c, c]."
        )
    if np.allclose(out[present], no_subtraction[present]):
        raise AssertionError(
            "the union counts C[c, c] twice: subtract it once (Σ_g C[c, g] + Σ_p C[p, c] − C[c, c])."
        )
    if np.allclose(out[present], expected[present]):
        if not np.isnan(out[3]):
            raise AssertionError(
                f"class 3 never occurs in the ground truth (column 3 is all 0) but you gave it "
                f"IoU {out[3]}: it has no IoU (NaN), and mIoU leaves it out."
            )
    if np.isnan(out[4]):
        raise AssertionError(
            "class 4 occurs in the ground truth but is never predicted: its IoU is 0, not NaN. "
            "(Rows are predictions, columns ground truth: did you transpose?)"
        )
    raise AssertionError(
        f"IoU per class {np.round(out, 4).tolist()}, expected {np.round(expected, 4).tolist()} "
        "(C[c, c] / (Σ_g C[c, g] + Σ_p C[p, c] − C[c, c]), NaN where Σ_p C[p, c] = 0)"
    )


# --- Ex. 2: decide the matched pairs -------------------------------------------------------------

SQUARE, CIRCLE, SKY = 2, 1, 101  # the shapes dataset's category ids
EX2_CATEGORIES = {
    SQUARE: {"id": SQUARE, "name": "square", "isthing": 1},
    CIRCLE: {"id": CIRCLE, "name": "circle", "isthing": 1},
    SKY: {"id": SKY, "name": "sky", "isthing": 0},
}


def ex2_example() -> dict[str, Any]:
    """The exercise's ground truth and prediction: id maps [8, 10] and segments_info lists."""
    gt = np.full((8, 10), 5, dtype=np.uint32)  # sky
    gt[1:3, 1:4] = 1  # square 1 (6 px)
    gt[4:7, 1:4] = 2  # square 2 (9 px)
    gt[4:8, 6:10] = 3  # a crowd of squares (16 px)
    pred = np.full((8, 10), 10, dtype=np.uint32)  # sky
    pred[1:3, 2:5] = 11  # a square overlapping square 1 in 4 px
    pred[4:8, 1:4] = 12  # square 2 and one row more
    pred[5:8, 7:10] = 13  # a square on the crowd
    pred[0:2, 7:10] = 14  # a circle on the sky
    gt_segments = [
        {"id": i, "category_id": c, "iscrowd": crowd, "area": int((gt == i).sum())}
        for i, c, crowd in [(1, SQUARE, 0), (2, SQUARE, 0), (3, SQUARE, 1), (5, SKY, 0)]
    ]
    pred_segments = [
        {"id": i, "category_id": c}
        for i, c in [(10, SKY), (11, SQUARE), (12, SQUARE), (13, SQUARE), (14, CIRCLE)]
    ]
    return {
        "gt_ids": gt,
        "gt_segments": gt_segments,
        "pred_ids": pred,
        "pred_segments": pred_segments,
    }


def ex2_reference(example: dict[str, Any]) -> dict[str, set]:
    """TP pairs, FP prediction ids and FN ground-truth ids by the COCO panoptic rules."""
    gt, pred = example["gt_ids"], example["pred_ids"]
    void = gt == 0
    tp, matched_gt, matched_pred = set(), set(), set()
    for g in example["gt_segments"]:
        for p in example["pred_segments"]:
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            g_mask, p_mask = gt == g["id"], pred == p["id"]
            inter = int((g_mask & p_mask).sum())
            union = int(p_mask.sum()) + g["area"] - inter - int((p_mask & void).sum())
            if union > 0 and inter / union > 0.5:
                tp.add((g["id"], p["id"]))
                matched_gt.add(g["id"])
                matched_pred.add(p["id"])
    fn = {g["id"] for g in example["gt_segments"] if g["id"] not in matched_gt and not g["iscrowd"]}
    crowd = {g["category_id"]: g["id"] for g in example["gt_segments"] if g["iscrowd"]}
    fp = set()
    for p in example["pred_segments"]:
        if p["id"] in matched_pred:
            continue
        p_mask = pred == p["id"]
        ignored = (p_mask & (void | (gt == crowd.get(p["category_id"], -1)))).sum()
        if ignored / p_mask.sum() <= 0.5:
            fp.add(p["id"])
    return {"tp": tp, "fp": fp, "fn": fn}


def check_ex2(answer: dict[str, Any]) -> None:
    """Ex. 2: the TP pairs, FP and FN of ``ex2_example()``."""
    assert isinstance(answer, dict) and {"tp", "fp", "fn"} <= set(answer), (
        'expected a dict {"tp": {(gt_id, pred_id), ...}, "fp": {pred_id, ...}, "fn": {gt_id, ...}}'
    )
    try:
        got_tp = {(int(g), int(p)) for g, p in answer["tp"]}
        got_fp = {int(p) for p in answer["fp"]}
        got_fn = {int(g) for g in answer["fn"]}
    except (TypeError, ValueError) as error:
        raise AssertionError(
            f"could not read the answer ({error}): tp holds (gt_id, pred_id) pairs, fp and fn ids"
        ) from error
    expected = ex2_reference(ex2_example())
    if (1, 11) in got_tp:
        raise AssertionError(
            "ground truth 1 and prediction 11 share 4 pixels and their union has 8: IoU is exactly "
            "0.5, and a match needs IoU > 0.5 (strictly)."
        )
    if 13 in got_fp:
        raise AssertionError(
            "prediction 13 lies on the crowd region of its own category (ground truth 3): an "
            "unmatched prediction mostly on crowd or void is not a false positive."
        )
    if 3 in got_fn or any(g == 3 for g, _ in got_tp):
        raise AssertionError(
            "ground truth 3 is a crowd region: it is never matched and never a false negative."
        )
    for name, got in [("tp", got_tp), ("fp", got_fp), ("fn", got_fn)]:
        want = expected[name]
        missing, extra = sorted(want - got), sorted(got - want)
        assert not missing and not extra, (
            f"{name}: missing {missing}, should not be there {extra}. Compare categories first "
            "(only segments of the same category can match), then count intersection and union "
            "pixels; stuff segments (sky) are matched like things."
        )


# --- Ex. 3: PQ of one category -------------------------------------------------------------------


def _ex3_cases() -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """(gt_masks, pred_masks) of one category: an IoU-exactly-0.5 pair, no match, random ones."""
    h = w = 16
    cases = []
    a = np.zeros((h, w), bool)
    a[2:4, 2:5] = True  # 6 px
    b = np.zeros((h, w), bool)
    b[2:4, 3:6] = True  # overlaps a in 4 px: IoU 4 / 8 = 0.5 exactly
    c = np.zeros((h, w), bool)
    c[8:12, 8:12] = True
    d = np.zeros((h, w), bool)
    d[8:12, 9:13] = True  # IoU 12 / 20 = 0.6 with c
    cases.append(([a, c], [b, d]))
    cases.append(([a], [c]))  # nothing matches: SQ = 0
    rng = np.random.default_rng(8)
    for _ in range(4):
        gt_ids = np.zeros((h, w), np.int64)
        pred_ids = np.zeros((h, w), np.int64)
        for k in range(1, 5):
            y, x = rng.integers(0, h - 4, 2)
            sy, sx = rng.integers(2, 6, 2)
            gt_ids[y : y + sy, x : x + sx] = k
            dy, dx = rng.integers(-2, 3, 2)
            y2, x2 = np.clip([y + dy, x + dx], 0, [h - 1, w - 1])
            pred_ids[y2 : y2 + sy, x2 : x2 + sx] = k
        y, x = rng.integers(0, h - 3, 2)
        pred_ids[y : y + 3, x : x + 3] = 9  # an extra prediction
        gt_masks = [gt_ids == k for k in np.unique(gt_ids) if k]
        pred_masks = [pred_ids == k for k in np.unique(pred_ids) if k]
        cases.append((gt_masks, pred_masks))
    return cases


def _reference_pq(gt_masks, pred_masks) -> tuple[dict[str, float], tuple[int, int, int]]:
    """PQ/SQ/RQ of the thing category with ``pq_compute_single_image``; the rest is a stuff
    segment (so that nothing is void and IoU is the plain IoU)."""
    shape = (gt_masks + pred_masks)[0].shape
    categories = {1: {"id": 1, "isthing": 1}, 2: {"id": 2, "isthing": 0}}

    def id_map(masks):
        ids = np.full(shape, 1000, dtype=np.uint32)  # background: stuff segment 1000
        for i, m in enumerate(masks, start=1):
            ids[m] = i
        return ids

    gt_ids, pred_ids = id_map(gt_masks), id_map(pred_masks)
    gt_ann = {
        "image_id": 0,
        "segments_info": [
            {
                "id": int(i),
                "category_id": 2 if i == 1000 else 1,
                "iscrowd": 0,
                "area": int((gt_ids == i).sum()),
            }
            for i in np.unique(gt_ids)
        ],
    }
    pred_ann = {
        "image_id": 0,
        "segments_info": [
            {"id": int(i), "category_id": 2 if i == 1000 else 1} for i in np.unique(pred_ids)
        ],
    }
    stat = pq_compute_single_image(gt_ann, pred_ann, gt_ids, pred_ids, categories)
    _, per_class = stat.pq_average({1: categories[1]}, isthing=True)
    s = stat[1]
    return per_class[1], (s.tp, s.fp, s.fn)


def check_ex3(pq_fn: Callable[[list, list], Any]) -> None:
    """Ex. 3: ``pq_one_category(gt_masks, pred_masks) -> (pq, sq, rq)``, as the package's
    ``pq_compute_single_image`` (panopticapi's rules) computes them."""
    for i, (gt_masks, pred_masks) in enumerate(_ex3_cases()):
        out = _call(
            pq_fn,
            [m.copy() for m in gt_masks],
            [m.copy() for m in pred_masks],
            what="your pq_one_category",
        )
        assert isinstance(out, (tuple, list)) and len(out) == 3, (
            f"expected a tuple (pq, sq, rq), got {type(out).__name__}"
        )
        got = [float(v) for v in out]
        want, (tp, fp, fn) = _reference_pq(gt_masks, pred_masks)
        if all(math.isclose(g, want[k], abs_tol=1e-9) for g, k in zip(got, ("pq", "sq", "rq"))):
            continue
        if i == 0 and math.isclose(got[2], 1.0, abs_tol=1e-9):
            raise AssertionError(
                "case 0 has a pair with IoU exactly 0.5 (4 shared pixels, 8 in the union): a match "
                "needs IoU > 0.5, strictly."
            )
        if tp + fp + fn and math.isclose(got[2], tp / (tp + fp + fn), abs_tol=1e-9):
            raise AssertionError(
                f"case {i}: RQ = TP / (TP + FP + FN) counts errors fully; in PQ each FP and FN "
                "counts one half: RQ = TP / (TP + ½ FP + ½ FN)."
            )
        raise AssertionError(
            f"case {i} ({len(gt_masks)} ground-truth masks, {len(pred_masks)} predicted): got "
            f"(pq, sq, rq) = {tuple(round(v, 4) for v in got)}, expected "
            f"{tuple(round(want[k], 4) for k in ('pq', 'sq', 'rq'))} with TP {tp}, FP {fp}, FN {fn}. "
            "Match pairs with IoU > 0.5, SQ = ΣIoU / TP (0 without TP), RQ = TP / (TP + ½FP + ½FN)."
        )


# --- Ex. 4: predict an AP ------------------------------------------------------------------------


def ex4_reference() -> float:
    """AP50 of the exercise's case (two ground truths; detections: hit, miss, hit), by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from m2f_lite.metrics.coco_ap import encode_mask

    gts = np.zeros((2, 16, 16), bool)
    gts[0, :6, :6] = True
    gts[1, 10:, 10:] = True
    miss = np.zeros((16, 16), bool)
    miss[:4, 12:] = True
    image = {"id": 1, "height": 16, "width": 16}
    gt = COCO()
    gt.dataset = {
        "images": [image],
        "categories": [{"id": 1, "name": "shape"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": float(m.sum()),
                "segmentation": encode_mask(m),
            }
            for i, m in enumerate(gts)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dets = [
            {"image_id": 1, "category_id": 1, "segmentation": encode_mask(m), "score": s}
            for m, s in [(gts[0], 0.9), (miss, 0.8), (gts[1], 0.7)]
        ]
        evaluation = COCOeval(gt, gt.loadRes(dets), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])  # AP at IoU 0.5


def check_ex4(answer: float) -> None:
    """Ex. 4: AP50 of two ground truths with detections hit, miss, hit (101-point interpolation)."""
    assert isinstance(answer, (int, float)) and not isinstance(answer, bool), (
        f"expected a number, got {type(answer).__name__} {answer!r}"
    )
    expected = ex4_reference()
    if math.isclose(answer, expected, abs_tol=1e-3):
        return
    if math.isclose(answer, 100 * expected, abs_tol=0.1):
        raise AssertionError("right, but as a percentage: give a number between 0 and 1")
    if math.isclose(answer, 0.5 + 0.5 * 2 / 3, abs_tol=1e-3):
        raise AssertionError(
            "that is the area under the interpolated curve. COCO averages the interpolated "
            "precision at 101 recall levels 0, 0.01, …, 1, and 51 of them are ≤ 0.5."
        )
    if math.isclose(answer, 2 / 3, abs_tol=1e-3) or math.isclose(
        answer, (1 + 0.5 + 2 / 3) / 3, abs_tol=1e-3
    ):
        raise AssertionError(
            "precision is interpolated: at recall r, take the best precision reached at recall r "
            "or more (the precision after the miss, 1/2, never counts)."
        )
    raise AssertionError(
        f"{answer} is not right: write down precision and recall after each detection, make "
        "precision non-increasing from the right, and average it at recall 0, 0.01, …, 1."
    )
