"""The chapter 5 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.exercises import ch05


def test_ex1_mask_shape():
    ch05.check_ex1((2, 1, 100, 32 * 48))
    with pytest.raises(AssertionError, match="ONE mask for all heads"):
        ch05.check_ex1((16, 100, 32 * 48))
    with pytest.raises(AssertionError, match="ONE mask for all heads"):
        ch05.check_ex1((2, 8, 100, 32 * 48))
    with pytest.raises(AssertionError, match="head dimension of size 1"):
        ch05.check_ex1((2, 100, 32 * 48))
    with pytest.raises(AssertionError, match="flattened"):
        ch05.check_ex1((2, 1, 100, 32, 48))
    with pytest.raises(AssertionError, match="stride-4 resolution"):
        ch05.check_ex1((2, 1, 100, 128 * 192))
    with pytest.raises(AssertionError, match=r"wrong memory scale: layer 4 visits level 4 % 3 = 1"):
        ch05.check_ex1((2, 1, 100, 64 * 96))
    with pytest.raises(AssertionError, match="replace None"):
        ch05.check_ex1(None)


def _mask(logits, size, *, fix=True, invert=False, **resize):
    resized = F.interpolate(logits, size=size, **(resize or {"mode": "bilinear"}))
    blocked = resized.flatten(2).sigmoid() < 0.5
    if fix:
        blocked = blocked & ~blocked.all(-1, keepdim=True)
    return ~blocked if invert else blocked


def test_ex2_attention_mask():
    ch05.check_ex2(_mask)  # independent of attention_mask, which the check compares with
    with pytest.raises(AssertionError, match="empty"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size, fix=False))
    with pytest.raises(AssertionError, match="True must mean BLOCKED"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size, invert=True))
    with pytest.raises(AssertionError, match="align_corners=True"):
        ch05.check_ex2(
            lambda logits, size: _mask(logits, size, mode="bilinear", align_corners=True)
        )
    with pytest.raises(AssertionError, match="nearest-neighbour"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size, mode="nearest"))
    with pytest.raises(AssertionError, match="flatten the two spatial dimensions"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size).unflatten(-1, size))
    with pytest.raises(AssertionError, match="boolean"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size).float())
    with pytest.raises(AssertionError, match="Resize the mask logits"):
        ch05.check_ex2(lambda logits, size: logits.flatten(2) < 0)
    with pytest.raises(AssertionError, match="entries differ"):
        ch05.check_ex2(lambda logits, size: _mask(logits, size) ^ torch.eye(1, 15, dtype=bool))
    with pytest.raises(AssertionError, match="got NoneType"):
        ch05.check_ex2(lambda logits, size: None)


def test_ex3_round_robin():
    ch05.check_ex3(lambda layer: (32, 16, 8)[layer % 3])
    with pytest.raises(AssertionError, match="COARSEST"):
        ch05.check_ex3(lambda layer: (8, 16, 32)[layer % 3])
    with pytest.raises(AssertionError, match="off by one"):
        ch05.check_ex3(lambda layer: (32, 16, 8)[(layer + 1) % 3])
    with pytest.raises(AssertionError, match="starts again at stride 32"):
        ch05.check_ex3(lambda layer: (32, 16, 8)[min(layer, 2)])
    with pytest.raises(AssertionError, match="returned None"):
        ch05.check_ex3(lambda layer: None)


def test_ex4_cost():
    per_round = 32**2 + 64**2 + 128**2
    right = 100 * 8 * 3 * per_round
    ch05.check_ex4(scores_standard=right, scores_masked=right)
    with pytest.raises(AssertionError, match="computes every score densely"):
        ch05.check_ex4(scores_standard=right, scores_masked=right // 10)
    with pytest.raises(AssertionError, match="multiply by the 8 heads"):
        ch05.check_ex4(scores_standard=100 * 3 * per_round, scores_masked=right)
    with pytest.raises(AssertionError, match="ONE scale, round robin"):
        ch05.check_ex4(scores_standard=100 * 8 * 9 * 128**2, scores_masked=right)
    with pytest.raises(AssertionError, match="one round of 3 layers"):
        ch05.check_ex4(scores_standard=100 * 8 * per_round, scores_masked=right)
    with pytest.raises(AssertionError, match="not the stride-4 pixels"):
        ch05.check_ex4(scores_standard=100 * 8 * 9 * 256**2, scores_masked=right)
