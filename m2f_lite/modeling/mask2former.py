"""Mask2Former (Cheng et al., CVPR 2022): backbone → pixel decoder → transformer decoder.

``Mask2Former`` takes raw images (float RGB, 0..255), normalises them, pads them to a common size
divisible by ``size_divisibility`` (zeros after normalisation, as detectron2's
``ImageList.from_tensors``) and returns the class and mask predictions of every decoder stage.
``build_model(cfg)`` is the one place that reads ``cfg.model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from m2f_lite.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from m2f_lite.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

if TYPE_CHECKING:
    from m2f_lite.config import Config


class Mask2Former(nn.Module):
    """The whole model.

    Args:
        backbone: a module with ``forward(x) -> {"res2": ..., "res5": ...}`` (NCHW, strides 4..32).
        pixel_decoder: ``MSDeformAttnPixelDecoder`` (or anything with its ``forward`` contract).
        transformer_decoder: ``MultiScaleMaskedTransformerDecoder``.
        pixel_mean, pixel_std: per-channel RGB statistics on the 0..255 scale.
        size_divisibility: pad height and width up to a multiple of this (32); 0 or 1 = no rounding.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530),
        pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375),
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.size_divisibility = size_divisibility
        # not saved in checkpoints (as the official); they come from the config
        self.register_buffer(
            "pixel_mean",
            torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "pixel_std",
            torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1),
            persistent=False,
        )

    def preprocess(self, images: list[Tensor] | Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and pad a batch.

        Args:
            images: a list of ``[3, H_i, W_i]`` float RGB tensors in 0..255, or a ``[B, 3, H, W]`` tensor.

        Returns:
            ``[B, 3, Hp, Wp]`` (normalised, zero-padded at the bottom and right, ``Hp``, ``Wp`` the
            largest size rounded up to ``size_divisibility``) and the true ``(H_i, W_i)`` of each image.
        """
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(
                    f"images: expected a [B, 3, H, W] tensor or a list of [3, H, W], got {tuple(images.shape)}"
                )
            images = list(images.unbind(0))
        if len(images) == 0:
            raise ValueError("images: the batch is empty")
        for i, x in enumerate(images):
            if x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(
                    f"images[{i}]: expected a [3, H, W] RGB tensor, got {tuple(x.shape)}"
                )
        sizes = [(int(x.shape[1]), int(x.shape[2])) for x in images]
        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        d = self.size_divisibility
        if d > 1:
            max_h, max_w = (max_h + d - 1) // d * d, (max_w + d - 1) // d * d
        batch = self.pixel_mean.new_zeros(len(images), 3, max_h, max_w)  # [B, 3, Hp, Wp]
        for i, x in enumerate(images):
            h, w = sizes[i]
            batch[i, :, :h, :w] = (x.to(batch) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def forward(self, images: list[Tensor] | Tensor, *, aux: bool = True) -> dict:
        """Run the model on raw images (see ``preprocess``).

        ``aux=False`` skips the earlier predictions' masks and classes (``aux_outputs`` is then
        empty): inference reads only the final prediction, which is the same either way.

        Returns a dict:

        * ``pred_logits`` ``[B, Q, K+1]``: class logits, the last column "no object";
        * ``pred_masks`` ``[B, Q, Hp/4, Wp/4]``: mask logits on the padded image at stride 4;
        * ``aux_outputs``: ``[{"pred_logits", "pred_masks"}, ...]``, the earlier predictions (9 in
          the official config), first to last;
        * ``image_sizes``: the true ``(H_i, W_i)`` of each image (crop ``pred_masks``, upsampled to
          ``padded_size``, to these before resizing to the original resolution);
        * ``padded_size``: ``(Hp, Wp)``, the size the masks refer to.
        """
        x, sizes = self.preprocess(images)
        outputs = self.forward_features(x, aux=aux)
        outputs["image_sizes"] = sizes
        outputs["padded_size"] = (int(x.shape[-2]), int(x.shape[-1]))
        return outputs

    def forward_features(self, x: Tensor, *, aux: bool = True) -> dict:
        """The network on an already normalised, padded batch ``[B, 3, Hp, Wp]`` (no size bookkeeping)."""
        features = self.backbone(
            x
        )  # {"res2": [B, C2, Hp/4, Wp/4], ..., "res5": [B, C5, Hp/32, Wp/32]}
        mask_features, memory = self.pixel_decoder(features)
        return self.transformer_decoder(memory, mask_features, aux=aux)


def build_model(cfg: Config, *, backbone: nn.Module | None = None) -> Mask2Former:
    """Build the model described by ``cfg.model`` (random init; the backbone loads no weights).

    ``backbone`` replaces the one ``cfg.model.backbone`` names (the HF converter passes a
    backbone of non-standard widths this way); it must have ``channels`` and ``strides``.
    """
    from m2f_lite.modeling.backbone import build_backbone

    m = cfg.model
    if backbone is None:
        backbone = build_backbone(
            m.backbone, freeze_at=m.freeze_at, norm=m.backbone_norm, drop_path_rate=m.drop_path_rate
        )
    pixel_decoder = MSDeformAttnPixelDecoder(
        channels=list(backbone.channels),
        strides=list(backbone.strides),
        conv_dim=m.conv_dim,
        mask_dim=m.mask_dim,
        enc_layers=m.enc_layers,
        enc_nheads=m.enc_nheads,
        enc_n_points=m.enc_n_points,
        enc_dim_feedforward=m.enc_dim_feedforward,
        common_stride=m.common_stride,
    )
    transformer_decoder = MultiScaleMaskedTransformerDecoder(
        in_channels=m.conv_dim,
        num_classes=m.num_classes,
        hidden_dim=m.hidden_dim,
        num_queries=m.num_queries,
        nheads=m.nheads,
        dim_feedforward=m.dim_feedforward,
        num_layers=m.dec_layers,
        pre_norm=m.pre_norm,
        mask_dim=m.mask_dim,
        enforce_input_proj=m.enforce_input_proj,
        masked_attention=m.masked_attention,
    )
    return Mask2Former(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        transformer_decoder=transformer_decoder,
        pixel_mean=tuple(m.pixel_mean),
        pixel_std=tuple(m.pixel_std),
        size_divisibility=m.size_divisibility,
    )
