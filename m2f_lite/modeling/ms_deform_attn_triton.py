"""Multi-scale deformable attention (Deformable DETR, Eq. 3) as Triton kernels: the GPU fast path.

Same signature and semantics as ``ms_deform_attn_reference`` (``F.grid_sample``, bilinear,
``align_corners=False``, zero padding); tests compare the two. For every query q, head m, level l
and point p, with the sampling location turned into pixel coordinates ``x = loc_x * W_l - 0.5``,
``y = loc_y * H_l - 0.5``, bilinear sampling reads the four neighbouring pixels (corners c) of the
head's value map ``v`` with weights ``w_c(x, y)`` (a corner outside the map reads zero):

    out[q, m] = sum_l sum_p A_mlqp · sum_c w_c(x, y) · v_c                  (the bracket of Eq. 3)

The backward pass needs only the four corner dot products ``<g, v_c>`` with the output gradient g:

    dL/dA = sum_c w_c <g, v_c>      dL/dx = W_l · A · sum_c dw_c/dx <g, v_c>      dL/dv_c += A w_c g

Kernel design (one design for both directions): a program owns BLOCK_Q queries of one (batch,
head) pair and all D channels of that head, ``grid = (cdiv(Lq, BLOCK_Q), B * heads)``. The D
channels of one value pixel are contiguous in ``value [B, S, heads, D]``, so each corner read is a
coalesced ``[BLOCK_Q, BLOCK_D]`` gather of whole rows (vector loads). Levels are unrolled, points
are a loop (fewer registers, more programs resident per SM); level sizes and start rows come from
small tensors precomputed on the host. Arithmetic is fp32 whatever the input dtype. The backward
scatters value gradients with fp32 atomic adds (queries share pixels) and writes the location and
weight gradients directly (one program owns them).

Triton runs these kernels compiled on CUDA tensors, and through its interpreter on CPU tensors
when ``TRITON_INTERPRET=1`` (how the CPU tests check them). ``@triton.jit`` would fix that choice
at import, so the kernels are wrapped at call time (``_launchable``) and call only Triton builtins:
``tl.zeros`` and ``tl.sum`` are ``@triton.jit`` functions themselves, fixed as compiled or
interpreted when Triton is imported, hence ``tl.full`` and ``tl.reduce`` with our own ``_add``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the package works without Triton: the reference path needs none
    triton = tl = None
    TRITON_IMPORT_ERROR: ImportError | None = error
else:
    TRITON_IMPORT_ERROR = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (default: on any device here).

    That needs Triton, and either a CUDA device (compiled kernels) or, for CPU tensors,
    ``TRITON_INTERPRET=1`` (Triton's interpreter: correct, but far too slow outside tests).
    """
    if TRITON_IMPORT_ERROR is not None:
        return False
    if device is None:
        return torch.cuda.is_available() or _interpret_requested()
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return torch.device(device).type == "cpu" and _interpret_requested()


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: queries per program and warps per program, for each direction."""

    block_q_forward: int = 32
    warps_forward: int = 4
    block_q_backward: int = 32
    warps_backward: int = 4

    def __post_init__(self) -> None:
        for name in ("block_q_forward", "warps_forward", "block_q_backward", "warps_backward"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"KernelConfig.{name}: expected a power of two, got {size}")


def _add_fn(a, b):
    return a + b


# tl.reduce's combine function for the channel sums (the module docstring says why not tl.sum)
_add = triton.runtime.jit.JITFunction(_add_fn) if TRITON_IMPORT_ERROR is None else None


def _msda_forward_kernel(
    value_ptr,  # [B, S, M, D]
    shapes_ptr,  # [L, 2] int32, (H, W) per level
    level_start_ptr,  # [L] int32, first row of each level in S
    loc_ptr,  # [B, Lq, M, L, P, 2]
    weight_ptr,  # [B, Lq, M, L, P]
    out_ptr,  # [B, Lq, M, D]
    S,
    Lq,
    M: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1) // M
    m = tl.program_id(1) % M
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    q_ok = q < Lq
    qd_ok = q_ok[:, None] & (d < D)[None, :]  # [BLOCK_Q, BLOCK_D]
    value_bm = value_ptr + b.to(tl.int64) * S * M * D + m * D + d[None, :]  # [1, BLOCK_D]
    point = ((b * Lq + q) * M + m) * (L * P)  # [BLOCK_Q], index of (b, q, m, l=0, p=0)
    acc = tl.full([BLOCK_Q, BLOCK_D], 0.0, tl.float32)
    for l in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(level_start_ptr + l)
        for p in range(P):  # a loop, not unrolled: fewer registers, more programs per SM
            i = point + l * P + p  # [BLOCK_Q]
            a = tl.load(weight_ptr + i, mask=q_ok, other=0.0).to(tl.float32)
            # pixel coordinates (align_corners=False); clamped so that far-away points cannot
            # overflow int32: beyond [-2, W+1] every corner is outside the map either way
            x = tl.load(loc_ptr + 2 * i, mask=q_ok, other=0.0).to(tl.float32) * W - 0.5
            y = tl.load(loc_ptr + 2 * i + 1, mask=q_ok, other=0.0).to(tl.float32) * H - 0.5
            x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f  # [BLOCK_Q], weight of the right column
            fy = y - y0f  # [BLOCK_Q], weight of the bottom row
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            in_x0 = (x0 >= 0) & (x0 < W)
            in_x1 = (x0 >= -1) & (x0 < W - 1)
            in_y0 = (y0 >= 0) & (y0 < H)
            in_y1 = (y0 >= -1) & (y0 < H - 1)
            row = start + y0 * W + x0  # [BLOCK_Q], value row of the top-left corner
            ptr = value_bm + (row * M * D)[:, None]  # [BLOCK_Q, BLOCK_D]
            v00 = tl.load(ptr, mask=qd_ok & (in_y0 & in_x0)[:, None], other=0.0)
            v01 = tl.load(ptr + M * D, mask=qd_ok & (in_y0 & in_x1)[:, None], other=0.0)
            v10 = tl.load(ptr + W * M * D, mask=qd_ok & (in_y1 & in_x0)[:, None], other=0.0)
            v11 = tl.load(ptr + (W + 1) * M * D, mask=qd_ok & (in_y1 & in_x1)[:, None], other=0.0)
            acc += (a * (1 - fx) * (1 - fy))[:, None] * v00.to(tl.float32)
            acc += (a * fx * (1 - fy))[:, None] * v01.to(tl.float32)
            acc += (a * (1 - fx) * fy)[:, None] * v10.to(tl.float32)
            acc += (a * fx * fy)[:, None] * v11.to(tl.float32)
    out = out_ptr + (((b * Lq + q) * M + m) * D)[:, None] + d[None, :]  # [BLOCK_Q, BLOCK_D]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qd_ok)


def _msda_backward_kernel(
    grad_out_ptr,  # [B, Lq, M, D]
    value_ptr,  # [B, S, M, D]
    shapes_ptr,  # [L, 2] int32
    level_start_ptr,  # [L] int32
    loc_ptr,  # [B, Lq, M, L, P, 2]
    weight_ptr,  # [B, Lq, M, L, P]
    grad_value_ptr,  # [B, S, M, D] float32, zero-initialised, accumulated with atomics
    grad_loc_ptr,  # [B, Lq, M, L, P, 2]
    grad_weight_ptr,  # [B, Lq, M, L, P]
    S,
    Lq,
    M: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1) // M
    m = tl.program_id(1) % M
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    q_ok = q < Lq
    qd_ok = q_ok[:, None] & (d < D)[None, :]  # [BLOCK_Q, BLOCK_D]
    bm_offset = b.to(tl.int64) * S * M * D + m * D
    value_bm = value_ptr + bm_offset + d[None, :]  # [1, BLOCK_D]
    grad_value_bm = grad_value_ptr + bm_offset + d[None, :]  # [1, BLOCK_D]
    grad_out = grad_out_ptr + (((b * Lq + q) * M + m) * D)[:, None] + d[None, :]
    g = tl.load(grad_out, mask=qd_ok, other=0.0).to(tl.float32)  # [BLOCK_Q, BLOCK_D]
    point = ((b * Lq + q) * M + m) * (L * P)  # [BLOCK_Q], index of (b, q, m, l=0, p=0)
    for l in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(level_start_ptr + l)
        for p in range(P):  # a loop, not unrolled: fewer registers, more programs per SM
            i = point + l * P + p  # [BLOCK_Q]
            a = tl.load(weight_ptr + i, mask=q_ok, other=0.0).to(tl.float32)
            x = tl.load(loc_ptr + 2 * i, mask=q_ok, other=0.0).to(tl.float32) * W - 0.5
            y = tl.load(loc_ptr + 2 * i + 1, mask=q_ok, other=0.0).to(tl.float32) * H - 0.5
            x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)  # as in the forward kernel
            y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            in_x0 = (x0 >= 0) & (x0 < W)
            in_x1 = (x0 >= -1) & (x0 < W - 1)
            in_y0 = (y0 >= 0) & (y0 < H)
            in_y1 = (y0 >= -1) & (y0 < H - 1)
            m00 = qd_ok & (in_y0 & in_x0)[:, None]  # [BLOCK_Q, BLOCK_D]
            m01 = qd_ok & (in_y0 & in_x1)[:, None]
            m10 = qd_ok & (in_y1 & in_x0)[:, None]
            m11 = qd_ok & (in_y1 & in_x1)[:, None]
            o00 = ((start + y0 * W + x0) * M * D)[:, None]  # [BLOCK_Q, 1], offsets of the corners
            o01 = o00 + M * D
            o10 = o00 + W * M * D
            o11 = o10 + M * D
            v00 = tl.load(value_bm + o00, mask=m00, other=0.0).to(tl.float32)  # [BLOCK_Q, BLOCK_D]
            v01 = tl.load(value_bm + o01, mask=m01, other=0.0).to(tl.float32)
            v10 = tl.load(value_bm + o10, mask=m10, other=0.0).to(tl.float32)
            v11 = tl.load(value_bm + o11, mask=m11, other=0.0).to(tl.float32)
            g00 = tl.reduce(g * v00, 1, _add)  # [BLOCK_Q], <g, v_00>
            g01 = tl.reduce(g * v01, 1, _add)
            g10 = tl.reduce(g * v10, 1, _add)
            g11 = tl.reduce(g * v11, 1, _add)
            w00 = (1 - fx) * (1 - fy)
            w01 = fx * (1 - fy)
            w10 = (1 - fx) * fy
            w11 = fx * fy
            grad_a = w00 * g00 + w01 * g01 + w10 * g10 + w11 * g11
            grad_x = a * W * ((1 - fy) * (g01 - g00) + fy * (g11 - g10))
            grad_y = a * H * ((1 - fx) * (g10 - g00) + fx * (g11 - g01))
            tl.store(grad_weight_ptr + i, grad_a.to(grad_weight_ptr.dtype.element_ty), mask=q_ok)
            tl.store(grad_loc_ptr + 2 * i, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_ok)
            tl.store(grad_loc_ptr + 2 * i + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_ok)
            ag = a[:, None] * g  # [BLOCK_Q, BLOCK_D]
            tl.atomic_add(grad_value_bm + o00, w00[:, None] * ag, mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_bm + o01, w01[:, None] * ag, mask=m01, sem="relaxed")
            tl.atomic_add(grad_value_bm + o10, w10[:, None] * ag, mask=m10, sem="relaxed")
            tl.atomic_add(grad_value_bm + o11, w11[:, None] * ag, mask=m11, sem="relaxed")


@functools.cache
def _launchable(kernel_fn, interpret: bool):
    """The kernel, compiled (CUDA) or interpreted (``TRITON_INTERPRET=1``), built on first use.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` once, when the decorator runs at import; building the
    kernel here instead reads it at call time, so the choice does not depend on which module
    happened to import this one first, and one process can test both paths.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(kernel_fn)
    return triton.runtime.jit.JITFunction(kernel_fn)


def _level_tensors(
    spatial_shapes: Tensor | list[tuple[int, int]], value: Tensor, num_levels: int
) -> tuple[Tensor, Tensor]:
    """``[L, 2]`` int32 (H, W) and ``[L]`` int32 level start rows, on ``value``'s device."""
    shapes = torch.as_tensor(spatial_shapes)
    if shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes: expected [L, 2] with L = {num_levels} (sampling_locations.shape[3]), "
            f"got shape {tuple(shapes.shape)}"
        )
    if shapes.is_cuda:  # computed on the GPU: reading the sizes back would synchronise every call
        shapes = shapes.to(device=value.device, dtype=torch.int32)
        sizes = shapes[:, 0] * shapes[:, 1]  # [L]
        return shapes.contiguous(), (sizes.cumsum(0) - sizes).to(torch.int32)
    key = tuple((int(h), int(w)) for h, w in shapes.tolist())
    if sum(h * w for h, w in key) != value.shape[1]:
        raise ValueError(
            f"value: expected S = sum(H * W) = {sum(h * w for h, w in key)} rows for "
            f"spatial_shapes {list(key)}, got S = {value.shape[1]}"
        )
    return _cached_level_tensors(key, value.device)


@functools.lru_cache(maxsize=64)
def _cached_level_tensors(shapes: tuple[tuple[int, int], ...], device: torch.device):
    """Built once per (shapes, device): a host-to-GPU copy on every call would synchronise it."""
    starts = [sum(h * w for h, w in shapes[:lvl]) for lvl in range(len(shapes))]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(shapes), as_tensor(starts)  # [L, 2], [L]


def _on_device(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``tensor``'s GPU (Triton launches on the current device), or anywhere on CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _MSDeformAttnTriton(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (no double backward)."""

    @staticmethod
    def forward(ctx, value, shapes, level_start, sampling_locations, attention_weights, config):
        B, S, M, D = value.shape
        _, Lq, _, L, P, _ = sampling_locations.shape
        interpret = _interpret_requested()
        out = value.new_empty(B, Lq, M, D)  # [B, Lq, M, D]
        if out.numel() > 0:
            grid = (triton.cdiv(Lq, config.block_q_forward), B * M)  # [query blocks, B * heads]
            with _on_device(value):
                _launchable(_msda_forward_kernel, interpret)[grid](
                    value, shapes, level_start, sampling_locations, attention_weights, out, S, Lq,
                    M=M, D=D, L=L, P=P, BLOCK_Q=config.block_q_forward,
                    BLOCK_D=triton.next_power_of_2(D), num_warps=config.warps_forward,
                )  # fmt: skip
        ctx.save_for_backward(value, shapes, level_start, sampling_locations, attention_weights)
        ctx.config = config
        ctx.interpret = interpret
        return out.view(B, Lq, M * D)  # [B, Lq, M*D]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, level_start, sampling_locations, attention_weights = ctx.saved_tensors
        B, S, M, D = value.shape
        _, Lq, _, L, P, _ = sampling_locations.shape
        config = ctx.config
        grad_out = grad_out.contiguous()  # [B, Lq, M*D]
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.zeros_like(sampling_locations)
        grad_weights = torch.zeros_like(attention_weights)
        if grad_out.numel() > 0:
            grid = (triton.cdiv(Lq, config.block_q_backward), B * M)  # [query blocks, B * heads]
            with _on_device(value):
                _launchable(_msda_backward_kernel, ctx.interpret)[grid](
                    grad_out, value, shapes, level_start, sampling_locations, attention_weights,
                    grad_value, grad_loc, grad_weights, S, Lq,
                    M=M, D=D, L=L, P=P, BLOCK_Q=config.block_q_backward,
                    BLOCK_D=triton.next_power_of_2(D), num_warps=config.warps_backward,
                )  # fmt: skip
        return grad_value.to(value.dtype), None, None, grad_loc, grad_weights, None


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    config: KernelConfig | None = None,
) -> Tensor:
    """The fast path: same arguments, result and gradients as ``ms_deform_attn_reference``.

    Args:
        value: ``[B, S, heads, D]``, fp32, fp16 or bf16 (any D: channels are padded to a power of
            two inside the kernel and masked).
        spatial_shapes: ``[L, 2]``, (H_l, W_l) of each level (tensor or list).
        sampling_locations: ``[B, Lq, heads, L, P, 2]``, (x, y) in [0, 1] of each level's map.
        attention_weights: ``[B, Lq, heads, L, P]``.
        config: block sizes and warps (``KernelConfig()`` when None), for tuning.

    Returns:
        ``[B, Lq, heads * D]`` in ``value``'s dtype, computed in fp32. Gradients flow to ``value``,
        ``sampling_locations`` and ``attention_weights``, each in its own dtype.
    """
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            f"ms_deform_attn_triton needs Triton, which failed to import ({TRITON_IMPORT_ERROR}); "
            "use ms_deform_attn_reference instead"
        )
    if not triton_available(value.device):
        raise RuntimeError(
            f"ms_deform_attn_triton: value is on {value.device}; the kernels run on CUDA tensors, "
            "or on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 is set"
        )
    if value.dim() != 4:
        raise ValueError(f"value: expected [B, S, heads, D], got shape {tuple(value.shape)}")
    B, _, M, _ = value.shape
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or (loc_shape[0], loc_shape[2], loc_shape[5]) != (B, M, 2):
        raise ValueError(
            f"sampling_locations: expected [B={B}, Lq, heads={M}, L, P, 2], got shape {loc_shape}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights: expected shape {tuple(sampling_locations.shape[:-1])} "
            f"([B, Lq, heads, L, P]), got {tuple(attention_weights.shape)}"
        )
    names = ("value", "sampling_locations", "attention_weights")
    for name, tensor in zip(names, (value, sampling_locations, attention_weights)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float32, float16 or bfloat16, got {tensor.dtype}")
        if tensor.device != value.device:
            raise ValueError(f"{name}: expected device {value.device}, got {tensor.device}")
    shapes, level_start = _level_tensors(spatial_shapes, value, sampling_locations.shape[3])
    return _MSDeformAttnTriton.apply(
        value.contiguous(),
        shapes,
        level_start,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        config or KernelConfig(),
    )
