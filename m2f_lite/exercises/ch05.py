"""Checks for the exercises of chapter 5 (masked attention).

Each ``check_exN`` returns ``None`` when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint::

    from m2f_lite.exercises import ch05
    ch05.check_ex2(my_attention_mask)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from m2f_lite.modeling.mask_head import attention_mask

STRIDES = (32, 16, 8)  # the memory scales, coarsest first, as the decoder visits them

# --- exercise 1: the shape of the attention mask ----------------------------------------------

EX1 = {"B": 2, "heads": 8, "Q": 100, "H": 512, "W": 768, "layer": 4}  # layer: 0-based index


def _ex1_expected() -> tuple[int, int, int, int]:
    stride = STRIDES[EX1["layer"] % len(STRIDES)]
    return (EX1["B"], 1, EX1["Q"], (EX1["H"] // stride) * (EX1["W"] // stride))


def check_ex1(shape: tuple[int, ...]) -> None:
    """The shape of the boolean mask that decoder layer 4 (0-based) passes to its cross-attention,
    for B = 2 padded 512×768 images, 8 heads and Q = 100 queries."""
    expected = _ex1_expected()
    B, h, Q, H, W = EX1["B"], EX1["heads"], EX1["Q"], EX1["H"], EX1["W"]
    assert shape is not None, "replace None by your answer, a tuple such as (B, ..., ...)"
    got = tuple(int(s) for s in shape)
    if got == expected:
        return
    HW = expected[-1]
    stride = STRIDES[EX1["layer"] % len(STRIDES)]
    if got in ((B * h, Q, HW), (B, h, Q, HW)):
        hint = (
            "that repeats the mask for every head, as the official code does ([B·h, Q, HW]); the "
            "package passes ONE mask for all heads, [B, 1, Q, HW], which broadcasts over the heads"
        )
    elif got == (B, Q, HW):
        hint = (
            "that is what attention_mask returns; the layer adds a head dimension of size 1 "
            "([:, None]) so that the mask broadcasts over the heads"
        )
    elif got == (B, 1, Q, H // stride, W // stride):
        hint = "the key positions are flattened: the last dimension is h·w"
    elif len(got) == 4 and got[-1] == (H // 4) * (W // 4):
        hint = (
            "that is the stride-4 resolution of the predicted masks; the mask is resized to the "
            "memory scale that this layer attends to"
        )
    elif len(got) == 4 and got[-1] in [(H // s) * (W // s) for s in STRIDES]:
        hint = (
            f"wrong memory scale: layer {EX1['layer']} visits level {EX1['layer']} % 3 = "
            f"{EX1['layer'] % 3} of (stride 32, 16, 8)"
        )
    else:
        hint = "[B, 1, Q, h·w], with (h, w) the size of the memory map that the layer attends to"
    raise AssertionError(f"expected shape {expected}, got {got}: {hint}")


# --- exercise 2: the attention mask M (Eq. ch05-eq-mask) ----------------------------------------


def _ex2_inputs() -> tuple[torch.Tensor, tuple[int, int]]:
    gen = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(2, 6, 12, 16, generator=gen)  # [B, Q, H/4, W/4]
    logits[0, 0] = -1.0 - logits[0, 0].abs()  # an empty mask: blocked everywhere before the fix
    logits[1, 2] = 1.0 + logits[1, 2].abs()  # a mask that covers the whole image
    return logits, (3, 5)  # (h, w): not a divisor of (12, 16), not square


def check_ex2(attention_mask_fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]) -> None:
    """``attention_mask_fn(mask_logits [B, Q, H, W], size (h, w))`` → bool ``[B, Q, h·w]``,
    True = blocked, equal to ``m2f_lite.modeling.mask_head.attention_mask``."""
    logits, size = _ex2_inputs()
    expected = attention_mask(logits, size)
    got = attention_mask_fn(logits.clone(), size)
    assert isinstance(got, torch.Tensor), (
        f"return a [B, Q, h*w] boolean tensor, got {type(got).__name__}"
    )
    B, Q = logits.shape[:2]
    h, w = size
    if tuple(got.shape) == (B, Q, h, w):
        raise AssertionError(
            f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}: flatten the two "
            "spatial dimensions (.flatten(2)), the keys of the attention are a sequence of h*w tokens"
        )
    assert tuple(got.shape) == tuple(expected.shape), (
        f"expected shape {tuple(expected.shape)} ([B, Q, h*w] at the memory size {size}), got "
        f"{tuple(got.shape)}. Resize the mask logits to `size` first."
    )
    assert got.dtype == torch.bool, (
        f"return a boolean tensor (True = blocked), got dtype {got.dtype}; the -inf of M is "
        "added by the attention, which fills the blocked scores"
    )
    if torch.equal(got, expected):
        return

    def blocked(resized: torch.Tensor) -> torch.Tensor:
        b = resized.flatten(2).sigmoid() < 0.5
        return b & ~b.all(-1, keepdim=True)

    bilinear = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    raw = bilinear.flatten(2).sigmoid() < 0.5
    if torch.equal(got, ~expected) or torch.equal(got, ~raw):
        raise AssertionError(
            "True must mean BLOCKED (nn.MultiheadAttention's convention): blocked where "
            "sigmoid(logit) < 0.5; your mask is the allowed region"
        )
    if torch.equal(got, raw):
        raise AssertionError(
            "a query whose mask is empty (blocked everywhere) must attend everywhere instead: "
            "a softmax over only -inf is NaN. Unblock rows that are all True "
            "(blocked & ~blocked.all(-1, keepdim=True))"
        )
    variants = {
        "align_corners=True; the package resizes with align_corners=False": blocked(
            F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        ),
        "nearest-neighbour resizing; the package resizes bilinearly": blocked(
            F.interpolate(logits, size=size, mode="nearest")
        ),
        "the probabilities resized instead of the logits; resize the logits, then threshold": (
            lambda b: b & ~b.all(-1, keepdim=True)
        )(F.interpolate(logits.sigmoid(), size=size, mode="bilinear").flatten(2) < 0.5),
    }
    for hint, value in variants.items():
        if torch.equal(got, value):
            raise AssertionError(f"your mask matches {hint}")
    wrong = (got != expected).sum().item()
    raise AssertionError(
        f"{wrong} of {expected.numel()} entries differ from the package's mask. Resize the logits "
        "bilinearly (align_corners=False) to `size`, flatten, block where sigmoid < 0.5, then "
        "unblock the rows that are blocked everywhere."
    )


# --- exercise 3: the round robin over scales ---------------------------------------------------


def check_ex3(stride_of: Callable[[int], int]) -> None:
    """``stride_of(layer)`` → the stride (32, 16 or 8) of the memory that decoder layer ``layer``
    (0-based) attends to, for any number of layers."""
    layers = range(12)
    expected = [STRIDES[i % 3] for i in layers]
    got = [stride_of(i) for i in layers]
    assert all(g is not None for g in got), "stride_of returned None: return an int (32, 16 or 8)"
    got = [int(g) for g in got]
    if got == expected:
        return
    if got == [STRIDES[::-1][i % 3] for i in layers]:
        hint = "the decoder starts at the COARSEST scale (stride 32, res5), then 16, then 8"
    elif got == [STRIDES[(i + 1) % 3] for i in layers] or got == [
        STRIDES[(i - 1) % 3] for i in layers
    ]:
        hint = "off by one layer: layer 0, the first, attends to stride 32"
    elif got[:3] == expected[:3]:
        hint = "after stride 8 the decoder starts again at stride 32: level = layer % 3"
    else:
        hint = "level = layer % 3, strides (32, 16, 8)"
    raise AssertionError(f"for layers 0..11 expected strides {expected}, got {got}: {hint}")


# --- exercise 4: the cost of masked attention --------------------------------------------------

EX4 = {"H": 1024, "W": 1024, "Q": 100, "heads": 8, "layers": 9}


def _ex4_expected() -> int:
    H, W = EX4["H"], EX4["W"]
    keys = sum((H // STRIDES[i % 3]) * (W // STRIDES[i % 3]) for i in range(EX4["layers"]))
    return EX4["Q"] * EX4["heads"] * keys


def check_ex4(*, scores_standard: int, scores_masked: int) -> None:
    """Query-key scores computed per image by the 9 cross-attention layers of the official
    configuration (1024×1024 input, Q = 100, 8 heads), with standard and with masked attention
    as the package computes them."""
    expected = _ex4_expected()
    H, W, Q, h = EX4["H"], EX4["W"], EX4["Q"], EX4["heads"]
    problems = []
    if scores_standard != expected:
        per_round = sum((H // s) * (W // s) for s in STRIDES)
        if scores_standard == Q * per_round * 3:
            hint = "every head computes its own scores: multiply by the 8 heads"
        elif scores_standard == Q * h * (H // 4) * (W // 4) * EX4["layers"]:
            hint = "the keys are the memory tokens at strides 32, 16, 8, not the stride-4 pixels"
        elif scores_standard in [Q * h * (H // s) * (W // s) * EX4["layers"] for s in STRIDES]:
            hint = "each layer attends to ONE scale, round robin: 3 layers at each of 32, 16, 8"
        elif scores_standard == Q * h * per_round:
            hint = "that is one round of 3 layers; there are 9 layers"
        else:
            hint = "sum over the 9 layers of Q · heads · (H/s · W/s), s = 32, 16, 8, 32, ..."
        problems.append(f"scores_standard = {scores_standard} is not right ({hint})")
    if scores_masked != expected:
        if scores_masked < expected:
            hint = (
                "the package computes every score densely, then sets the blocked ones to -inf "
                "before the softmax: the mask changes WHERE a query attends, not the cost "
                "(only a sparse kernel could skip the blocked keys)"
            )
        else:
            hint = "masking adds no scores: it fills some of them with -inf"
        problems.append(f"scores_masked = {scores_masked} is not right ({hint})")
    assert not problems, "; ".join(problems)
