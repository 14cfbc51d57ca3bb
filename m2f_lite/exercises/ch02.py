"""Checks for the exercises of chapter 2 (the backbone).

Each ``check_exN`` returns ``None`` when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint::

    from m2f_lite.exercises import ch02
    ch02.check_ex1({"res2": (2, 256, 50, 75), ...})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.swin import shifted_window_mask

# --- exercise 1: predict the feature shapes -------------------------------------------------------

EX1_INPUT = (2, 3, 200, 300)  # [B, 3, H, W] fed to ResNet-50


@functools.cache
def _ex1_expected() -> dict[str, tuple[int, ...]]:
    """The shapes, from the package's ResNet-50 run on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        backbone = build_backbone("resnet50")
        features = backbone(torch.empty(EX1_INPUT))
    return {name: tuple(f.shape) for name, f in features.items()}


def check_ex1(shapes: dict[str, Sequence[int]]) -> None:
    """``shapes``: ``{"res2": (B, C, H, W), ..., "res5": ...}`` for ResNet-50 on :data:`EX1_INPUT`."""
    expected = _ex1_expected()
    assert isinstance(shapes, dict) and set(shapes) == set(expected), (
        f"give a dict with the keys {sorted(expected)}, got {sorted(shapes) if isinstance(shapes, dict) else type(shapes).__name__}"
    )
    B, _, H, W = EX1_INPUT
    for name, stride in zip(sorted(expected), (4, 8, 16, 32)):
        assert shapes[name] is not None, f"{name}: fill in your prediction (B, C, H, W)"
        got, exp = tuple(shapes[name]), expected[name]
        assert len(got) == 4, f"{name}: give four numbers [B, C, H, W], got {got}"
        assert got[0] == B, f"{name}: the batch dimension stays {B}, got {got[0]}"
        assert got[1] == exp[1], (
            f"{name}: {got[1]} channels is not right. ResNet-50's bottleneck blocks output 4× their "
            f"width (64, 128, 256, 512), so res2..res5 have 256, 512, 1024, 2048 channels."
        )
        if got[2:] != exp[2:]:
            floor = (H // stride, W // stride)
            hint = (
                f"each stride-2 layer rounds up (a 3×3 conv with padding 1 maps n to ⌈n/2⌉), so the "
                f"size is ⌈{H}/{stride}⌉ × ⌈{W}/{stride}⌉, not the floor {floor}"
                if got[2:] == floor
                else f"res{name[-1]} has stride {stride}: its size is ⌈H/{stride}⌉ × ⌈W/{stride}⌉"
            )
            raise AssertionError(f"{name}: spatial size {got[2:]} is not right; {hint}.")


# --- exercise 2: count the parameters of a bottleneck ---------------------------------------------


def _ex2_block() -> torch.nn.Module:
    with torch.device("meta"):
        return build_backbone("resnet50").body.layer1[1]


def check_ex2(n_params: int) -> None:
    """``n_params``: the number of trainable parameters of ResNet-50's ``layer1[1]`` (a bottleneck
    256 → 64 → 64 → 256 without a projection shortcut), BatchNorm frozen as in m2f_lite."""
    block = _ex2_block()
    expected = sum(p.numel() for p in block.parameters())
    if n_params == expected:
        return
    bn = sum(b.numel() for name, b in block.named_buffers() if name.endswith(("weight", "bias")))
    if n_params == expected + bn:
        raise AssertionError(
            f"{n_params} counts the BatchNorm scales and shifts ({bn}). In m2f_lite every BatchNorm "
            "is frozen (FrozenBatchNorm2d): its weight and bias are buffers, not parameters."
        )
    if n_params == expected + 256 * 256 or n_params == expected + 256 * 256 + bn:
        raise AssertionError(
            f"{n_params} includes a 1×1 projection shortcut (256·256). Only the first block of a "
            "stage has one (it changes width or stride); layer1[1] adds its input unchanged."
        )
    if n_params == expected + 64 + 64 + 256:
        raise AssertionError(
            f"{n_params} includes convolution biases: the convolutions of a ResNet have bias=False "
            "(the BatchNorm after each one has the shift)."
        )
    raise AssertionError(
        f"{n_params} is not right. Count the three convolutions: 1×1 from 256 to 64 channels, "
        "3×3 from 64 to 64 (9 weights per input-output pair), 1×1 from 64 to 256; no biases."
    )


# --- exercise 3: the theoretical receptive field --------------------------------------------------

EX3_CASES: list[list[tuple[int, int]]] = [
    [(3, 1)],
    [(3, 1), (3, 1)],
    [(2, 2), (2, 2), (2, 2)],
    [(7, 2), (3, 2)],  # ResNet's stem: 7×7 conv stride 2, then 3×3 max-pool stride 2
    [(7, 2), (3, 2), (3, 1), (3, 1), (3, 1), (3, 2), (3, 1)],
    [(1, 1), (5, 3), (3, 2), (1, 1), (3, 1)],
]


def reference_receptive_field(layers: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(r, j)`` after a stack of ``(kernel, stride)`` layers: the receptive field ``r`` (input
    pixels along one axis that one output unit can see) and the jump ``j`` (input pixels between
    neighbouring output units): ``r_l = r_{l-1} + (k_l - 1) j_{l-1}``, ``j_l = j_{l-1} s_l``."""
    r, j = 1, 1
    for k, s in layers:
        r, j = r + (k - 1) * j, j * s
    return r, j


def check_ex3(receptive_field: Callable[[list[tuple[int, int]]], tuple[int, int]]) -> None:
    """``receptive_field(layers)`` → ``(r, j)`` for a list of ``(kernel, stride)`` layers."""
    for layers in EX3_CASES:
        got = receptive_field(list(layers))
        assert isinstance(got, tuple | list) and len(got) == 2, (
            f"return a pair (receptive field, jump), got {got!r}"
        )
        r, j = (int(v) for v in got)
        exp_r, exp_j = reference_receptive_field(layers)
        strides = 1
        for _, s in layers:
            strides *= s
        if j != exp_j:
            raise AssertionError(
                f"layers {layers}: jump {j} is not right; the jump is the product of the strides "
                f"({exp_j}): neighbouring outputs are that many input pixels apart."
            )
        if r != exp_r:
            naive = 1 + sum(k - 1 for k, _ in layers)
            hint = (
                "each kernel adds (k - 1) steps, but a step of layer l spans the jump of the "
                "layers before it, j_{l-1} input pixels, not one"
                if r == naive
                else "r_l = r_{l-1} + (k_l - 1) · j_{l-1}, starting from r = 1, j = 1"
            )
            raise AssertionError(
                f"layers {layers}: receptive field {r} is not right ({exp_r}); {hint}."
            )


# --- exercise 4: the shifted-window attention mask ------------------------------------------------

EX4_CASES = [(14, 21, 7, 3), (7, 7, 7, 3), (8, 12, 4, 2), (12, 24, 12, 6)]


def check_ex4(window_mask: Callable[[int, int, int, int], torch.Tensor]) -> None:
    """``window_mask(height, width, window, shift)`` → bool ``[nW, M², M²]``, True = blocked, for a
    padded token map of ``height × width`` (multiples of ``window``) rolled by ``-shift``;
    compared with the package's ``m2f_lite.modeling.swin.shifted_window_mask``."""
    for height, width, window, shift in EX4_CASES:
        expected = shifted_window_mask(height, width, window, shift, torch.device("cpu"))
        where = f"height={height}, width={width}, window={window}, shift={shift}"
        out = window_mask(height, width, window, shift)
        assert out is not None, f"{where}: window_mask returned None; return the mask tensor"
        got = torch.as_tensor(out)
        assert got.shape == expected.shape, (
            f"{where}: expected shape {tuple(expected.shape)} = [number of windows, M², M²], got "
            f"{tuple(got.shape)}"
        )
        assert got.dtype == torch.bool, f"{where}: return a boolean mask, got {got.dtype}"
        if torch.equal(got, expected):
            continue
        assert not torch.equal(got, ~expected), (
            f"{where}: your mask is inverted. Here True means *blocked* (PyTorch's "
            "nn.MultiheadAttention convention), False means the pair may attend."
        )
        same_sets = sorted(map(tuple, got.flatten(1).tolist())) == sorted(
            map(tuple, expected.flatten(1).tolist())
        )
        assert not same_sets, (
            f"{where}: the right windows in the wrong order. Windows are numbered row by row "
            "(window_partition's order): first all windows of the top band, left to right."
        )
        w, q, k = (int(v) for v in torch.nonzero(got != expected)[0])
        raise AssertionError(
            f"{where}: window {w}, query token {q} (row {q // window}, col {q % window}) and key "
            f"token {k} (row {k // window}, col {k % window}): expected blocked="
            f"{bool(expected[w, q, k])}, got {bool(got[w, q, k])}. Two tokens may attend to each "
            "other only if they come from the same region of the rolled map: rows [0, H-M), "
            "[H-M, H-s), [H-s, H) and the same for columns."
        )
