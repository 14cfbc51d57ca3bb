"""The chapter 2 exercise checks accept right answers and reject typical wrong ones with a hint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.exercises import ch02

RIGHT_SHAPES = {
    f"res{i + 2}": (2, c, math.ceil(200 / s), math.ceil(300 / s))
    for i, (c, s) in enumerate(zip((256, 512, 1024, 2048), (4, 8, 16, 32)))
}


def test_ex1_accepts_the_ceil_shapes():
    ch02.check_ex1(RIGHT_SHAPES)


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"res4": (2, 1024, 200 // 16, 300 // 16)}, "rounds up"),
        ({"res3": (2, 128, 25, 38)}, "4× their width"),
        ({"res5": (1, 2048, 7, 10)}, "batch dimension"),
        ({"res2": (2, 256, 100, 150)}, "stride 4"),
        ({"res5": (2048, 7, 10)}, "four numbers"),
    ],
)
def test_ex1_rejects_typical_mistakes(change, hint):
    with pytest.raises(AssertionError, match=hint):
        ch02.check_ex1({**RIGHT_SHAPES, **change})


def test_ex1_asks_to_fill_in_a_missing_prediction():
    with pytest.raises(AssertionError, match="fill in"):
        ch02.check_ex1({**RIGHT_SHAPES, "res3": None})


def test_ex1_wants_all_four_stages():
    with pytest.raises(AssertionError, match="keys"):
        ch02.check_ex1({k: v for k, v in RIGHT_SHAPES.items() if k != "res5"})


def test_ex2_accepts_the_three_convolutions():
    ch02.check_ex2(256 * 64 + 64 * 64 * 9 + 64 * 256)


@pytest.mark.parametrize(
    ("n", "hint"),
    [
        (256 * 64 + 64 * 64 * 9 + 64 * 256 + 2 * (64 + 64 + 256), "buffers, not parameters"),
        (256 * 64 + 64 * 64 * 9 + 64 * 256 + 256 * 256, "projection shortcut"),
        (256 * 64 + 64 * 64 * 9 + 64 * 256 + 64 + 64 + 256, "bias=False"),
        (256 * 64 + 64 * 64 + 64 * 256, "9 weights"),
    ],
)
def test_ex2_rejects_typical_mistakes(n, hint):
    with pytest.raises(AssertionError, match=hint):
        ch02.check_ex2(n)


def _empirical_receptive_field(layers, size=256):
    """Receptive field and jump of a 1-D stack of positive-weight convolutions, measured: the
    input positions with a non-zero gradient for one output unit, and the distance between the
    first positions that two neighbouring units see."""
    x = torch.zeros(1, 1, size, requires_grad=True)
    y = x + 1.0
    for k, s in layers:
        y = F.conv1d(y, torch.ones(1, 1, k), stride=s)

    def seen(unit):
        (grad,) = torch.autograd.grad(y[0, 0, unit], x, retain_graph=True)
        return torch.nonzero(grad[0, 0]).flatten()

    first, second = seen(0), seen(1)
    return len(first), int(second[0] - first[0])


@pytest.mark.parametrize("layers", ch02.EX3_CASES)
def test_reference_receptive_field_matches_a_measured_one(layers):
    assert ch02.reference_receptive_field(layers) == _empirical_receptive_field(layers)


def test_ex3_accepts_the_recurrence():
    # (not the check's own reference_receptive_field: an answer independent of the check)
    ch02.check_ex3(lambda layers: _empirical_receptive_field(layers))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (
            lambda layers: (1 + sum(k - 1 for k, _ in layers), math.prod(s for _, s in layers)),
            "not one",
        ),
        (lambda layers: (ch02.reference_receptive_field(layers)[0], 1), "product of the strides"),
        (
            lambda layers: (
                ch02.reference_receptive_field(layers)[0] + 1,
                math.prod(s for _, s in layers),
            ),
            "r = 1",
        ),
        (lambda layers: ch02.reference_receptive_field(layers)[0], "pair"),
    ],
)
def test_ex3_rejects_typical_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch02.check_ex3(wrong)


def _slice_mask(height, width, window, shift):
    """The official construction: label 3×3 slabs with slices, compare labels within a window."""
    label = torch.zeros(height, width, dtype=torch.long)
    slabs = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in slabs for w in slabs):
        label[h, w] = i
    windows = label.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    return windows[:, :, None] != windows[:, None, :]


def test_ex4_accepts_the_official_construction():
    # (the package's shifted_window_mask is what the check compares with: passing it proves
    # nothing; the official slice construction is an independent right answer)
    ch02.check_ex4(_slice_mask)


def _column_major(height, width, window, shift):
    mask = _slice_mask(height, width, window, shift)
    order = torch.arange(mask.shape[0]).view(height // window, width // window).T.flatten()
    return mask[order]


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda h, w, m, s: ~_slice_mask(h, w, m, s), "inverted"),
        (_column_major, "wrong order"),
        (lambda h, w, m, s: _slice_mask(h, w, m, s).float(), "boolean"),
        (lambda h, w, m, s: _slice_mask(h, w, m, s)[:, :, 0], "expected shape"),
        (lambda h, w, m, s: torch.zeros_like(_slice_mask(h, w, m, s)), "same region"),
        (lambda h, w, m, s: None, "returned None"),
    ],
)
def test_ex4_rejects_typical_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch02.check_ex4(wrong)
