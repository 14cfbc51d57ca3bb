"""The Mask2Former network, one file per component (backbone, position, ms_deform_attn,
pixel_decoder, mask_head, transformer_decoder, mask2former)."""

from m2f_lite.modeling.mask2former import Mask2Former, build_model
from m2f_lite.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from m2f_lite.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from m2f_lite.modeling.position import PositionEmbeddingSine
from m2f_lite.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "Mask2Former",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
    "build_model",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
