"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3).

For a query q with reference point p_q, each head m attends to only P sampled points per level l:

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk · W'_m x^l(φ_l(p_q) + Δp_mlqk) ]

``ms_deform_attn`` computes the bracket for all queries at once: bilinear sampling of the value
maps at the sampling locations (``grid_sample``, ``align_corners=False``, zero padding, exactly as
the official ``ms_deform_attn_core_pytorch``), weighted by the attention weights A.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_lite.modeling.ms_deform_attn_triton import ms_deform_attn_triton, triton_available


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
    B, _, M, D = value.shape
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
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
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

    The one entry point the model calls. CUDA tensors go through the Triton kernel
    (:func:`m2f_lite.modeling.ms_deform_attn_triton.ms_deform_attn_triton`, same signature and
    numbers, compared with the reference in ``tests/test_ms_deform_attn_triton.py``) when Triton is
    installed; everything else, the CPU included, runs the reference path. ``M2F_MSDA=reference``
    forces the reference path everywhere (for debugging and benchmarks).
    """
    if (
        value.is_cuda
        and os.environ.get("M2F_MSDA", "") != "reference"
        and triton_available(value.device)
    ):
        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR Eq. 3), as the official ``MSDeformAttn``.

    Each query predicts, from its own feature, ``heads × levels × points`` sampling offsets
    Δp (in pixels of each level) and attention weights A (softmax over the ``levels × points``
    samples of a head); the values are projected (W'), sampled at ``p_q + Δp`` and summed with
    weights A, and the heads are merged by ``output_proj`` (W).

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels L.
        n_heads: heads M.
        n_points: sampling points P per head and level.
    """

    def __init__(
        self, *, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation.

        Offsets start as a fixed pattern: head m looks in direction θ_m = 2πm/M (scaled so that the
        larger of |cos θ|, |sin θ| is 1), its k-th point k+1 pixels away, on every level. The
        attention weights start uniform (zero logits); the projections are Xavier-uniform.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(
            1, self.n_levels, self.n_points, 1
        )  # [M, L, P, 2]
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(
            1, 1, -1, 1
        )  # point k at k+1 pixels
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to ``n_points`` samples per head and level.

        Args:
            query: ``[B, Lq, C]`` (in the encoder: features + positional code).
            reference_points: ``[B, Lq, L, 2]``, (x, y) in [0, 1] of each query on each level.
            value_input: ``[B, S, C]``, all levels flattened and concatenated (``S = Σ H_l W_l``).
            spatial_shapes: (H_l, W_l) of each level, in the order of ``value_input``.
            padding_mask: ``[B, S]``, True = padding (its values are zeroed); None = no padding.

        Returns:
            ``[B, Lq, C]``.
        """
        B, Lq, _ = query.shape
        _, S, _ = value_input.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != L or sum(h * w for h, w in spatial_shapes) != S:
            raise ValueError(
                f"MSDeformAttn: spatial_shapes={spatial_shapes} must list {L} levels whose sizes add up to "
                f"value_input's length {S}"
            )
        value = self.value_proj(value_input)  # [B, S, C]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)  # [B, S, M, D]
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)  # Δp in pixels of each level
        weights = (
            self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        )
        # (W_l, H_l) of each level, to turn pixel offsets into [0, 1] map coordinates
        normalizer = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
        )
        # [B, Lq, 1, L, 1, 2] + [B, Lq, M, L, P, 2] / [1, 1, 1, L, 1, 2] -> [B, Lq, M, L, P, 2]
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn(value, spatial_shapes, locations, weights)  # [B, Lq, C]
        return self.output_proj(out)
