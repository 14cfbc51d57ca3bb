"""Sine positional encoding of a feature map (DETR, Carion et al. 2020; Transformer, Vaswani et al. 2017).

Attention is blind to where a pixel sits, so every pixel of a feature map gets a fixed code of its
position. With y, x the pixel's row and column counted from 1 and normalised to (0, 2π]
(``y / H · 2π``), and ``d = num_pos_feats`` channels per axis:

    PE(y, 2i)   = sin(y / T^(2i/d))        PE(y, 2i+1) = cos(y / T^(2i/d))        (T = 10000)

and the same for x. The code is ``[PE_y, PE_x]`` (y first), ``2·d`` channels in all. Mask2Former
uses it with ``normalize=True`` and scale 2π, in the pixel decoder (``d = conv_dim / 2``) and in
the transformer decoder (``d = hidden_dim / 2``), as the official ``PositionEmbeddingSine``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing this call (``torch.compiler.is_compiling``, torch >= 2.3)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine code of (y, x) for every pixel of a ``[B, C, H, W]`` map, ``[B, 2·d, H, W]`` float32.

    Args:
        num_pos_feats: channels per axis (``d``); the output has ``2 * num_pos_feats`` channels.
        temperature: ``T``, the base of the wavelengths.
        normalize: divide the 1-based coordinates by the map size (so they lie in (0, 1]) and
            multiply by ``scale``; Mask2Former always normalises.
        scale: the range after normalising (2π by default).

    The code depends only on (H, W), so it is computed once per size and device and kept (the
    last ``cache_size`` sizes; not part of the state dict); every call returns a view of it
    expanded over the batch: read it, never write into it.
    """

    cache_size = 6  # the pixel decoder and the transformer decoder each see 3 sizes per input size

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Positional code for the map ``x`` ``[B, C, H, W]`` (only its shape and device are used):
        ``[B, 2·d, H, W]``, a read-only view (the same code for every image)."""
        B, _, H, W = x.shape
        if _compiling():  # a compiled graph computes (or folds) it itself; a cache would recompile
            return self.code(H, W, x.device).expand(B, -1, -1, -1)
        key = (H, W, x.device)
        code = self._cache.get(key)
        if code is None:
            # a plain tensor even when called under inference_mode, so that training can reuse it
            with torch.inference_mode(False), torch.no_grad():
                code = self.code(H, W, x.device)  # [1, 2d, H, W]
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest size
            self._cache[key] = code
        return code.expand(B, -1, -1, -1)  # [B, 2d, H, W]

    def code(self, H: int, W: int, device: torch.device) -> Tensor:
        """The positional code of an ``H × W`` map, computed: ``[1, 2·d, H, W]`` float32."""
        # 1-based row and column of every pixel, as the official cumsum over a mask of ones.
        y_embed = torch.arange(1, H + 1, dtype=torch.float32, device=device).view(1, H, 1)
        y_embed = y_embed.expand(1, H, W)
        x_embed = torch.arange(1, W + 1, dtype=torch.float32, device=device).view(1, 1, W)
        x_embed = x_embed.expand(1, H, W)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale  # [1, H, W], in (0, scale]
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        d = self.num_pos_feats
        i = torch.arange(d, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (
            2 * torch.div(i, 2, rounding_mode="floor") / d
        )  # [d]: T^(2i/d), each twice

        pos_x = x_embed[..., None] / dim_t  # [1, H, W, d]
        pos_y = y_embed[..., None] / dim_t
        # interleave sin (even channels) and cos (odd channels): [1, H, W, d/2, 2] -> [1, H, W, d]
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [1, 2d, H, W]

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}, scale={self.scale:.4f}"
