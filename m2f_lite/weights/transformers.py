"""HF transformers' ``Mask2FormerForUniversalSegmentation`` → an m2f_lite model, same function.

HF reimplemented the official model module by module under other names; in float32 the two
compute the same predictions (``tests/test_parity_hf.py`` checks every stage to 1e-4). Names map
one to one (the table below) except HF's decoder self-attention, whose separate ``q/k/v_proj``
become ``nn.MultiheadAttention``'s packed ``in_proj``; the backbone goes through
``m2f_lite.weights.backbone``. Where HF departs from the official code (found while writing
this; our modules follow the official): it does not keep the pixel decoder in float32 under
autocast and builds its sine positions in the input's dtype; in training it drops whole decoder
layers at random when ``dropout > 0`` (``layerdrop = dropout``) and clamps non-finite encoder
activations; its random initialisation of the pixel decoder's convolutions is N(0, 0.02) instead of the official Xavier/"c2_xavier_fill";
its image processor resizes and post-processes differently (see DESIGN.md). None of these matter
for a float32 forward pass in eval mode.

To feed both models the same input: HF takes normalised pixels, this model takes 0..255 images
and normalises them itself, so give HF ``(x - mean) / std`` and this model ``x`` (same
``mean``/``std``), at sizes divisible by 32.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from m2f_lite.config import Config, apply_overrides
from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.mask2former import Mask2Former, build_model
from m2f_lite.weights.backbone import backbone_name_from_hf_config, hf_backbone_to_timm
from m2f_lite.weights.keys import ConversionError, ConversionReport, check_state_dict, rename_key

_LAYER = "transformer_decoder.layers.{i}."
_HP, _HT = "model.pixel_level_module.decoder.", "model.transformer_module."
_HE, _HL = _HP + "encoder.layers.{i}.", _HT + "decoder.layers.{i}."
TRANSFORMERS_HEAD: list[tuple[str, str]] = [  # HF's self-attention q/k/v_proj are packed apart
    ("pixel_decoder.level_embed", _HP + "level_embed"),
    ("pixel_decoder.input_proj.{rest}", _HP + "input_projections.{rest}"),
    ("pixel_decoder.encoder.{i}.self_attn.{rest}", _HE + "self_attn.{rest}"),
    ("pixel_decoder.encoder.{i}.norm1.{rest}", _HE + "self_attn_layer_norm.{rest}"),
    ("pixel_decoder.encoder.{i}.linear1.{rest}", _HE + "fc1.{rest}"),
    ("pixel_decoder.encoder.{i}.linear2.{rest}", _HE + "fc2.{rest}"),
    ("pixel_decoder.encoder.{i}.norm2.{rest}", _HE + "final_layer_norm.{rest}"),
    ("pixel_decoder.mask_features.{rest}", _HP + "mask_projection.{rest}"),
    ("pixel_decoder.lateral_convs.{i}.conv.weight", _HP + "adapter_{i+1}.0.weight"),
    ("pixel_decoder.lateral_convs.{i}.norm.{rest}", _HP + "adapter_{i+1}.1.{rest}"),
    ("pixel_decoder.output_convs.{i}.conv.weight", _HP + "layer_{i+1}.0.weight"),
    ("pixel_decoder.output_convs.{i}.norm.{rest}", _HP + "layer_{i+1}.1.{rest}"),
    ("transformer_decoder.query_embed.weight", _HT + "queries_embedder.weight"),
    ("transformer_decoder.query_feat.weight", _HT + "queries_features.weight"),
    ("transformer_decoder.level_embed.weight", _HT + "level_embed.weight"),
    ("transformer_decoder.input_proj.{rest}", _HT + "input_projections.{rest}"),
    (_LAYER + "cross_attn.attn.{rest}", _HL + "cross_attn.{rest}"),
    (_LAYER + "cross_attn.norm.{rest}", _HL + "cross_attn_layer_norm.{rest}"),
    (_LAYER + "self_attn.attn.out_proj.{rest}", _HL + "self_attn.out_proj.{rest}"),
    (_LAYER + "self_attn.norm.{rest}", _HL + "self_attn_layer_norm.{rest}"),
    (_LAYER + "ffn.linear1.{rest}", _HL + "fc1.{rest}"),
    (_LAYER + "ffn.linear2.{rest}", _HL + "fc2.{rest}"),
    (_LAYER + "ffn.norm.{rest}", _HL + "final_layer_norm.{rest}"),
    ("transformer_decoder.decoder_norm.{rest}", _HT + "decoder.layernorm.{rest}"),
    (
        "transformer_decoder.mask_embed.layers.{i}.{rest}",
        _HT + "decoder.mask_predictor.mask_embedder.{i}.0.{rest}",
    ),
    ("transformer_decoder.class_embed.{rest}", "class_predictor.{rest}"),
]
_HF_QKV = re.compile(
    re.escape(_HT) + r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"
)
HF_BACKBONE_PREFIX = "model.pixel_level_module.encoder."


def transformers_head_to_ours(hf_sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """HF's pixel-decoder and transformer-decoder weights → ours, and the HF keys left unconverted."""
    out, qkv, left = {}, {}, []
    for k, v in hf_sd.items():
        if k.startswith(HF_BACKBONE_PREFIX) or k == "criterion.empty_weight":
            continue
        if m := _HF_QKV.fullmatch(k):  # separate q/k/v projections → the packed in_proj
            qkv.setdefault(f"{_LAYER.format(i=m[1])}self_attn.attn.in_proj_{m[3]}", {})[m[2]] = v
        elif (new := rename_key(k, TRANSFORMERS_HEAD, reverse=True)) is not None:
            out[new] = v
        else:
            left.append(k)
    return out | {key: torch.cat([p["q"], p["k"], p["v"]]) for key, p in qkv.items()}, left


def transformers_model_fields(hf_config: Any) -> dict[str, Any]:
    """The ``cfg.model`` fields of an HF ``Mask2FormerConfig``.

    HF's ``decoder_layers`` counts like the official ``DEC_LAYERS`` (the prediction from the
    learnable queries too), so ours is one less; HF, like the official code, uses one head count
    for the deformable encoder and the decoder, and 4 sampling points.
    """
    c = hf_config
    return {
        "model.backbone": backbone_name_from_hf_config(c.backbone_config)[0],
        "model.num_classes": c.num_labels,
        "model.num_queries": c.num_queries,
        "model.hidden_dim": c.hidden_dim,
        "model.nheads": c.num_attention_heads,
        "model.dim_feedforward": c.dim_feedforward,
        "model.dec_layers": c.decoder_layers - 1,
        "model.pre_norm": c.pre_norm,
        "model.enforce_input_proj": c.enforce_input_projection,
        "model.conv_dim": c.feature_size,
        "model.mask_dim": c.mask_feature_size,
        "model.enc_layers": c.encoder_layers,
        "model.enc_nheads": c.num_attention_heads,
        "model.enc_n_points": 4,
        "model.enc_dim_feedforward": c.encoder_feedforward_dim,
        "model.common_stride": c.common_stride,
    }


def from_transformers(hf_model: nn.Module, *, cfg: Config | None = None) -> Mask2Former:
    """An ``m2f_lite`` model with the configuration and weights of HF's ``Mask2FormerForUniversalSegmentation``.

    The model fields come from ``transformers_model_fields``; everything else (pixel statistics,
    ImageNet's as in HF's image processor, size divisibility) from ``cfg`` (default ``Config()``).
    A backbone of non-standard widths is rebuilt as HF has it. Raises ``ConversionError`` naming
    any weight left over, missing or of the wrong shape.
    """
    cfg = apply_overrides(cfg or Config(), transformers_model_fields(hf_model.config))
    name, arch = backbone_name_from_hf_config(hf_model.config.backbone_config)
    model = build_model(cfg, backbone=build_backbone(name, **arch))
    hf_sd = hf_model.state_dict()
    sd, left = transformers_head_to_ours(hf_sd)
    prefix = HF_BACKBONE_PREFIX
    hf_backbone = {k.removeprefix(prefix): v for k, v in hf_sd.items() if k.startswith(prefix)}
    sd |= {f"backbone.{k}": v for k, v in hf_backbone_to_timm(hf_backbone, name).items()}
    report = check_state_dict(model, sd, ConversionReport(unexpected=left, backbone=name))
    if not report.ok:
        raise ConversionError(f"the HF model does not fit the m2f_lite model:\n{report}")
    model.load_state_dict(sd)
    return model.eval()
