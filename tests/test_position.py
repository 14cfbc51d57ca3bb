"""PositionEmbeddingSine: the DETR/official sine code, checked against its formula written out."""

import math

import torch

from m2f_lite.modeling.position import PositionEmbeddingSine


def formula(h: int, w: int, d: int, temperature: float = 10000.0) -> torch.Tensor:
    """The code of every pixel, channel by channel, in float64: ``[2d, h, w]``."""
    out = torch.zeros(2 * d, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * math.pi  # 1-based row, normalised to (0, 2π]
            x = (j + 1) / (w + 1e-6) * 2 * math.pi
            for c in range(d):
                wavelength = temperature ** (2 * (c // 2) / d)
                f = math.sin if c % 2 == 0 else math.cos
                out[c, i, j] = f(y / wavelength)  # y code first
                out[d + c, i, j] = f(x / wavelength)
    return out


def test_matches_formula_on_a_non_square_map():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    x = torch.randn(2, 5, 3, 7)
    pos = pe(x)
    assert pos.shape == (2, 16, 3, 7)
    assert pos.dtype == torch.float32
    torch.testing.assert_close(pos[0].double(), formula(3, 7, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[1], pos[0])  # the same code for every image


def test_depends_only_on_shape_and_is_float32_for_half_inputs():
    pe = PositionEmbeddingSine(num_pos_feats=4)
    a = pe(torch.zeros(1, 3, 4, 6, dtype=torch.bfloat16))
    b = pe(torch.randn(1, 9, 4, 6))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unnormalised_code_uses_raw_coordinates():
    pe = PositionEmbeddingSine(num_pos_feats=2, normalize=False)
    pos = pe(torch.zeros(1, 1, 2, 3))
    # channel 0 = sin(y), channel 2 = sin(x), with y, x counted from 1
    torch.testing.assert_close(pos[0, 0, :, 0], torch.sin(torch.tensor([1.0, 2.0])))
    torch.testing.assert_close(pos[0, 2, 0, :], torch.sin(torch.tensor([1.0, 2.0, 3.0])))
