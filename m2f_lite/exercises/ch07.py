"""Checks for the exercises of chapter 7, "Inference".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from m2f_lite.inference import instance_inference, semantic_inference

# Ex. 1: the sizes of the question (7 classes, 20 queries, test-time resize to at most 128 pixels)
EX1_ORIGINAL = (480, 640)  # (H, W) of the image on disk
EX1_RESIZED = (96, 128)  # short side to 128, long side capped at 128
EX1_PADDED = (96, 128)  # a multiple of 32 already
EX1_NUM_CLASSES = 7


def _call(fn: Callable, *args, what: str):
    try:
        return fn(*args)
    except Exception as error:  # the student's code: report, do not crash the check
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


def check_ex1(answer) -> None:
    """Ex. 1: the shape of ``postprocess(...)[0]["sem_seg"]`` for a 480×640 image: (7, 480, 640)."""
    assert answer is not None, "replace None with a shape, e.g. (K, H, W) as a tuple of ints"
    try:
        shape = tuple(int(v) for v in answer)
    except (TypeError, ValueError) as error:
        raise AssertionError(
            f"expected a shape such as (7, 10, 10) (a tuple of ints), got {answer!r}"
        ) from error
    k = EX1_NUM_CLASSES
    h, w = EX1_ORIGINAL
    hints = {
        (k + 1, h, w): "the no-object column is dropped: semantic scores have K = 7 channels, "
        "one per class, not K + 1.",
        (20, h, w): "20 is the number of queries Q; the einsum sums over the queries and keeps "
        "one channel per class.",
        (k, EX1_PADDED[0] // 4, EX1_PADDED[1] // 4): "that is the size of pred_masks (1/4 of "
        "the padded input); postprocess upsamples the masks to the padded size first.",
        (k, *EX1_PADDED): "that is the padded input size; postprocess also crops to the image "
        "inside the padded batch and resizes to the original size.",
        (k, *EX1_RESIZED): "that is the size the model saw; the result is resized back to the "
        "original image size, where the evaluation (and the reader) expects it.",
        (k, w, h): "sizes are (height, width): the image is 480 rows by 640 columns.",
    }
    if len(shape) == 2:
        raise AssertionError(
            "sem_seg holds class scores [K, H, W], one channel per class; the label map [H, W] "
            "is its argmax over the first dimension."
        )
    assert shape == (k, h, w), hints.get(
        shape,
        f"{shape} is not right: think of the channels (classes, no-object dropped) and of the "
        "three resizing steps (upsample to the padded input, crop, resize to the original size).",
    )


def _ex2_inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    mask_cls = 2 * torch.randn(6, 5, generator=g)  # [Q, K+1], K = 4
    mask_cls[0, -1] = 4.0  # a query that is mostly "no object"
    mask_pred = 3 * torch.randn(6, 9, 11, generator=g)  # [Q, H, W]
    return mask_cls, mask_pred


def check_ex2(semantic_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Ex. 2: ``semantic(mask_cls [Q, K+1], mask_pred [Q, H, W]) -> [K, H, W]`` as the package's
    ``m2f_lite.inference.semantic_inference``."""
    mask_cls, mask_pred = _ex2_inputs()
    out = _call(semantic_fn, mask_cls.clone(), mask_pred.clone(), what="your semantic inference")
    assert isinstance(out, Tensor), f"expected a Tensor, got {type(out).__name__}"
    k1 = mask_cls.shape[1]
    h, w = mask_pred.shape[-2:]
    if tuple(out.shape) == (k1, h, w):
        raise AssertionError(
            f"the result has K+1 = {k1} channels: drop the last (no-object) column of the class "
            "probabilities, after the softmax, so that there is one channel per class."
        )
    if tuple(out.shape) == (h, w):
        raise AssertionError(
            "return the class scores [K, H, W]; the label map is their argmax, taken afterwards."
        )
    assert tuple(out.shape) == (k1 - 1, h, w), (
        f"expected shape [K, H, W] = {(k1 - 1, h, w)} for mask_cls {tuple(mask_cls.shape)} and "
        f"mask_pred {tuple(mask_pred.shape)}, got {tuple(out.shape)}"
    )
    expected = semantic_inference(mask_cls, mask_pred)
    if torch.allclose(out.float(), expected, atol=1e-5):
        return
    masks = mask_pred.sigmoid()
    variants = {
        "softmax over the K classes only: take the softmax over all K+1 columns first (the "
        "no-object probability takes its share), then drop the last column.": torch.einsum(
            "qc,qhw->chw", F.softmax(mask_cls[:, :-1], dim=-1), masks
        ),
        "the masks are logits: apply the sigmoid to mask_pred before weighting them.": torch.einsum(
            "qc,qhw->chw", F.softmax(mask_cls, dim=-1)[:, :-1], mask_pred
        ),
        "the class scores are logits: apply the softmax (over the last dimension) first.": torch.einsum(
            "qc,qhw->chw", mask_cls[:, :-1], masks
        ),
        "the masks are binarised: semantic inference weights the soft probabilities "
        "sigmoid(m), not the masks m > 0.": torch.einsum(
            "qc,qhw->chw", F.softmax(mask_cls, dim=-1)[:, :-1], (mask_pred > 0).float()
        ),
    }
    for hint, value in variants.items():
        if torch.allclose(out.float(), value, atol=1e-5):
            raise AssertionError(hint)
    worst = (out.float() - expected).abs().max()
    raise AssertionError(
        f"values differ from Σ_q softmax(p_q)[c] · sigmoid(m_q) by up to {worst:.3g}: one einsum "
        "'qc,qhw->chw' of the class probabilities (no-object dropped) and the mask probabilities."
    )


def reference_keep(mask_cls: Tensor, object_mask_threshold: float) -> Tensor:
    """The panoptic keep rule of ``m2f_lite.inference.panoptic_inference``: ``[Q]`` bool."""
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)  # [Q], [Q]
    return labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)


def _ex3_logits() -> Tensor:
    """Class logits [Q, K+1] (K = 3) with the cases that tell the rules apart."""
    probs = torch.tensor(
        [
            [0.90, 0.04, 0.03, 0.03],  # a confident class 0: kept at 0.8
            [0.02, 0.02, 0.01, 0.95],  # confident "no object": never kept
            [0.35, 0.10, 0.10, 0.45],  # top is no-object, class 0 at 0.35: kept by no rule
            [0.05, 0.60, 0.05, 0.30],  # class 1 at 0.6: kept at 0.3 and 0.5, not at 0.8
            [0.10, 0.10, 0.78, 0.02],  # class 2 at 0.78: just under 0.8
            [0.03, 0.01, 0.85, 0.11],  # class 2 at 0.85
        ]
    )
    return probs.log()  # [Q, K+1]: softmax gives the probabilities back


def check_ex3(keep_fn: Callable[[Tensor, float], Tensor]) -> None:
    """Ex. 3: ``keep(mask_cls [Q, K+1], object_mask_threshold) -> [Q]`` bool, the panoptic keep rule."""
    mask_cls = _ex3_logits()
    for threshold in (0.8, 0.5, 0.3):
        out = _call(keep_fn, mask_cls.clone(), threshold, what="your keep rule")
        assert isinstance(out, Tensor), f"expected a Tensor, got {type(out).__name__}"
        assert tuple(out.shape) == (mask_cls.shape[0],), (
            f"expected one bool per query, shape [Q] = ({mask_cls.shape[0]},), got {tuple(out.shape)}"
        )
        out = out.bool()
        expected = reference_keep(mask_cls, threshold)
        if torch.equal(out, expected):
            continue
        probs = F.softmax(mask_cls, dim=-1)
        no_label_test = probs.max(-1).values > threshold
        drop_first = probs[:, :-1].max(-1).values > threshold
        on_logits = mask_cls.max(-1).values > threshold
        if torch.equal(out, no_label_test):
            raise AssertionError(
                f"at threshold {threshold} you keep query 1, whose most likely class is "
                "'no object' (0.95): a kept query needs a score above the threshold AND a top "
                "class that is not the last column."
            )
        if torch.equal(out, drop_first):
            raise AssertionError(
                f"at threshold {threshold} you keep query 2 (class 0 at 0.35 but 'no object' at "
                "0.45): take the max and argmax over all K+1 columns, and reject the queries "
                "whose argmax is no-object; dropping the column first hides that."
            )
        if torch.equal(out, on_logits):
            raise AssertionError("threshold the softmax probabilities, not the logits")
        raise AssertionError(
            f"at object_mask_threshold={threshold} expected {expected.tolist()}, got "
            f"{out.tolist()}: score, label = softmax(mask_cls).max(-1); keep label != K and "
            "score > threshold."
        )


def _ex4_inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(17)
    mask_cls = 2 * torch.randn(6, 5, generator=g)  # [Q, K+1], K = 4
    mask_cls[:2, -1] = 5.0  # two queries that are mostly "no object"
    mask_pred = 4 * torch.randn(6, 12, 12, generator=g) + torch.linspace(-3, 3, 6)[:, None, None]
    return mask_cls, mask_pred  # [Q, K+1], [Q, H, W]


def _sorted_pairs(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(labels, scores) sorted by label then score, to compare results in any order."""
    order = torch.argsort(scores.double() + 10.0 * labels.double())
    return labels[order], scores[order]


def check_ex4(instance_fn: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> None:
    """Ex. 4: ``instance_scores(mask_cls, mask_pred, topk) -> (scores [k], labels [k])``, compared
    with the package's ``m2f_lite.inference.instance_inference``."""
    mask_cls, mask_pred = _ex4_inputs()
    topk = 10
    out = _call(instance_fn, mask_cls.clone(), mask_pred.clone(), topk, what="your instance_scores")
    assert isinstance(out, tuple | list) and len(out) == 2, (
        f"expected a pair (scores, labels), got {type(out).__name__}"
    )
    scores, labels = (torch.as_tensor(v) for v in out)
    if scores.dtype in (torch.int64, torch.int32) and labels.is_floating_point():
        raise AssertionError("return (scores, labels) in that order: scores first")
    if tuple(scores.shape) == (mask_cls.shape[0],):
        raise AssertionError(
            f"you return one entry per query ({mask_cls.shape[0]}); the top-k runs over all "
            "Q × K (query, class) pairs, so a query can appear with several classes: "
            f"expected topk = {topk} entries."
        )
    assert tuple(scores.shape) == (topk,) and tuple(labels.shape) == (topk,), (
        f"expected scores and labels of shape [topk] = ({topk},), got {tuple(scores.shape)} and "
        f"{tuple(labels.shape)}"
    )
    num_classes = mask_cls.shape[-1] - 1
    if int(labels.max()) >= num_classes:
        raise AssertionError(
            f"a label is {int(labels.max())} = K, the no-object column: drop it after the softmax "
            "and before the top-k."
        )
    expected = instance_inference(mask_cls, mask_pred, topk=topk)
    want_labels, want_scores = _sorted_pairs(expected["scores"], expected["labels"])
    got_labels, got_scores = _sorted_pairs(scores.float(), labels.long())
    if torch.equal(got_labels, want_labels) and torch.allclose(got_scores, want_scores, atol=1e-5):
        return
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]  # [Q, K]
    class_only, flat = probs.flatten().topk(topk)
    query = flat // num_classes
    whole_image = class_only * mask_pred[query].sigmoid().flatten(1).mean(1)
    for hint, value in {
        "your scores are the class probabilities alone: multiply each by its mask's quality, "
        "the mean of sigmoid(m_q) over the pixels where m_q > 0.": class_only,
        "the mask quality is the mean of sigmoid(m_q) INSIDE the binary mask m_q > 0, not over "
        "the whole image.": whole_image,
    }.items():
        lab, val = _sorted_pairs(value, flat % num_classes)
        if torch.equal(got_labels, lab) and torch.allclose(got_scores, val, atol=1e-5):
            raise AssertionError(hint)
    raise AssertionError(
        "the (label, score) pairs differ from the package's: take the top-k of softmax(p)[:, :K] "
        "flattened over Q × K, label = index % K, query = index // K, and score = class "
        "probability × mean of sigmoid(m_query) where m_query > 0."
    )
