"""The transformer decoder with masked attention (paper §3.2, Eq. 2), as the official
``MultiScaleMaskedTransformerDecoder``.

N learnable queries (features X_0 plus positional embeddings) are refined by ``num_layers`` layers.
Layer l visits one memory scale, round robin from the coarsest (strides 32, 16, 8, 32, ...), and runs

1. masked cross-attention (Eq. 2): ``X_l = softmax(M_{l-1} + Q_l K_l^T) V_l + X_{l-1}``, where
   ``M_{l-1}`` is 0 where the previous mask prediction, resized to this scale, has
   ``sigmoid > 0.5`` and -inf elsewhere (a query whose mask is empty everywhere attends everywhere);
2. self-attention among the queries;
3. a feed-forward network (ReLU),

each with a residual connection and LayerNorm (after, or before with ``pre_norm``). After the query
initialisation and after every layer, the prediction heads read the LayerNorm'ed queries: a linear
class head (K + 1 logits, the last one "no object") and a 3-layer MLP whose output ε_mask is
multiplied with the per-pixel embeddings: ``mask = ε_mask · ε_pixel`` (logits, stride 4). That gives
``num_layers + 1`` predictions; all but the last are ``aux_outputs`` (deep supervision). The
attention masks are computed at each memory scale directly and the stride-4 masks once, after the
loop (same numbers, fewer operations: see ``MultiScaleMaskedTransformerDecoder.forward``).

Attention masks here are True = blocked (``nn.MultiheadAttention``'s convention);
``F.scaled_dot_product_attention`` reads a boolean mask the other way round (True = attend).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_lite.modeling.mask_head import attention_mask, mask_logits, resize
from m2f_lite.modeling.pixel_decoder import c2_xavier_fill
from m2f_lite.modeling.position import PositionEmbeddingSine

__all__ = [
    "DecoderLayer",
    "MultiHeadAttention",
    "MultiScaleMaskedTransformerDecoder",
    "attention_mask",
    "mask_logits",
]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight`` [3C, C] =
    [W_q; W_k; W_v], ``in_proj_bias``, ``out_proj``), batch first, computed by
    ``F.scaled_dot_product_attention`` (or, with ``reference=True``, by the explicit softmax that
    ``nn.MultiheadAttention`` computes).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, reference: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiHeadAttention: embed_dim={embed_dim} must be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.reference = reference
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None
    ) -> Tensor:
        """``query`` ``[B, Lq, C]``, ``key``/``value`` ``[B, Lk, C]``; ``blocked`` ``[B, 1, Lq, Lk]`` bool,
        True = may not attend (no row may be all True). Returns ``[B, Lq, C]``."""
        B, Lq, C = query.shape
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, Lq, h, C // h).transpose(1, 2)  # [B, h, Lq, d]
        k = F.linear(key, w_k, b_k).view(B, -1, h, C // h).transpose(1, 2)  # [B, h, Lk, d]
        v = F.linear(value, w_v, b_v).view(B, -1, h, C // h).transpose(1, 2)  # [B, h, Lk, d]
        if self.reference:
            scores = (q * (C // h) ** -0.5) @ k.transpose(-2, -1)  # [B, h, Lq, Lk]
            if blocked is not None:
                scores = scores.masked_fill(blocked, float("-inf"))
            out = scores.softmax(-1) @ v  # [B, h, Lq, d]
        else:
            # scaled_dot_product_attention's boolean mask: True = attend, so pass the complement
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if blocked is None else ~blocked
            )
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, C))  # [B, Lq, C]


class AttentionLayer(nn.Module):
    """Cross-attention (``memory`` given) or self-attention (``memory=None``), residual and LayerNorm.

    Positional embeddings are added to queries and keys, never to values (DETR).
    """

    def __init__(self, *, d_model: int, nhead: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(embed_dim=d_model, num_heads=nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor | None = None,
        pos: Tensor | None = None,
        blocked: Tensor | None = None,
    ) -> Tensor:
        """``tgt``, ``query_pos``: ``[B, Q, C]``; ``memory``, ``pos``: ``[B, HW, C]``; ``blocked``:
        ``[B, 1, Q, HW]`` (True = blocked). Returns ``[B, Q, C]``."""
        x = self.norm(tgt) if self.pre_norm else tgt
        if memory is None:  # self-attention: keys and values are the queries themselves
            memory, pos = x, query_pos
        out = tgt + self.attn(x + query_pos, memory + pos, memory, blocked)
        return out if self.pre_norm else self.norm(out)


class FFNLayer(nn.Module):
    """Feed-forward network ``linear2(relu(linear1(x)))`` with residual and LayerNorm."""

    def __init__(self, *, d_model: int, dim_feedforward: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        out = tgt + self.linear2(F.relu(self.linear1(x), inplace=True))
        return out if self.pre_norm else self.norm(out)


class DecoderLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN (the paper's order, Fig. 2 right)."""

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, pre_norm: bool) -> None:
        super().__init__()
        self.cross_attn = AttentionLayer(d_model=d_model, nhead=nhead, pre_norm=pre_norm)
        self.self_attn = AttentionLayer(d_model=d_model, nhead=nhead, pre_norm=pre_norm)
        self.ffn = FFNLayer(d_model=d_model, dim_feedforward=dim_feedforward, pre_norm=pre_norm)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, blocked: Tensor | None
    ) -> Tensor:
        tgt = self.cross_attn(tgt, query_pos, memory, pos, blocked)
        tgt = self.self_attn(tgt, query_pos)
        return self.ffn(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask-embedding head)."""

    def __init__(
        self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """The Mask2Former transformer decoder (see the module docstring).

    Args:
        in_channels: channels of the memory maps (the pixel decoder's ``conv_dim``).
        num_classes: K; the class head predicts K + 1 logits (last = no object).
        hidden_dim: query width C (256).
        num_queries: N (100, or 200 for Swin-L).
        nheads: attention heads (8).
        dim_feedforward: FFN width (2048).
        num_layers: decoder layers (9; the official ``DEC_LAYERS: 10`` counts the prediction from the
            initial queries too).
        pre_norm: LayerNorm before each block instead of after.
        mask_dim: channels of the per-pixel embeddings (``mask_features``).
        enforce_input_proj: add a 1×1 conv on the memory even when ``in_channels == hidden_dim``.
        masked_attention: False = standard cross-attention over the whole map (the paper's ablation).
        reference: compute the attention masks as the official code (see ``forward``).
    """

    num_scales = 3  # the memory has 3 scales, visited round robin

    def __init__(
        self,
        *,
        in_channels: int = 256,
        num_classes: int = 133,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        enforce_input_proj: bool = False,
        masked_attention: bool = True,
        reference: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = nheads
        self.masked_attention = masked_attention
        self.reference = reference
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, normalize=True)
        self.layers = nn.ModuleList(
            DecoderLayer(
                d_model=hidden_dim, nhead=nheads, dim_feedforward=dim_feedforward, pre_norm=pre_norm
            )
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # X_0, the learnable query features
        self.query_embed = nn.Embedding(
            num_queries, hidden_dim
        )  # the queries' positional embeddings
        self.level_embed = nn.Embedding(self.num_scales, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_scales):
            if in_channels != hidden_dim or enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(
            input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=mask_dim, num_layers=3
        )

    def forward(self, memory: list[Tensor], mask_features: Tensor, *, aux: bool = True) -> dict:
        """Decode the queries against the memory.

        Args:
            memory: 3 maps ``[B, C_in, H_l, W_l]``, coarsest first (strides 32, 16, 8).
            mask_features: per-pixel embeddings ``[B, mask_dim, H/4, W/4]``.
            aux: also return the earlier predictions (training needs them; inference does not).

        Returns:
            ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H/4, W/4], "aux_outputs": [...]}``,
            ``aux_outputs`` holding the ``num_layers`` earlier predictions, first to last (empty
            with ``aux=False``).

        The attention mask of layer l needs prediction l - 1's mask at the layer's memory scale
        only. Bilinear resizing is linear, so resize(ε_mask · ε_pixel) = ε_mask · resize(ε_pixel):
        the mask logits at each scale come from ``mask_features`` resized once per scale (the
        same numbers up to float rounding, 4-64x fewer multiply-adds), and the masks at
        H/4 × W/4 are computed once, after the loop, for the predictions returned.
        ``reference=True`` computes them as the official code does, resizing each prediction's
        full-resolution masks (the tests compare the two).
        """
        if len(memory) != self.num_scales:
            raise ValueError(
                f"memory: expected {self.num_scales} maps (coarsest first), got {len(memory)}"
            )
        if self.reference:
            return self._forward_reference(memory, mask_features, aux)
        sizes = [tuple(x.shape[-2:]) for x in memory]
        srcs, poss, query_pos, output = self._inputs(memory, mask_features.shape[0])
        # ε_pixel at each memory scale, [B, D, H_l, W_l], for the attention masks
        resized = (
            [resize(mask_features.detach(), s) for s in sizes] if self.masked_attention else []
        )
        decoded = [self.decoder_norm(output)]  # the LayerNorm'ed queries of each prediction
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_scales
            blocked = None
            if self.masked_attention:
                with torch.no_grad():  # the mask M_{l-1} of Eq. 2 carries no gradient
                    small = torch.einsum(
                        "bqc,bchw->bqhw", self.mask_embed(decoded[-1]), resized[lvl]
                    )  # [B, Q, H_l, W_l]
                blocked = attention_mask(small, sizes[lvl])[:, None]  # [B, 1, Q, HW]
            output = layer(output, query_pos, srcs[lvl], poss[lvl], blocked)
            decoded.append(self.decoder_norm(output))
        decoded = decoded if aux else decoded[-1:]
        logits = [self.class_embed(d) for d in decoded]  # [B, Q, K+1] each
        masks = mask_logits([self.mask_embed(d) for d in decoded], mask_features)
        return {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])
            ],
        }

    def _inputs(self, memory: list[Tensor], B: int) -> tuple[list, list, Tensor, Tensor]:
        """The memory as token sequences ``[B, HW, C]`` (+ level embedding), their positions, the
        query positions and the initial queries X_0 ``[B, Q, C]``."""
        srcs, poss = [], []
        for lvl, x in enumerate(memory):
            src = (
                self.input_proj[lvl](x).flatten(2) + self.level_embed.weight[lvl][None, :, None]
            )  # [B, C, HW]
            srcs.append(src.transpose(1, 2))  # [B, HW, C]
            poss.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C]
        output = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)  # [B, Q, C]
        return srcs, poss, query_pos, output

    def _forward_reference(self, memory: list[Tensor], mask_features: Tensor, aux: bool) -> dict:
        """``forward`` as the official code: every prediction's masks at H/4 × W/4, resized."""
        sizes = [tuple(x.shape[-2:]) for x in memory]
        srcs, poss, query_pos, output = self._inputs(memory, mask_features.shape[0])
        predictions = [self.prediction_heads(output, mask_features)]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_scales
            blocked = None
            if self.masked_attention:
                blocked = attention_mask(predictions[-1][1], sizes[lvl])[:, None]  # [B, 1, Q, HW]
            output = layer(output, query_pos, srcs[lvl], poss[lvl], blocked)
            predictions.append(self.prediction_heads(output, mask_features))
        aux_outputs = [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]]
        logits, masks = predictions[-1]
        return {
            "pred_logits": logits,
            "pred_masks": masks,
            "aux_outputs": aux_outputs if aux else [],
        }

    def prediction_heads(self, output: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``[B, Q, K+1]`` and mask logits ``[B, Q, H/4, W/4]`` from the queries ``[B, Q, C]``."""
        decoder_output = self.decoder_norm(output)  # [B, Q, C]
        outputs_class = self.class_embed(decoder_output)  # [B, Q, K+1]
        mask_embed = self.mask_embed(decoder_output)  # [B, Q, D]
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)  # [B, Q, H/4, W/4]
        return outputs_class, outputs_mask
