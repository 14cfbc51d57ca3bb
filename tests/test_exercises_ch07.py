"""The chapter 7 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.data.transforms import shortest_edge_shape
from m2f_lite.exercises import ch07
from m2f_lite.inference import semantic_inference


def test_ex1_semantic_output_shape():
    ch07.check_ex1((7, 480, 640))
    ch07.check_ex1(torch.Size([7, 480, 640]))
    with pytest.raises(AssertionError, match="no-object column is dropped"):
        ch07.check_ex1((8, 480, 640))
    with pytest.raises(AssertionError, match="size of pred_masks"):
        ch07.check_ex1((7, 24, 32))
    with pytest.raises(AssertionError, match="resized back to the original"):
        ch07.check_ex1((7, 96, 128))
    with pytest.raises(AssertionError, match=r"\(height, width\)"):
        ch07.check_ex1((7, 640, 480))
    with pytest.raises(AssertionError, match="replace None"):
        ch07.check_ex1(None)


def test_ex1_sizes_follow_the_test_time_resize():
    """The sizes the exercise states are what the package's test-time resize gives."""
    h, w = ch07.EX1_ORIGINAL
    assert tuple(shortest_edge_shape(h, w, 128, 128)) == ch07.EX1_RESIZED
    assert all(s % 32 == 0 for s in ch07.EX1_PADDED)  # size_divisibility 32: no extra padding


def test_ex2_semantic_einsum():
    # (semantic_inference itself is what the check compares with; the einsum is independent)
    ch07.check_ex2(lambda c, m: torch.einsum("qc,qhw->chw", c.softmax(-1)[:, :-1], m.sigmoid()))

    def with_no_object(c, m):
        return torch.einsum("qc,qhw->chw", c.softmax(-1), m.sigmoid())

    def softmax_over_k(c, m):
        return torch.einsum("qc,qhw->chw", c[:, :-1].softmax(-1), m.sigmoid())

    def no_sigmoid(c, m):
        return torch.einsum("qc,qhw->chw", c.softmax(-1)[:, :-1], m)

    def hard_masks(c, m):
        return torch.einsum("qc,qhw->chw", c.softmax(-1)[:, :-1], (m > 0).float())

    with pytest.raises(AssertionError, match="K\\+1 = 5 channels"):
        ch07.check_ex2(with_no_object)
    with pytest.raises(AssertionError, match="softmax over the K classes only"):
        ch07.check_ex2(softmax_over_k)
    with pytest.raises(AssertionError, match="apply the sigmoid"):
        ch07.check_ex2(no_sigmoid)
    with pytest.raises(AssertionError, match="binarised"):
        ch07.check_ex2(hard_masks)
    with pytest.raises(AssertionError, match="argmax"):
        ch07.check_ex2(lambda c, m: semantic_inference(c, m).argmax(0))
    with pytest.raises(AssertionError, match="raised NotImplementedError"):
        ch07.check_ex2(lambda c, m: (_ for _ in ()).throw(NotImplementedError("todo")))


def test_ex3_keep_rule():
    def keep(mask_cls, threshold):
        scores, labels = mask_cls.softmax(-1).max(-1)
        return (labels != mask_cls.shape[-1] - 1) & (scores > threshold)

    ch07.check_ex3(keep)

    def forgets_label(mask_cls, threshold):
        return mask_cls.softmax(-1).max(-1).values > threshold

    def drops_column_first(mask_cls, threshold):
        return mask_cls.softmax(-1)[:, :-1].max(-1).values > threshold

    with pytest.raises(AssertionError, match="most likely class is 'no object'"):
        ch07.check_ex3(forgets_label)
    with pytest.raises(AssertionError, match="dropping the column first"):
        ch07.check_ex3(drops_column_first)
    with pytest.raises(AssertionError, match="not the logits"):
        ch07.check_ex3(lambda mask_cls, t: mask_cls.max(-1).values > t)
    with pytest.raises(AssertionError, match=r"shape \[Q\]"):
        ch07.check_ex3(lambda mask_cls, t: keep(mask_cls, t)[None])


def test_ex3_rule_is_the_package_rule():
    """The reference keep rule gives the queries panoptic_inference turns into segments."""
    from m2f_lite.inference import panoptic_inference

    mask_cls = ch07._ex3_logits()  # [Q, K+1], K = 3
    q = mask_cls.shape[0]
    mask_pred = torch.full((q, q, 4), -5.0)  # [Q, H, W]: query i owns row i alone
    for i in range(q):
        mask_pred[i, i] = 5.0
    _, segments = panoptic_inference(
        mask_cls, mask_pred, is_thing=[True] * 3, object_mask_threshold=0.5, overlap_threshold=0.8
    )
    assert len(segments) == int(ch07.reference_keep(mask_cls, 0.5).sum())


def test_ex4_instance_scores():
    def by_hand(mask_cls, mask_pred, topk):
        k = mask_cls.shape[-1] - 1
        probs, flat = F.softmax(mask_cls, -1)[:, :-1].flatten().topk(topk)
        query = flat // k
        inside = (mask_pred[query] > 0).float().flatten(1)
        quality = (mask_pred[query].sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
        order = torch.randperm(topk, generator=torch.Generator().manual_seed(0))
        return (probs * quality)[order], (flat % k)[order]  # any order is right

    ch07.check_ex4(by_hand)

    def class_only(mask_cls, mask_pred, topk):
        k = mask_cls.shape[-1] - 1
        probs, flat = F.softmax(mask_cls, -1)[:, :-1].flatten().topk(topk)
        return probs, flat % k

    def whole_image(mask_cls, mask_pred, topk):
        k = mask_cls.shape[-1] - 1
        probs, flat = F.softmax(mask_cls, -1)[:, :-1].flatten().topk(topk)
        return probs * mask_pred[flat // k].sigmoid().flatten(1).mean(1), flat % k

    def per_query(mask_cls, mask_pred, topk):
        probs, labels = F.softmax(mask_cls, -1)[:, :-1].max(-1)
        return probs, labels

    def with_no_object(mask_cls, mask_pred, topk):
        k1 = mask_cls.shape[-1]
        probs, flat = F.softmax(mask_cls, -1).flatten().topk(topk)
        return probs, flat % k1

    with pytest.raises(AssertionError, match="class probabilities alone"):
        ch07.check_ex4(class_only)
    with pytest.raises(AssertionError, match="INSIDE the binary mask"):
        ch07.check_ex4(whole_image)
    with pytest.raises(AssertionError, match="Q × K"):
        ch07.check_ex4(per_query)
    with pytest.raises(AssertionError, match="no-object column"):
        ch07.check_ex4(with_no_object)
    with pytest.raises(AssertionError, match="expected a pair"):
        ch07.check_ex4(lambda c, m, k: c)
