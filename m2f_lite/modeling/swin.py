"""Swin Transformer as the official Mask2Former backbone computes it (Liu et al., ICCV 2021).

The parameters and modules (patch embedding, window attention, MLPs, patch merging) are timm's;
what this file adds is the *window step* and the output norms, written to match the official
``mask2former/modeling/backbone/swin.py`` (``D2SwinTransformer``) at every input size.

A Swin block is ``x + W-MSA(LN(x))`` followed by ``x + MLP(LN(x))`` (Eq. 3 of the Swin paper).
W-MSA attends inside non-overlapping ``M × M`` windows, with a relative position bias ``B``:

    Attention(Q, K, V) = SoftMax(Q Kᵀ / √d + B) V                        (Swin, Eq. 4)

Every second block shifts the windows by ``⌊M/2⌋`` (SW-MSA), which the official code implements
as: pad the token map on the right/bottom to a multiple of ``M``, roll it by ``-⌊M/2⌋``, attend
within windows while blocking pairs of tokens that were not neighbours before the roll, roll back,
crop the padding. The order matters once a stage's grid is not a multiple of the window (COCO's
800×1333, 224×352, ...): timm rolls *before* padding and drops the shift when the grid is no
larger than the window, so its numbers differ there; HF transformers follows the official order.

The official backbone also normalises each output stage with its own LayerNorm (``norm0..norm3``),
which timm's ``features_only`` lacks; they are added here under the official names.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

# Official WindowAttention adds -100 (not -inf) to the logits of blocked pairs; we keep its value.
BLOCKED_LOGIT = -100.0


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device
) -> Tensor:
    """Which key each query of a shifted window may not see: ``[nW, M², M²]`` bool, True = blocked.

    ``height``, ``width`` are the *padded* token map (multiples of ``window``), as in the official
    ``BasicLayer``. After rolling by ``-shift``, the last ``window`` rows fall in two regions (the
    rows that were already there, ``[H - M, H - s)``, and the ``s`` rows that wrapped around from
    the top); the same for columns. Tokens from different regions were not neighbours in the
    image, so they may not attend to each other. (PyTorch's ``nn.MultiheadAttention`` uses the
    same True = blocked convention; ``F.scaled_dot_product_attention``'s boolean mask means the
    opposite.)
    """

    def region(n: int) -> Tensor:  # 0, 1 or 2 for every row (column) of the rolled, padded map
        index = torch.arange(n, device=device)
        return (index >= n - window).long() + (index >= n - shift).long()  # [n]

    label = region(height)[:, None] * 3 + region(width)[None, :]  # [Hp, Wp], 9 regions
    label = window_partition(label[None, :, :, None], (window, window))  # [nW, M, M, 1]
    label = label.reshape(-1, window * window)  # [nW, M²]
    return label[:, :, None] != label[:, None, :]  # [nW, M², M²]


def window_attention_official(
    block: SwinTransformerBlock, x: Tensor, blocked: Tensor | None
) -> Tensor:
    """W-MSA / SW-MSA of one timm block in the official order: pad → roll → attend → unroll → crop.

    ``x`` is ``LN(x)``, ``[B, H, W, C]``; ``blocked`` the mask from :func:`shifted_window_mask` for
    this stage's padded size (ignored by unshifted blocks). Returns ``[B, H, W, C]``.
    """
    _, H, W, C = x.shape  # [B, H, W, C]
    window, shift = block.window_size[0], block.shift_size[0]
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # [B, Hp, Wp, C], zeros on the right and bottom
    Hp, Wp = H + pad_h, W + pad_w
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(x, (window, window)).reshape(-1, window * window, C)  # [B·nW, M², C]
    bias = None
    if shift > 0:  # additive form for WindowAttention: 0 where allowed, -100 where blocked
        bias = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device).masked_fill(
            blocked, BLOCKED_LOGIT
        )
    windows = block.attn(windows, mask=bias)  # [B·nW, M², C]
    x = window_reverse(
        windows.view(-1, window, window, C), (window, window), Hp, Wp
    )  # [B, Hp, Wp, C]
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :H, :W, :]  # [B, H, W, C]


def swin_block_official(block: SwinTransformerBlock, x: Tensor, blocked: Tensor | None) -> Tensor:
    """One Swin block (Swin Eq. 3) on ``[B, H, W, C]`` tokens, using the official window step."""
    B, H, W, C = x.shape
    x = x + block.drop_path1(window_attention_official(block, block.norm1(x), blocked))
    x = x.reshape(B, H * W, C)  # [B, HW, C]: the MLP on tokens, as the official block
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x.reshape(B, H, W, C)


class SwinTrunk(nn.Module):
    """Swin stages with official semantics on timm modules; returns res2..res5, NCHW, normalised.

    Built from a timm Swin (``timm_name`` plus architecture overrides such as ``embed_dim``,
    ``depths``, ``num_heads``, ``window_size``) with ``always_partition=True`` (never shrink the
    window or drop the shift for small grids, as the official code) and ``strict_img_size=False``
    (any input size). timm's classifier norm and head are dropped. Parameter names are timm's,
    except that timm attaches each patch merging to the *next* stage (``layers.{i+1}.downsample``
    is the official ``layers.{i}.downsample``); the output norms keep the official ``norm{i}``.
    """

    def __init__(
        self, *, timm_name: str, drop_path_rate: float = 0.0, arch: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        swin = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            always_partition=True,
            strict_img_size=False,
            **(arch or {}),
        )
        self.patch_size: int = swin.patch_embed.patch_size[0]
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.channels: list[int] = [info["num_chs"] for info in swin.feature_info]
        for i, channels in enumerate(self.channels):  # the official per-output LayerNorms
            self.add_module(f"norm{i}", nn.LayerNorm(channels))

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding ``[B, 3, H, W]`` → ``[B, ⌈H/4⌉, ⌈W/4⌉, C]``, zero-padding the image on the
        right and bottom to a multiple of the patch size first, as the official ``PatchEmbed``."""
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[3] % p) % p, 0, (p - x.shape[2] % p) % p))  # [B, 3, Hp, Wp]
        return self.patch_embed(x)  # [B, H/4, W/4, C], NHWC, after the patch norm

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` → four maps ``[B, C_i, ⌈H/2^(i+2)⌉, ⌈W/2^(i+2)⌉]`` (strides 4..32)."""
        x = self.embed(x)  # [B, H/4, W/4, C]
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)  # patch merging (zero-pads odd sizes); identity for stage 0
            blocked = None
            shifted = [block for block in stage.blocks if block.shift_size[0] > 0]
            if shifted:  # one mask per stage, on the padded size, as the official BasicLayer
                window, shift = shifted[0].window_size[0], shifted[0].shift_size[0]
                Hp = -(-x.shape[1] // window) * window  # ceil to a multiple of the window
                Wp = -(-x.shape[2] // window) * window
                blocked = shifted_window_mask(Hp, Wp, window, shift, x.device)  # [nW, M², M²]
            for block in stage.blocks:
                x = swin_block_official(block, x, blocked)  # [B, H_i, W_i, C_i]
            out = getattr(self, f"norm{i}")(x)  # the official output norm
            outs.append(out.permute(0, 3, 1, 2).contiguous())  # [B, C_i, H_i, W_i]
        return outs

    def forward_timm_window_step(self, x: Tensor) -> list[Tensor]:
        """The same network with timm's own block forward (roll before pad): NOT the official
        numbers when a grid is not a multiple of the window; kept so a test can show the gap."""
        x = self.embed(x)  # [B, H/4, W/4, C]
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)  # timm: downsample, then blocks with timm's window step
            outs.append(
                getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
            )  # [B, C_i, H_i, W_i]
        return outs
