"""mIoU and friends on hand-computed cases, and against the per-class set definitions."""

import math
import re

import numpy as np
import pytest

from m2f_lite.metrics.miou import SemSegMetric


def test_hand_computed_case_with_ignored_pixels():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])  # the predictions on ignored pixels do not count
    m = SemSegMetric(num_classes=3, class_names=["a", "b", "c"])
    m.update(pred, gt)
    r = m.compute()
    # class a: tp 1, gt 2, pred 2 -> IoU 1/3, ACC 1/2; b: tp 2, gt 2, pred 3 -> 2/3, 1; c: tp 1, gt 2, pred 1 -> 1/2, 1/2
    assert r["IoU-a"] == pytest.approx(100 / 3)
    assert r["IoU-b"] == pytest.approx(200 / 3)
    assert r["IoU-c"] == pytest.approx(50)
    assert r["ACC-a"] == pytest.approx(50) and r["ACC-b"] == pytest.approx(100)
    assert r["mIoU"] == pytest.approx(50)
    assert r["fwIoU"] == pytest.approx(50)  # every class has 2 of the 6 valid pixels
    assert r["pACC"] == pytest.approx(400 / 6)
    assert r["mACC"] == pytest.approx(200 / 3)


def test_class_absent_from_ground_truth_is_nan_and_left_out():
    m = SemSegMetric(num_classes=4)
    m.update(np.array([[0, 0, 3, 3]]), np.array([[0, 0, 0, 0]]))
    r = m.compute()
    assert r["IoU-0"] == pytest.approx(50)
    for k in (1, 2, 3):  # 3 was predicted but never in the ground truth: NaN, as detectron2
        assert math.isnan(r[f"IoU-{k}"]) and math.isnan(r[f"ACC-{k}"])
    assert r["mIoU"] == pytest.approx(50) and r["mACC"] == pytest.approx(50)
    assert r["pACC"] == pytest.approx(50)


def test_accumulating_images_equals_one_big_image():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (6, 7)) for _ in range(3)]
    gts = [np.where(rng.random((6, 7)) < 0.1, 255, rng.integers(0, 5, (6, 7))) for _ in range(3)]
    a, b = SemSegMetric(num_classes=5), SemSegMetric(num_classes=5)
    for p, g in zip(preds, gts):
        a.update(p, g)
    b.update(np.concatenate(preds), np.concatenate(gts))
    np.testing.assert_array_equal(a.conf_matrix, b.conf_matrix)
    assert a.conf_matrix[:, -1].sum() == sum((g == 255).sum() for g in gts)


def test_agrees_with_per_class_set_definitions():
    """IoU = |P ∩ G| / |P ∪ G| and ACC = |P ∩ G| / |G| per class, on non-ignored pixels (sets, not a matrix)."""
    rng = np.random.default_rng(1)
    gt = np.where(rng.random((40, 50)) < 0.1, 255, rng.integers(0, 6, (40, 50)))
    pred = np.where(
        rng.random((40, 50)) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 6, (40, 50))
    )
    m = SemSegMetric(num_classes=6)
    m.update(pred, gt)
    r = m.compute()
    valid = gt != 255
    ious, accs, weights = [], [], []
    for c in range(6):
        p, g = (pred == c) & valid, gt == c
        ious.append((p & g).sum() / (p | g).sum())
        accs.append((p & g).sum() / g.sum())
        weights.append(g.sum() / valid.sum())
        assert r[f"IoU-{c}"] == pytest.approx(100 * ious[-1])
        assert r[f"ACC-{c}"] == pytest.approx(100 * accs[-1])
    assert r["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert r["mACC"] == pytest.approx(100 * np.mean(accs))
    assert r["fwIoU"] == pytest.approx(100 * np.dot(weights, ious))
    assert r["pACC"] == pytest.approx(100 * (pred == gt)[valid].mean())


def test_bad_inputs_raise_clear_errors():
    m = SemSegMetric(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=re.escape("ignore_label=255, got [7]")):
        m.update(np.zeros((1, 2), int), np.array([[0, 7]]))
    with pytest.raises(ValueError, match=re.escape("predicted labels must lie in 0..2")):
        m.update(np.array([[3]]), np.array([[0]]))
    with pytest.raises(ValueError, match="2 class_names for num_classes=3"):
        SemSegMetric(num_classes=3, class_names=["a", "b"])
