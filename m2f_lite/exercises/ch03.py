"""Checks for the exercises of chapter 3 (multi-scale deformable attention).

Each ``check_exN`` returns ``None`` when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint::

    from m2f_lite.exercises import ch03
    ch03.check_ex3(bilinear_sample)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from m2f_lite.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_reference

# --- exercise 1: predict the shapes ---------------------------------------------------------------

EX1_IMAGE = (480, 640)  # H, W
EX1_BATCH = 2
EX1_STRIDES = (8, 16, 32)
EX1_MODULE = {"d_model": 256, "n_levels": 3, "n_heads": 8, "n_points": 4}


def _ex1_expected() -> dict:
    h, w = EX1_IMAGE
    B, C = EX1_BATCH, EX1_MODULE["d_model"]
    M, L, P = EX1_MODULE["n_heads"], EX1_MODULE["n_levels"], EX1_MODULE["n_points"]
    S = sum((h // s) * (w // s) for s in EX1_STRIDES)
    return {
        "S": S,
        "locations": (B, S, M, L, P, 2),
        "weights": (B, S, M, L, P),
        "output": (B, S, C),
    }


def check_ex1(*, S: int, locations: tuple, weights: tuple, output: tuple) -> None:
    """Predict ``S`` and the shapes of the sampling locations, attention weights and output."""
    expected = _ex1_expected()
    h, w = EX1_IMAGE
    problems = []
    if S != expected["S"]:
        with_res2 = expected["S"] + (h // 4) * (w // 4)
        if S == with_res2:
            hint = "the encoder takes strides 8, 16 and 32 only (res3..res5), not res2"
        elif S in [(h // s) * (w // s) for s in EX1_STRIDES]:
            hint = "that is one level; the encoder flattens and concatenates all three"
        else:
            hint = "S = sum over the levels of H_l * W_l, with H_l = H / stride, W_l = W / stride"
        problems.append(f"S = {S} is not right ({hint})")
    locations, weights, output = tuple(locations), tuple(weights), tuple(output)
    B, S_, M, L, P, _ = expected["locations"]
    if locations != expected["locations"]:
        if locations == (B, S_, M, L * P, 2):
            hint = "levels and points are separate dimensions: [B, Lq, M, L, P, 2]"
        elif len(locations) == 6 and locations[-1] != 2:
            hint = "the last dimension holds (x, y)"
        else:
            hint = "one (x, y) per query, head, level and point: [B, Lq, M, L, P, 2]"
        problems.append(f"locations {locations} is not right ({hint})")
    if weights != expected["weights"]:
        if weights == (B, S_, M, L * P):
            hint = (
                "the softmax runs over the L*P samples of a head, but the tensor is viewed back "
                "to keep levels and points apart: [B, Lq, M, L, P]"
            )
        else:
            hint = "one weight per query, head, level and point: [B, Lq, M, L, P]"
        problems.append(f"weights {weights} is not right ({hint})")
    if output != expected["output"]:
        if output == (B, S_, M, EX1_MODULE["d_model"] // M):
            hint = "the heads' D channels are concatenated back to C = M * D, then output_proj"
        else:
            hint = "the output has one C-vector per query: [B, Lq, C]"
        problems.append(f"output {output} is not right ({hint})")
    assert not problems, "; ".join(problems)


# --- exercise 2: where does a head look at initialisation? ----------------------------------------

EX2 = {"image": 512, "ref_xy": (200.0, 120.0), "head": 3, "point": 2, "stride": 16, "n_heads": 8}


def _ex2_expected() -> tuple[float, float]:
    """Ask a freshly initialised module: its offsets are its bias (the weight is zero)."""
    n_levels, n_points = 3, 4
    module = MSDeformAttn(d_model=8, n_levels=n_levels, n_heads=EX2["n_heads"], n_points=n_points)
    offsets = module.sampling_offsets.bias.detach().view(EX2["n_heads"], n_levels, n_points, 2)
    level = [8, 16, 32].index(EX2["stride"])
    dx, dy = offsets[EX2["head"], level, EX2["point"] - 1].tolist()  # level pixels
    x, y = EX2["ref_xy"]
    return x + dx * EX2["stride"], y + dy * EX2["stride"]


def check_ex2(*, x: float, y: float) -> None:
    """The image pixel (x, y) where head 3 puts its second point on the stride-16 level."""
    ex, ey = _ex2_expected()
    if abs(x - ex) < 0.5 and abs(y - ey) < 0.5:
        return
    rx, ry = EX2["ref_xy"]
    s, k = EX2["stride"], EX2["point"]
    theta = 2 * math.pi * EX2["head"] / EX2["n_heads"]
    cx, cy = math.cos(theta), math.sin(theta)
    dx, dy = (ex - rx) / s, (ey - ry) / s  # the right offset, in level pixels
    candidates = {
        "the offsets are in pixels of the level: multiply by its stride to get image pixels": (
            rx + dx,
            ry + dy,
        ),
        "in images y grows downwards, and sin(θ) > 0 moves the point down": (
            rx + dx * s,
            ry - dy * s,
        ),
        "the direction (cos θ, sin θ) is divided by its largest absolute coordinate, so the "
        "points lie on a square ring": (rx + k * cx * s, ry + k * cy * s),
        "the k-th point is k level pixels away (the code's index k-1 gets the factor k)": (
            rx + dx / k * (k + 1) * s,
            ry + dy / k * (k + 1) * s,
        ),
        "x is the first coordinate and y the second": (rx + dy * s, ry + dx * s),
    }
    for hint, (cx_, cy_) in candidates.items():
        if abs(x - cx_) < 0.5 and abs(y - cy_) < 0.5:
            raise AssertionError(f"({x}, {y}) is not right: {hint}.")
    raise AssertionError(
        f"({x}, {y}) is not right. Head m looks along θ_m = 2πm/M; the k-th point is k pixels of the "
        "level away along the direction (cos θ, sin θ) / max(|cos θ|, |sin θ|); one pixel of the "
        f"stride-{s} level is {s} image pixels."
    )


# --- exercise 3: bilinear sampling of one point ---------------------------------------------------


def _sample(
    feature: torch.Tensor,
    x: float,
    y: float,
    *,
    align_corners: bool = False,
    padding: str = "zeros",
) -> torch.Tensor:
    """``grid_sample`` of one point of a ``[C, H, W]`` map at normalised (x, y): ``[C]``."""
    grid = torch.tensor([[[[2 * x - 1, 2 * y - 1]]]], dtype=feature.dtype)  # [1, 1, 1, 2]
    out = F.grid_sample(
        feature[None], grid, mode="bilinear", padding_mode=padding, align_corners=align_corners
    )
    return out.view(-1)  # [C]


EX3_POINTS = [
    (0.37, 0.61),  # between pixels
    (0.5 / 5, 0.5 / 4),  # exactly the centre of pixel (0, 0)
    (0.0, 0.0),  # the top-left corner of the map: only a quarter of pixel (0, 0)
    (1.0, 0.3),  # the right edge
    (0.97, 1.05),  # just below the bottom-right, partly outside
    (-0.4, 0.5),  # outside: reads zero
    (0.23, 0.88),
]


def check_ex3(bilinear_sample: Callable[[torch.Tensor, float, float], torch.Tensor]) -> None:
    """``bilinear_sample(feature [C, H, W], x, y)`` → ``[C]``, as ``grid_sample`` (bilinear,
    zeros padding, ``align_corners=False``) reads it at the normalised location (x, y)."""
    gen = torch.Generator().manual_seed(3)
    feature = torch.rand(3, 4, 5, generator=gen) + 0.5  # [C, H, W], H != W, no zeros
    answers = []
    for x, y in EX3_POINTS:
        got = bilinear_sample(feature.clone(), x, y)
        assert got is not None, "bilinear_sample returned None: return the [C] vector"
        got = torch.as_tensor(got, dtype=feature.dtype)
        assert got.shape == (3,), (
            f"bilinear_sample(feature [3, 4, 5], {x}, {y}) should return one value per channel, "
            f"shape (3,), got {tuple(got.shape)}"
        )
        answers.append(got)
    got = torch.stack(answers)  # [points, C]

    def at_all_points(**options) -> torch.Tensor:
        return torch.stack([_sample(feature, x, y, **options) for x, y in EX3_POINTS])

    expected = at_all_points()
    if torch.allclose(got, expected, atol=1e-5):
        return
    variants = {
        "with align_corners=True conventions (pixel = x * (W - 1)): here 0 and 1 are the "
        "map's edges and pixel j's centre is at (j + 0.5) / W, so pixel = x * W - 0.5": at_all_points(
            align_corners=True
        ),
        "as if the border pixels were repeated outside the map; padding_mode='zeros' reads "
        "0 for neighbours outside it": at_all_points(padding="border"),
        "with x and y swapped: x is the column (0..W), y the row (0..H)": torch.stack(
            [_sample(feature, y, x) for x, y in EX3_POINTS]
        ),
    }
    for hint, value in variants.items():
        if torch.allclose(got, value, atol=1e-5):
            raise AssertionError(f"you sample {hint}.")
    i = int((got - expected).abs().amax(-1).argmax())
    x, y = EX3_POINTS[i]
    raise AssertionError(
        f"at (x, y) = ({x:.3f}, {y:.3f}) expected {expected[i].tolist()}, got {got[i].tolist()}. "
        "Use u = x * W - 0.5, v = y * H - 0.5; the four neighbours (floor and floor + 1) get "
        "weights (1 - |u - u_i|)(1 - |v - v_j|), and those outside the map count as zero."
    )


# --- exercise 4: ms_deform_attn without grid_sample -----------------------------------------------

EX4_SHAPES = [(3, 5), (2, 4)]  # (H_l, W_l), not square: catches swapped axes


def _ex4_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    B, Lq, M, D, P = 2, 4, 2, 3, 3
    L = len(EX4_SHAPES)
    S = sum(h * w for h, w in EX4_SHAPES)
    value = torch.randn(B, S, M, D, generator=gen)
    locations = torch.rand(B, Lq, M, L, P, 2, generator=gen) * 1.4 - 0.2  # some outside
    locations[0, 0, 0, 0, 0] = torch.tensor([0.5 / 5, 0.5 / 3])  # a pixel centre
    locations[0, 0, 0, 0, 1] = torch.tensor([1.0, 0.0])  # a corner of the map
    weights = torch.rand(B, Lq, M, L * P, generator=gen).softmax(-1).view(B, Lq, M, L, P)
    return value, locations, weights


def _variant(value, shapes, locations, weights, *, align_corners: bool, padding: str):
    """The reference computation with other ``grid_sample`` conventions (for diagnosis only)."""
    B, _, M, D = value.shape
    _, Lq, _, _, P, _ = locations.shape
    out = value.new_zeros(B * M, D, Lq)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        value_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        grid = (2 * locations[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)  # [B*M, Lq, P, 2]
        sampled = F.grid_sample(
            value_l, grid, mode="bilinear", padding_mode=padding, align_corners=align_corners
        )  # [B*M, D, Lq, P]
        a = weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Lq, P)
        out += (sampled * a).sum(-1)
    return out.view(B, M * D, Lq).transpose(1, 2)  # [B, Lq, M*D]


def check_ex4(msda: Callable) -> None:
    """``msda(value, spatial_shapes, sampling_locations, attention_weights)`` equals
    ``ms_deform_attn_reference`` (``[B, Lq, M*D]``) on inputs with points on and beyond the borders."""
    value, locations, weights = _ex4_inputs()
    B, _, M, D = value.shape
    Lq = locations.shape[1]
    got = msda(value.clone(), list(EX4_SHAPES), locations.clone(), weights.clone())
    assert isinstance(got, torch.Tensor), (
        f"msda should return a [B, Lq, M*D] tensor, got {type(got).__name__}"
    )
    assert tuple(got.shape) == (B, Lq, M * D), (
        f"expected shape {(B, Lq, M * D)} ([B, Lq, M*D]: the heads' channels concatenated), got "
        f"{tuple(got.shape)}"
    )
    expected = ms_deform_attn_reference(value, EX4_SHAPES, locations, weights)
    if torch.allclose(got, expected, atol=1e-5):
        return
    variants = {
        "align_corners=True conventions (pixel = x * (W - 1)); use pixel = x * W - 0.5": _variant(
            value, EX4_SHAPES, locations, weights, align_corners=True, padding="zeros"
        ),
        "border padding: neighbours outside the map must read zero, not the edge pixel": _variant(
            value, EX4_SHAPES, locations, weights, align_corners=False, padding="border"
        ),
        "x and y swapped: location[..., 0] is x (column, scaled by W_l), [..., 1] is y": _variant(
            value, EX4_SHAPES, locations.flip(-1), weights, align_corners=False, padding="zeros"
        ),
        "uniform weights: multiply each sample by its attention weight A": _variant(
            value, EX4_SHAPES, locations, torch.full_like(weights, 1.0), align_corners=False,
            padding="zeros",
        ),
    }  # fmt: skip
    for hint, value_v in variants.items():
        if torch.allclose(got, value_v, atol=1e-5):
            raise AssertionError(f"your result matches the computation with {hint}.")
    head_major = (
        expected.view(B, Lq, M, D).transpose(2, 3).reshape(B, Lq, M * D)
    )  # [B, Lq, D*M] order
    assert not torch.allclose(got, head_major, atol=1e-5), (
        "the channels are in the wrong order: concatenate the heads, [B, Lq, M, D] -> [B, Lq, M*D]"
    )
    bad = (got - expected).abs().amax(-1).nonzero()[0].tolist()
    raise AssertionError(
        f"query {bad[1]} of image {bad[0]} differs from ms_deform_attn_reference (largest error "
        f"{(got - expected).abs().max().item():.3g}). Check the level split of value (level l holds "
        "H_l * W_l rows), the four corners and their bilinear weights, and the sum over levels and "
        "points."
    )
