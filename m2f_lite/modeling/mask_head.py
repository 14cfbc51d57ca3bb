"""The mask head of Mask2Former: mask logits ε_mask · ε_pixel, and the attention mask M of Eq. 2.

Every prediction's masks are the dot products of its Q mask embeddings ε_mask (a 3-layer MLP on
the queries) with the per-pixel embeddings ε_pixel (``mask_features``, stride 4): ``mask_logits``.
Masked attention (paper Eq. 2) lets a query attend only where the previous prediction's mask,
resized to the attended memory scale, has ``sigmoid > 0.5``: ``attention_mask``, True = blocked
(``nn.MultiheadAttention``'s convention; ``F.scaled_dot_product_attention`` reads a boolean mask
the other way round).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_logits(mask_embeds: list[Tensor], mask_features: Tensor) -> list[Tensor]:
    """The mask logits ε_mask · ε_pixel of several predictions: each ``[B, Q, D]`` with
    ``[B, D, H, W]`` gives ``[B, Q, H, W]``.

    Plain ``einsum``s (the reference), except when training on the CPU: there
    :class:`_MaskProduct` computes the same products, with a backward pass that skips the queries
    whose mask gets no gradient (only matched queries have a mask loss) and sums the gradient of
    ``mask_features`` over all predictions in one product.
    """
    if (
        mask_features.device.type == "cpu"
        and torch.is_grad_enabled()
        and (mask_features.requires_grad or any(e.requires_grad for e in mask_embeds))
        and not _cpu_autocast()
    ):
        return list(_MaskProduct.apply(mask_features, *mask_embeds))
    return [torch.einsum("bqc,bchw->bqhw", e, mask_features) for e in mask_embeds]


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (``torch.is_autocast_enabled("cpu")`` needs torch >= 2.4)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.is_autocast_enabled("cpu")
    return torch.is_autocast_cpu_enabled()


class _MaskProduct(torch.autograd.Function):
    """``einsum("bqc,bchw->bqhw")`` of P mask embeddings with one ``mask_features``; the backward
    multiplies only the nonzero rows of the gradients.

    The mask losses read the matched queries only, so every other query's rows of dL/dmask are
    exactly zero; leaving them out of the backward products gives the same gradients (up to
    summation order) for a fraction of the multiply-adds, and the gradient of ``mask_features``
    is one product over the live rows of all P predictions instead of P products and P - 1 sums
    of ``[B, D, H, W]`` tensors. The rows are found with ``nonzero`` (a device sync): CPU only.
    """

    @staticmethod
    def forward(ctx, mask_features: Tensor, *mask_embeds: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mask_features, *mask_embeds)
        return tuple(torch.einsum("bqc,bchw->bqhw", e, mask_features) for e in mask_embeds)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        mask_features, *mask_embeds = ctx.saved_tensors
        B, D, H, W = mask_features.shape
        features = mask_features.flatten(2)  # [B, D, HW]
        used = [i for i, g in enumerate(grads) if g is not None]
        wanted = ctx.needs_input_grad
        grad_embeds = [
            torch.zeros_like(e) if i in used and wanted[i + 1] else None
            for i, e in enumerate(mask_embeds)
        ]
        grad_features = mask_features.new_empty(B, D, H * W) if wanted[0] else None
        for b in range(B):
            rows, embeds, lives = [], [], []  # the live rows of every prediction's gradient
            for i in used:
                g = grads[i][b].flatten(1)  # [Q, HW]
                live = (g != 0).any(-1).nonzero()[:, 0]  # [n_i]: queries with a mask gradient
                rows.append(g.index_select(0, live))  # [n_i, HW]
                embeds.append(mask_embeds[i][b].index_select(0, live))  # [n_i, D]
                lives.append(live)
            g, e = torch.cat(rows), torch.cat(embeds)  # [n, HW], [n, D]
            if grad_features is not None:  # [D, HW], summed over predictions and rows
                torch.mm(e.T, g, out=grad_features[b])
            parts = (g @ features[b].T).split([len(x) for x in lives])  # [n_i, D] each
            for i, part, live in zip(used, parts, lives):
                if grad_embeds[i] is not None:
                    grad_embeds[i][b].index_copy_(0, live, part)
        if grad_features is not None:
            grad_features = grad_features.view(B, D, H, W)
        return (grad_features, *grad_embeds)


def attention_mask(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """The masked-attention mask M of Eq. 2 as a boolean ``[B, Q, h·w]``, True = blocked.

    The mask logits ``[B, Q, H/4, W/4]`` are resized (bilinear, ``align_corners=False``) to the
    memory scale ``size = (h, w)``; a pixel is blocked where ``sigmoid < 0.5``. No gradient flows
    through the mask. A query whose row is blocked everywhere is unblocked everywhere (it would
    otherwise attend to nothing: a softmax over only -inf).
    """
    resized = resize(mask_logits.detach(), size)  # [B, Q, h, w] (itself if already that size)
    blocked = resized.flatten(2).sigmoid() < 0.5  # [B, Q, h*w]
    return blocked & ~blocked.all(-1, keepdim=True)


def resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resizing (``align_corners=False``) of ``[B, C, H, W]`` maps to ``size``.

    Channels-first maps are resized as one-channel images (``[B·C, 1, H, W]``): the same
    bilinear weights, but on the CPU PyTorch then skips the channels-last copy of all B·C maps
    that its kernel makes for many channels (10x faster; values equal to ~1 ulp).
    """
    B, C, H, W = maps.shape
    if (H, W) == tuple(size):
        return maps
    if maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous():
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    out = F.interpolate(
        maps.reshape(B * C, 1, H, W), size=size, mode="bilinear", align_corners=False
    )
    return out.view(B, C, *size)  # [B, C, h, w]
