"""The chapter 4 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.exercises import ch04


def test_ex1_token_count():
    S = 100 * 136 + 50 * 68 + 25 * 34
    ch04.check_ex1(S=S, S_with_res2=S + 200 * 272)
    with pytest.raises(AssertionError, match="that includes res2"):
        ch04.check_ex1(S=S + 200 * 272, S_with_res2=S + 200 * 272)
    with pytest.raises(AssertionError, match="that is one level"):
        ch04.check_ex1(S=100 * 136, S_with_res2=S + 200 * 272)
    with pytest.raises(AssertionError, match=r"not res2\.\.res4"):
        ch04.check_ex1(S=200 * 272 + 100 * 136 + 50 * 68, S_with_res2=S + 200 * 272)
    with pytest.raises(AssertionError, match="res2 has stride 4"):
        ch04.check_ex1(S=S, S_with_res2=S + 400 * 544)


def _points(spatial_shapes, batch, *, half=0.5, corners=False):
    per_level = []
    for h, w in spatial_shapes:
        if corners:
            ys = torch.arange(h) / max(h - 1, 1)
            xs = torch.arange(w) / max(w - 1, 1)
        else:
            ys, xs = (torch.arange(h) + half) / h, (torch.arange(w) + half) / w
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        per_level.append(torch.stack([x.flatten(), y.flatten()], -1))
    ref = torch.cat(per_level)
    return ref[None, :, None].expand(batch, -1, len(spatial_shapes), -1)


def test_ex2_reference_points():
    ch04.check_ex2(_points)  # independent of encoder_reference_points, which the check uses
    with pytest.raises(AssertionError, match=r"\(y, x\)"):
        ch04.check_ex2(lambda shapes, batch: _points(shapes, batch).flip(-1))
    with pytest.raises(AssertionError, match="align_corners=True"):
        ch04.check_ex2(lambda shapes, batch: _points(shapes, batch, corners=True))
    with pytest.raises(AssertionError, match="top-left corners"):
        ch04.check_ex2(lambda shapes, batch: _points(shapes, batch, half=0.0))
    with pytest.raises(AssertionError, match=r"\[B, S, L, 2\]"):
        ch04.check_ex2(lambda shapes, batch: _points(shapes, batch)[:, :, 0])
    with pytest.raises(AssertionError, match="level by level, each level row by row"):
        ch04.check_ex2(lambda shapes, batch: _points(shapes[::-1], batch))
    with pytest.raises(AssertionError, match="got NoneType"):
        ch04.check_ex2(lambda shapes, batch: None)


def _fpn(lateral_conv, output_conv, fine, coarse, **upsample):
    lateral = lateral_conv(fine)
    return output_conv(lateral + F.interpolate(coarse, size=lateral.shape[-2:], **upsample))


def test_ex3_fpn_step():
    ch04.check_ex3(lambda *a: _fpn(*a, mode="bilinear", align_corners=False))
    with pytest.raises(AssertionError, match="nearest-neighbour"):
        ch04.check_ex3(lambda *a: _fpn(*a, mode="nearest"))
    with pytest.raises(AssertionError, match="align_corners=True"):
        ch04.check_ex3(lambda *a: _fpn(*a, mode="bilinear", align_corners=True))

    def factor_two(lateral_conv, output_conv, fine, coarse):
        up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        return output_conv(up)

    def conv_before_sum(lateral_conv, output_conv, fine, coarse):
        lateral = lateral_conv(fine)
        up = F.interpolate(output_conv(coarse), size=lateral.shape[-2:], mode="bilinear")
        return lateral + up

    with pytest.raises(AssertionError, match="not by a fixed factor of 2"):
        ch04.check_ex3(factor_two)
    with pytest.raises(AssertionError, match="before the sum"):
        ch04.check_ex3(conv_before_sum)
    with pytest.raises(AssertionError, match="largest error"):
        ch04.check_ex3(lambda *a: _fpn(*a, mode="bilinear") * 2)


def test_ex4_encoder_layer():
    def right(layer, src, pos, ref, shapes):
        x = layer.norm1(src + layer.self_attn(src + pos, ref, src, shapes))
        return layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))

    def pos_in_value(layer, src, pos, ref, shapes):
        x = layer.norm1(src + layer.self_attn(src + pos, ref, src + pos, shapes))
        return layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))

    def pre_norm(layer, src, pos, ref, shapes):
        x = layer.norm1(src)
        src = src + layer.self_attn(x + pos, ref, x, shapes)
        return src + layer.linear2(F.relu(layer.linear1(layer.norm2(src))))

    ch04.check_ex4(right)
    with pytest.raises(AssertionError, match="values too"):
        ch04.check_ex4(pos_in_value)
    with pytest.raises(AssertionError, match="pre-norm"):
        ch04.check_ex4(pre_norm)
    with pytest.raises(AssertionError, match=r"\[B, S, C\]"):
        ch04.check_ex4(lambda layer, src, *a: src[0])
    with pytest.raises(AssertionError, match="largest error"):
        ch04.check_ex4(lambda layer, src, *a: src)
