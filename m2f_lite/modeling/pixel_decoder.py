"""The pixel decoder: a multi-scale deformable-attention encoder plus one FPN step (paper §3.2, §4).

It turns the backbone's four maps (res2..res5, strides 4..32) into

* three *memory* maps at strides 32, 16, 8 (the scales the transformer decoder's masked attention
  visits, round robin), each ``conv_dim`` channels, and
* the per-pixel embeddings ε_pixel at stride 4 (``mask_features``, ``mask_dim`` channels) that every
  query's mask embedding is multiplied with (Eq. 1 of MaskFormer: ``mask = σ(ε_mask · ε_pixel)``).

Steps, as the official ``MSDeformAttnPixelDecoder``:

1. res5, res4, res3 → 1×1 conv + GroupNorm to ``conv_dim``; add sine positions + a learnt level
   embedding (positions only enter the attention's queries).
2. ``enc_layers`` deformable encoder layers over the three scales together: MSDeformAttn
   (Deformable DETR Eq. 3) → add & LayerNorm → FFN (ReLU, ``enc_dim_feedforward`` = 1024) → add &
   LayerNorm (post-norm).
3. FPN at res2: lateral 1×1 conv + GN, add the bilinearly upsampled stride-8 output, 3×3 conv + GN
   + ReLU; then a 1×1 conv gives ``mask_features``.

The whole decoder runs in float32 even under autocast (deformable sampling is not run in half
precision in the official code).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_lite.modeling.ms_deform_attn import MSDeformAttn
from m2f_lite.modeling.position import PositionEmbeddingSine


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvNorm(nn.Sequential):
    """A conv without bias, then GroupNorm, then an optional ReLU (detectron2's ``Conv2d(norm="GN")``)."""

    def __init__(
        self, *, in_channels: int, out_channels: int, kernel_size: int, norm_groups: int, relu: bool
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            {
                "conv": nn.Conv2d(
                    in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
                ),
                "norm": nn.GroupNorm(norm_groups, out_channels),
            }
        )
        if relu:
            layers["relu"] = nn.ReLU()
        super().__init__(layers)
        c2_xavier_fill(self.conv)


class DeformableEncoderLayer(nn.Module):
    """One encoder layer: MSDeformAttn self-attention, then FFN, each with residual + post-LayerNorm."""

    def __init__(
        self, *, d_model: int, n_levels: int, n_heads: int, n_points: int, dim_feedforward: int
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """``src``, ``pos``: ``[B, S, C]``; ``reference_points``: ``[B, S, L, 2]``. Returns ``[B, S, C]``."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        B, S, C = src.shape
        # The FFN on [B·S, C] rows: a 2-D Linear returns a fresh tensor, so the in-place ReLU (one
        # [B·S, F] buffer less) does not write into a view, whose backward would copy the gradient.
        rows = src.reshape(B * S, C)  # [B·S, C]
        hidden = F.relu(self.linear1(rows), inplace=True)  # [B·S, F]
        return self.norm2(rows + self.linear2(hidden)).view(B, S, C)


def encoder_reference_points(
    spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device
) -> Tensor:
    """Each pixel's own centre as its reference point, on every level: ``[B, S, L, 2]``, (x, y) in (0, 1).

    Pixel (i, j) of an H×W level sits at ((j + 0.5) / W, (i + 0.5) / H). No image padding is masked
    (the official model never passes a padding mask), so the same point is used on all levels.
    The centres are ``arange(n) + 0.5``: the official ``linspace(0.5, n - 0.5, n)``'s values exactly,
    in a form that ``torch.export`` keeps symbolic in ``n`` (``m2f_lite.export``).
    """
    points = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # [H_l*W_l, 2]
    ref = torch.cat(points, 0)  # [S, 2]
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)  # [B, S, L, 2]


class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder (see the module docstring).

    Args:
        channels: the backbone's channels of res2..res5 (``Backbone.channels``).
        strides: their strides, ``[4, 8, 16, 32]``.
        conv_dim: channels of the encoder and of the memory maps (256).
        mask_dim: channels of ``mask_features`` (256).
        enc_layers: deformable encoder layers (6).
        enc_nheads: heads of MSDeformAttn (8).
        enc_n_points: sampling points per head and level (4).
        enc_dim_feedforward: FFN width of the encoder (1024 in the official code).
        norm_groups: GroupNorm groups (32; must divide ``conv_dim``).
        common_stride: stride of ``mask_features`` (4); FPN steps are added from the encoder's finest
            stride down to it.
        num_encoder_levels: how many of the coarsest maps enter the encoder (3: res3..res5).
    """

    def __init__(
        self,
        *,
        channels: list[int],
        strides: list[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        enc_layers: int = 6,
        enc_nheads: int = 8,
        enc_n_points: int = 4,
        enc_dim_feedforward: int = 1024,
        norm_groups: int = 32,
        common_stride: int = 4,
        num_encoder_levels: int = 3,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or list(strides) != sorted(strides):
            raise ValueError(
                f"channels {channels} and strides {strides} must describe the same maps, finest first"
            )
        if conv_dim % norm_groups != 0:
            raise ValueError(
                f"norm_groups={norm_groups} must divide conv_dim={conv_dim} (GroupNorm)"
            )
        self.strides = list(strides)
        self.in_features = [f"res{i + 2}" for i in range(len(channels))]  # res2..res5, finest first
        self.num_encoder_levels = num_encoder_levels
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        enc_channels = list(channels)[-num_encoder_levels:]

        # 1x1 conv + GN per encoder level, coarsest first (res5, res4, res3) as the official order
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(norm_groups, conv_dim)
            )
            for c in reversed(enc_channels)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(num_encoder_levels, conv_dim))
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(
                d_model=conv_dim,
                n_levels=num_encoder_levels,
                n_heads=enc_nheads,
                n_points=enc_n_points,
                dim_feedforward=enc_dim_feedforward,
            )
            for _ in range(enc_layers)
        )
        # official init of the encoder: Xavier on every matrix, then MSDeformAttn's own, level_embed ~ N(0, 1)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

        # FPN steps for the maps finer than the encoder's finest, down to common_stride (res2 only
        # in practice). Stored finest first: lateral_convs[j] reads map j (the official adapter_{j+1}).
        num_fpn = int(math.log2(self.strides[-num_encoder_levels]) - math.log2(common_stride))
        self.lateral_convs = nn.ModuleList(
            ConvNorm(
                in_channels=c,
                out_channels=conv_dim,
                kernel_size=1,
                norm_groups=norm_groups,
                relu=False,
            )
            for c in channels[:num_fpn]
        )
        self.output_convs = nn.ModuleList(
            ConvNorm(
                in_channels=conv_dim,
                out_channels=conv_dim,
                kernel_size=3,
                norm_groups=norm_groups,
                relu=True,
            )
            for _ in range(num_fpn)
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Backbone maps ``{"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}`` →

        ``mask_features`` ``[B, mask_dim, H/4, W/4]`` and the memory maps
        ``[[B, conv_dim, H/32, W/32], [B, conv_dim, H/16, W/16], [B, conv_dim, H/8, W/8]]`` (coarsest first),
        all float32.
        """
        maps = [features[k] for k in self.in_features]
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            return self._forward_fp32([x.float() for x in maps])

    def _forward_fp32(self, maps: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        # maps: res2..res5, finest first; the encoder takes the coarsest levels, coarsest first
        enc_maps = maps[-self.num_encoder_levels :][::-1]
        B = enc_maps[0].shape[0]
        spatial_shapes = [(x.shape[2], x.shape[3]) for x in enc_maps]
        src = torch.cat(
            [proj(x).flatten(2).transpose(1, 2) for proj, x in zip(self.input_proj, enc_maps)], 1
        )  # [B, S, C]
        pos = torch.cat(
            [
                self.pe_layer(x).flatten(2).transpose(1, 2)
                + self.level_embed[lvl].view(1, 1, -1)  # [B, H_l*W_l, C]
                for lvl, x in enumerate(enc_maps)
            ],
            1,
        )  # [B, S, C]
        reference_points = encoder_reference_points(spatial_shapes, B, src.device)  # [B, S, L, 2]
        for layer in self.encoder:
            src = layer(src, pos, reference_points, spatial_shapes)

        # back to maps: [B, S, C] -> L x [B, C, H_l, W_l], coarsest first
        outs = [
            y.transpose(1, 2).reshape(B, self.conv_dim, h, w)
            for y, (h, w) in zip(
                src.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes
            )
        ]
        # FPN: from the encoder's finest output down to common_stride, coarse to fine
        for j in reversed(range(len(self.lateral_convs))):
            lateral = self.lateral_convs[j](maps[j])  # [B, C, H_j, W_j]
            up = F.interpolate(
                outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outs.append(self.output_convs[j](lateral + up))
        memory = outs[
            :3
        ]  # the three coarsest maps (strides 32, 16, 8) feed the transformer decoder
        return self.mask_features(outs[-1]), memory
