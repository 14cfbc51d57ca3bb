"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3).

For a query q with reference point p_q, each head m attends to only P sampled points per level l:

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk · W'_m x^l(φ_l(p_q) + Δp_mlqk) ]

``ms_deform_attn`` computes the bracket for all queries at once: bilinear sampling of the value
maps at the sampling locations (``align_corners=False``, zero padding, as the official
``ms_deform_attn_core_pytorch``), weighted by the attention weights A. Three implementations, one
signature, compared with each other in the tests:

* ``ms_deform_attn_reference``: ``F.grid_sample`` per level, as the official PyTorch path;
* ``ms_deform_attn_gather``: the whole bracket as one weighted sum of value rows
  (``F.embedding_bag``), ~2.5x faster on the CPU (forward + backward; the forward alone ~5x);
* ``ms_deform_attn_triton``: Triton kernels for CUDA.
"""

from __future__ import annotations

import math
import os
import warnings

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
    # plain ints from a tensor; a list is kept as it is (torch.export's symbolic sizes stay symbolic)
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
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


def _sparse_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix from already valid indices (PyTorch warns that CSR support is in beta)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _WeightedRowSum(torch.autograd.Function):
    """``out[i] = Σ_j weights[i, j] · table[rows[i, j]]``: ``F.embedding_bag``'s forward, with a
    faster CPU backward that sees the sum as a product with the sparse matrix A (``[n, N]``, row i
    holding ``weights[i]`` at columns ``rows[i]``):

    * dL/dtable = Aᵀ · dL/dout, with Aᵀ in CSR form (the entries sorted by table row);
    * dL/dweights[i, j] = ⟨dL/dout[i], table[rows[i, j]]⟩: ``dL/dout · tableᵀ`` sampled on A's
      entries (``torch.sparse.sampled_addmm``).

    About 2x faster than embedding_bag's own backward (which sorts and reduces per segment); the
    same sums up to float rounding (``tests/test_ms_deform_attn.py`` compares the gradients).
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(table, rows, weights)
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")  # [n, D]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        table, rows, weights = ctx.saved_tensors
        (n, k), N = rows.shape, table.shape[0]
        grad = grad.contiguous()  # [n, D]
        flat = rows.reshape(-1)  # [n*k], entry e = (i, j) at e = i*k + j
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            order = torch.argsort(flat)  # [n*k]: the entries grouped by table row
            crow = torch.zeros(N + 1, dtype=flat.dtype, device=flat.device)
            crow[1:] = torch.bincount(flat, minlength=N).cumsum(0)
            bag = torch.arange(n, dtype=flat.dtype, device=flat.device).repeat_interleave(k)
            values = weights.reshape(-1).index_select(0, order)
            a_t = _sparse_csr(crow, bag.index_select(0, order), values, (N, n))  # [N, n]
            grad_table = a_t @ grad  # [N, D]
        if ctx.needs_input_grad[2]:
            crow = torch.arange(0, n * k + 1, k, dtype=flat.dtype, device=flat.device)
            pattern = _sparse_csr(crow, flat, weights.new_zeros(n * k), (n, N))
            sampled = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0)
            grad_weights = sampled.values().view(n, k)
        return grad_table, None, grad_weights


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The CPU fast path: the bracket of Eq. 3 as one weighted sum of rows of the value table.

    Bilinear sampling reads the four pixels around a point (columns x0, x0 + 1, rows y0, y0 + 1)
    with weights (1 - fx or fx) · (1 - fy or fy), zero for a pixel outside the map. So for each
    (image, query, head) the output is a weighted sum of ``L · P · 4`` rows of ``value`` viewed as a
    ``[B · S · heads, D]`` table, with weights A · w_corner: exactly what ``F.embedding_bag``
    (``mode="sum"``, ``per_sample_weights``) computes, without the per-level maps, the
    ``[B·heads, D, Lq, L·P]`` stack and the weighted sum of the reference. The coordinates are
    computed as ``grid_sample`` computes them (``(2·loc - 1 + 1) · W/2 - 0.5``), so the sampled
    pixels and weights are the reference's; only the summation order differs (~1e-7). Gradients
    reach ``value`` and the per-sample weights (on the CPU through :class:`_WeightedRowSum`'s
    sparse-matrix backward), hence the attention weights and, through the bilinear weights, the
    locations, as ``grid_sample``'s do. Same arguments and result as ``ms_deform_attn_reference``.
    """
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    device, dtype = value.device, sampling_locations.dtype
    index_dtype = torch.int32 if B * S * M < 2**31 else torch.int64

    def per_level(values: list[int], to: torch.dtype) -> Tensor:
        # [L] -> [L, P], materialised: broadcasting over leading dims only keeps the loops vectorised
        return torch.tensor(values, device=device, dtype=to)[:, None].expand(L, P).contiguous()

    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    # table row of pixel (x, y) of level l, head m, image b: (b·S + start_l + y·W_l + x)·M + m
    base = (
        torch.arange(B, device=device, dtype=index_dtype).view(B, 1, 1, 1, 1) * (S * M)
        + torch.arange(M, device=device, dtype=index_dtype).view(1, 1, M, 1, 1)
        + per_level([s * M for s in starts], index_dtype)
    )  # [B, 1, M, L, P]
    corners = []  # per axis (x, then y): the weights and row offsets of the lower and upper pixel
    for axis, sizes, steps in (
        (0, [w for _, w in shapes], [M] * L),
        (1, [h for h, _ in shapes], [w * M for _, w in shapes]),
    ):
        size = per_level(sizes, dtype)  # [L, P]
        # [0, 1] -> grid_sample's [-1, 1] -> pixels (pixel i's centre at i), in grid_sample's order
        c = (2 * sampling_locations[..., axis] - 1 + 1) * (size / 2) - 0.5  # [B, Lq, M, L, P]
        c0 = c.detach().floor()
        frac = c - c0
        last = size - 1
        w_lo = torch.where((c0 >= 0) & (c0 <= last), 1 - frac, 0.0)  # zero outside the map
        w_hi = torch.where((c0 >= -1) & (c0 < last), frac, 0.0)
        i0, last_i, step = c0.to(index_dtype), last.to(index_dtype), per_level(steps, index_dtype)
        r_lo = torch.minimum(i0.clamp(min=0), last_i) * step  # clamped: read, then weighted 0
        r_hi = torch.minimum((i0 + 1).clamp(min=0), last_i) * step
        corners.append(((w_lo, r_lo), (w_hi, r_hi)))
    (x_lo, x_hi), (y_lo, y_hi) = corners
    weights = torch.stack(
        [wy * attention_weights * wx for wy, _ in (y_lo, y_hi) for wx, _ in (x_lo, x_hi)], -1
    )  # [B, Lq, M, L, P, 4]
    rows = torch.stack(
        [base + ry + rx for _, ry in (y_lo, y_hi) for _, rx in (x_lo, x_hi)], -1
    )  # [B, Lq, M, L, P, 4]
    rows = rows.view(B * Lq * M, L * P * 4)  # one bag per (image, query, head)
    weights = weights.view(B * Lq * M, L * P * 4).to(value.dtype)
    table = value.reshape(B * S * M, D)  # [B*S*M, D]
    if table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64):
        out = _WeightedRowSum.apply(table, rows, weights)  # [B*Lq*M, D]
    else:
        out = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    return out.view(B, Lq, M * D)  # [B, Lq, M*D]


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
    installed; everything else, the CPU included, runs ``ms_deform_attn_gather`` (compared with the
    reference in ``tests/test_ms_deform_attn.py``). ``M2F_MSDA=reference`` forces the reference
    path everywhere, ``M2F_MSDA=gather`` the gather path (for debugging and benchmarks).
    """
    choice = os.environ.get("M2F_MSDA", "")
    if choice == "reference":
        return ms_deform_attn_reference(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    if value.is_cuda and choice != "gather" and triton_available(value.device):
        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)


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
        # (W_l, H_l) of each level, to turn pixel offsets into [0, 1] map coordinates; it and the
        # reference points are spelled out over the points (shape [.., L, P, 2], contiguous) so that
        # the broadcasts below run over whole rows of L·P·2 numbers (same values as broadcasting).
        # torch.full, not torch.tensor: torch.export then keeps the sizes symbolic (m2f_lite.export)
        sizes = [
            torch.full((), s, dtype=query.dtype, device=query.device)
            for h, w in spatial_shapes
            for s in (w, h)
        ]
        normalizer = (
            torch.stack(sizes)  # [2L]: W_0, H_0, W_1, H_1, ...
            .view(L, 1, 2)
            .expand(L, P, 2)
            .contiguous()
        )  # [L, P, 2]
        ref = reference_points[:, :, None, :, None, :].expand(B, Lq, 1, L, P, 2).contiguous()
        # [B, Lq, 1, L, P, 2] + [B, Lq, M, L, P, 2] / [L, P, 2] -> [B, Lq, M, L, P, 2]
        locations = ref + offsets / normalizer
        out = ms_deform_attn(value, spatial_shapes, locations, weights)  # [B, Lq, C]
        return self.output_proj(out)
