"""Checks for the exercises of chapter 4 (pixel decoder).

Each ``check_exN`` returns ``None`` when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint::

    from m2f_lite.exercises import ch04
    ch04.check_ex2(reference_points)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from m2f_lite.modeling.pixel_decoder import (
    DeformableEncoderLayer,
    MSDeformAttnPixelDecoder,
    encoder_reference_points,
)

# --- exercise 1: count the encoder tokens ---------------------------------------------------------

EX1_IMAGE = (800, 1088)  # H, W of the padded input


def _ex1_expected() -> tuple[int, int]:
    h, w = EX1_IMAGE
    S = sum((h // s) * (w // s) for s in (8, 16, 32))
    return S, S + (h // 4) * (w // 4)


def check_ex1(*, S: int, S_with_res2: int) -> None:
    """Tokens of the encoder for an 800×1088 input: strides 8, 16, 32; and with res2 added."""
    expected, expected_res2 = _ex1_expected()
    h, w = EX1_IMAGE
    problems = []
    if S != expected:
        if S == expected_res2:
            hint = "that includes res2; the encoder takes strides 8, 16 and 32 only"
        elif S in [(h // s) * (w // s) for s in (8, 16, 32)]:
            hint = "that is one level; the encoder concatenates three"
        elif S == sum((h // s) * (w // s) for s in (4, 8, 16)):
            hint = "the encoder's levels are res3..res5 (strides 8, 16, 32), not res2..res4"
        else:
            hint = "S = sum over strides 8, 16, 32 of (H / stride) * (W / stride)"
        problems.append(f"S = {S} is not right ({hint})")
    if S_with_res2 != expected_res2:
        if S_with_res2 == expected + (h // 2) * (w // 2):
            hint = "res2 has stride 4, so it is (H / 4) x (W / 4)"
        else:
            hint = f"add the (H / 4) * (W / 4) tokens of res2 to the {expected} of the encoder"
        problems.append(f"S_with_res2 = {S_with_res2} is not right ({hint})")
    assert not problems, "; ".join(problems)


# --- exercise 2: reference points -----------------------------------------------------------------

EX2_SHAPES = [(2, 3), (3, 5), (1, 1)]  # (H_l, W_l): not square, not sorted, a 1x1 level


def check_ex2(reference_points: Callable[[list[tuple[int, int]], int], torch.Tensor]) -> None:
    """``reference_points(spatial_shapes, batch)`` → ``[B, S, L, 2]``, the (x, y) pixel centres in
    [0, 1], as ``encoder_reference_points``."""
    batch = 2
    expected = encoder_reference_points(EX2_SHAPES, batch, torch.device("cpu"))
    got = reference_points(list(EX2_SHAPES), batch)
    assert isinstance(got, torch.Tensor), f"return a [B, S, L, 2] tensor, got {type(got).__name__}"
    S, L = expected.shape[1], expected.shape[2]
    assert tuple(got.shape) == tuple(expected.shape), (
        f"expected shape {tuple(expected.shape)} ([B, S, L, 2] with S = {S} tokens and L = {L} "
        f"levels), got {tuple(got.shape)}. Every token gets its point repeated for each level."
    )
    got = got.float()
    if torch.allclose(got, expected, atol=1e-6):
        return
    # typical mistakes, for a helpful message
    corners = []
    for h, w in EX2_SHAPES:
        ys, xs = torch.meshgrid(
            torch.arange(h) / max(h - 1, 1), torch.arange(w) / max(w - 1, 1), indexing="ij"
        )
        corners.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    corners = torch.cat(corners)[None, :, None].expand_as(expected)
    no_half = []
    for h, w in EX2_SHAPES:
        ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        no_half.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    no_half = torch.cat(no_half)[None, :, None].expand_as(expected)
    if torch.allclose(got, expected.flip(-1), atol=1e-6):
        raise AssertionError("the coordinates are (y, x); the last dimension must be (x, y)")
    if torch.allclose(got, corners, atol=1e-6):
        raise AssertionError(
            "these are align_corners=True positions (i / (H - 1)); the model uses pixel centres, "
            "(i + 0.5) / H, the convention of grid_sample with align_corners=False"
        )
    if torch.allclose(got, no_half, atol=1e-6):
        raise AssertionError(
            "these are the top-left corners of the pixels (i / H); use their centres, (i + 0.5) / H"
        )
    b, s, lvl = (got - expected).abs().amax(-1).nonzero()[0].tolist()
    raise AssertionError(
        f"token {s} (image {b}, level {lvl}) should be at {expected[b, s, lvl].tolist()}, got "
        f"{got[b, s, lvl].tolist()}. Tokens go level by level, each level row by row; the point "
        "of row i, column j is ((j + 0.5) / W, (i + 0.5) / H)."
    )


# --- exercise 3: the FPN merge step ---------------------------------------------------------------


def _tiny_decoder() -> MSDeformAttnPixelDecoder:
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(
        channels=[6, 8, 10, 12],
        strides=[4, 8, 16, 32],
        conv_dim=16,
        mask_dim=16,
        enc_layers=1,
        enc_nheads=2,
        enc_n_points=2,
        enc_dim_feedforward=32,
        norm_groups=4,
    )
    return decoder.eval()


def check_ex3(fpn_step: Callable) -> None:
    """``fpn_step(lateral_conv, output_conv, fine, coarse)`` → ``[B, C, H, W]``, Eq. (ch04-eq-fpn)."""
    decoder = _tiny_decoder()
    lateral_conv, output_conv = decoder.lateral_convs[0], decoder.output_convs[0]
    gen = torch.Generator().manual_seed(5)
    fine = torch.randn(2, 6, 13, 10, generator=gen)  # [B, C_in, H, W]: odd sizes, not square
    coarse = torch.randn(2, 16, 7, 5, generator=gen)  # [B, C, ceil(H/2), W/2]
    with torch.no_grad():
        got = fpn_step(lateral_conv, output_conv, fine.clone(), coarse.clone())
        lateral = lateral_conv(fine)

        def merged(up: torch.Tensor) -> torch.Tensor:
            return output_conv(lateral + up)

        expected = merged(
            F.interpolate(coarse, size=(13, 10), mode="bilinear", align_corners=False)
        )
        assert isinstance(got, torch.Tensor), (
            f"return the merged [B, C, H, W] tensor, got {type(got).__name__}"
        )
        assert tuple(got.shape) == tuple(expected.shape), (
            f"expected shape {tuple(expected.shape)} (the fine map's size, C channels), got "
            f"{tuple(got.shape)}. Upsample the coarse map to the fine map's size with "
            "F.interpolate(coarse, size=fine_size, ...), not by a fixed factor of 2."
        )
        if torch.allclose(got, expected, atol=1e-5):
            return
        variants = {
            "nearest-neighbour upsampling; the official FPN step upsamples bilinearly": merged(
                F.interpolate(coarse, size=(13, 10), mode="nearest")
            ),
            "align_corners=True; use align_corners=False (pixel centres, as everywhere else)": merged(
                F.interpolate(coarse, size=(13, 10), mode="bilinear", align_corners=True)
            ),
            "the 3x3 output conv applied before the sum; it smooths the sum": lateral
            + F.interpolate(
                output_conv(coarse), size=(13, 10), mode="bilinear", align_corners=False
            ),
        }
    for hint, value in variants.items():
        if torch.allclose(got, value, atol=1e-5):
            raise AssertionError(f"your result matches {hint}.")
    raise AssertionError(
        f"the merged map differs from the expected one (largest error "
        f"{(got - expected).abs().max().item():.3g}): output_conv(lateral_conv(fine) + "
        "bilinear upsampling of coarse to the fine map's size)."
    )


# --- exercise 4: one encoder layer ----------------------------------------------------------------

EX4_SHAPES = [(2, 3), (4, 5)]


def check_ex4(encoder_layer: Callable) -> None:
    """``encoder_layer(layer, src, pos, reference_points, spatial_shapes)`` equals
    ``DeformableEncoderLayer.forward``, Eq. (ch04-eq-encoder)."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(
        d_model=16, n_levels=len(EX4_SHAPES), n_heads=2, n_points=2, dim_feedforward=24
    ).eval()
    with torch.no_grad():  # offsets that depend on the query, as after training
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.3)
        layer.self_attn.attention_weights.weight.normal_(0, 0.3)
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(6)
    S = sum(h * w for h, w in EX4_SHAPES)
    src = torch.randn(2, S, 16, generator=gen)
    pos = torch.randn(2, S, 16, generator=gen)
    ref = encoder_reference_points(EX4_SHAPES, 2, torch.device("cpu"))
    with torch.no_grad():
        got = encoder_layer(layer, src.clone(), pos.clone(), ref.clone(), list(EX4_SHAPES))
        expected = layer(src, pos, ref, EX4_SHAPES)
        assert isinstance(got, torch.Tensor), (
            f"return the [B, S, C] tensor, got {type(got).__name__}"
        )
        assert tuple(got.shape) == tuple(expected.shape), (
            f"expected shape {tuple(expected.shape)} ([B, S, C]), got {tuple(got.shape)}"
        )
        if torch.allclose(got, expected, atol=1e-5):
            return

        def ffn(x: torch.Tensor) -> torch.Tensor:
            return layer.linear2(F.relu(layer.linear1(x)))

        attn = layer.self_attn
        variants = {
            "positions added to the values too; only the query gets src + pos": layer.norm2(
                (z := layer.norm1(src + attn(src + pos, ref, src + pos, EX4_SHAPES))) + ffn(z)
            ),
            "no positions in the query; it is src + pos": layer.norm2(
                (z := layer.norm1(src + attn(src, ref, src, EX4_SHAPES))) + ffn(z)
            ),
            "pre-norm (LayerNorm before each sub-layer); this encoder is post-norm: "
            "LayerNorm after each residual sum": (
                (z := src + attn(layer.norm1(src) + pos, ref, layer.norm1(src), EX4_SHAPES))
                + ffn(layer.norm2(z))
            ),
            "no residual connections; each sub-layer adds its input back before the norm": layer.norm2(
                ffn(layer.norm1(attn(src + pos, ref, src, EX4_SHAPES)))
            ),
        }
    for hint, value in variants.items():
        if torch.allclose(got, value, atol=1e-5):
            raise AssertionError(f"your layer computes {hint}.")
    raise AssertionError(
        f"the output differs from DeformableEncoderLayer (largest error "
        f"{(got - expected).abs().max().item():.3g}). Compute norm1(src + self_attn(src + pos, "
        "reference_points, src, spatial_shapes)), then norm2(x + linear2(relu(linear1(x))))."
    )
