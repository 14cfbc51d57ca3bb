"""The chapter 3 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.exercises import ch03
from m2f_lite.modeling.ms_deform_attn import ms_deform_attn_reference


def test_ex1_shapes():
    S = 60 * 80 + 30 * 40 + 15 * 20
    ch03.check_ex1(S=S, locations=(2, S, 8, 3, 4, 2), weights=(2, S, 8, 3, 4), output=(2, S, 256))
    right = {"locations": (2, S, 8, 3, 4, 2), "weights": (2, S, 8, 3, 4), "output": (2, S, 256)}
    with pytest.raises(AssertionError, match="not res2"):
        ch03.check_ex1(S=S + 120 * 160, **right)
    with pytest.raises(AssertionError, match="that is one level"):
        ch03.check_ex1(S=60 * 80, **right)
    with pytest.raises(AssertionError, match=r"levels and points are separate"):
        ch03.check_ex1(S=S, **{**right, "locations": (2, S, 8, 12, 2)})
    with pytest.raises(AssertionError, match=r"viewed back"):
        ch03.check_ex1(S=S, **{**right, "weights": (2, S, 8, 12)})
    with pytest.raises(AssertionError, match=r"concatenated back"):
        ch03.check_ex1(S=S, **{**right, "output": (2, S, 8, 32)})


def test_ex2_initial_sampling_point():
    ch03.check_ex2(x=168.0, y=152.0)
    with pytest.raises(AssertionError, match="multiply by its stride"):
        ch03.check_ex2(x=198.0, y=122.0)  # level pixels taken as image pixels
    with pytest.raises(AssertionError, match="y grows downwards"):
        ch03.check_ex2(x=168.0, y=88.0)
    c = math.cos(3 * math.pi / 4)
    with pytest.raises(AssertionError, match="square ring"):
        ch03.check_ex2(x=200 + 2 * c * 16, y=120 - 2 * c * 16)
    with pytest.raises(AssertionError, match="k level pixels away"):
        ch03.check_ex2(x=200 - 3 * 16, y=120 + 3 * 16)
    with pytest.raises(AssertionError, match="stride-16 level is 16 image pixels"):
        ch03.check_ex2(x=0.0, y=0.0)


def _by_grid_sample(feature, x, y, **options):
    grid = torch.tensor([[[[2 * x - 1, 2 * y - 1]]]], dtype=feature.dtype)
    settings = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False, **options}
    return F.grid_sample(feature[None], grid, **settings).view(-1)


def test_ex3_bilinear_sample():
    ch03.check_ex3(_by_grid_sample)

    def by_hand(feature, x, y):  # an independent loop over the four neighbours
        _, H, W = feature.shape
        u, v = x * W - 0.5, y * H - 0.5
        out = torch.zeros(feature.shape[0])
        for ui in (math.floor(u), math.floor(u) + 1):
            for vj in (math.floor(v), math.floor(v) + 1):
                if 0 <= ui < W and 0 <= vj < H:
                    out += (1 - abs(u - ui)) * (1 - abs(v - vj)) * feature[:, vj, ui]
        return out

    ch03.check_ex3(by_hand)
    ch03.check_ex3(lambda f, x, y: _by_grid_sample(f.transpose(1, 2), y, x))  # same numbers
    with pytest.raises(AssertionError, match="align_corners=True"):
        ch03.check_ex3(lambda f, x, y: _by_grid_sample(f, x, y, align_corners=True))
    with pytest.raises(AssertionError, match="border pixels were repeated"):
        ch03.check_ex3(lambda f, x, y: _by_grid_sample(f, x, y, padding_mode="border"))
    with pytest.raises(AssertionError, match="x and y swapped"):
        ch03.check_ex3(lambda f, x, y: _by_grid_sample(f, y, x))
    with pytest.raises(AssertionError, match=r"shape \(3,\)"):
        ch03.check_ex3(lambda f, x, y: _by_grid_sample(f, x, y)[None])
    with pytest.raises(AssertionError, match="returned None"):
        ch03.check_ex3(lambda f, x, y: None)
    with pytest.raises(AssertionError, match=r"u = x \* W - 0\.5"):
        ch03.check_ex3(lambda f, x, y: f[:, 0, 0])  # nearest-pixel guess


def _with_options(value, shapes, locations, weights, **options):
    """ms_deform_attn with other grid_sample options, written independently of the check."""
    B, _, M, D = value.shape
    Lq = locations.shape[1]
    out = torch.zeros(B, M, D, Lq)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        grid = (2 * locations[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, grid, mode="bilinear", **options).view(B, M, D, Lq, -1)
        out += (sampled * weights[:, :, :, lvl].transpose(1, 2)[:, :, None]).sum(-1)
    return out.permute(0, 3, 1, 2).reshape(B, Lq, M * D)


def test_ex4_msda_without_grid_sample():
    # an independent right answer (the check compares with ms_deform_attn_reference itself)
    ch03.check_ex4(
        lambda *a: _with_options(*a, padding_mode="zeros", align_corners=False)
    )  # the helper is right with the model's options
    with pytest.raises(AssertionError, match="align_corners=True"):
        ch03.check_ex4(lambda *a: _with_options(*a, padding_mode="zeros", align_corners=True))
    with pytest.raises(AssertionError, match="border padding"):
        ch03.check_ex4(lambda *a: _with_options(*a, padding_mode="border", align_corners=False))

    def swapped(value, shapes, locations, weights):
        return ms_deform_attn_reference(value, shapes, locations.flip(-1), weights)

    def unweighted(value, shapes, locations, weights):
        return ms_deform_attn_reference(value, shapes, locations, torch.ones_like(weights))

    def channels_head_last(value, shapes, locations, weights):
        out = ms_deform_attn_reference(value, shapes, locations, weights)
        B, Lq = out.shape[:2]
        M, D = value.shape[2:]
        return out.view(B, Lq, M, D).transpose(2, 3).reshape(B, Lq, M * D)

    with pytest.raises(AssertionError, match="x and y swapped"):
        ch03.check_ex4(swapped)
    with pytest.raises(AssertionError, match="attention weight A"):
        ch03.check_ex4(unweighted)
    with pytest.raises(AssertionError, match="wrong order"):
        ch03.check_ex4(channels_head_last)
    with pytest.raises(AssertionError, match=r"\[B, Lq, M\*D\]"):
        ch03.check_ex4(lambda value, *a: value)
    with pytest.raises(AssertionError, match="differs from ms_deform_attn_reference"):
        ch03.check_ex4(lambda *a: ms_deform_attn_reference(*a) + 0.1)
