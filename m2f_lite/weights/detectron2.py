"""The official detectron2 checkpoints (Mask2Former's model zoo) in this package's names, both ways.

* ``convert_detectron2(path_or_state_dict)`` renames an official checkpoint (a model-zoo ``.pkl``,
  read by ``m2f_lite.weights.unpickler.read_state_dict`` without running any of its code, or a
  detectron2 ``.pth``, read with ``weights_only=True``) into this package's names;
  ``to_detectron2`` is its exact inverse; ``load_official(model, path)`` loads.
* ``model_fields(state_dict, backbone)``: the ``cfg.model`` fields the weights imply.

The head's names map one to one to the official ones (``DETECTRON2_HEAD`` below, templates as in
``m2f_lite.weights.keys``); the backbone's go through ``m2f_lite.weights.backbone``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2f_lite.modeling.mask2former import Mask2Former
from m2f_lite.weights.backbone import detectron2_backbone_to_timm, timm_to_detectron2_backbone
from m2f_lite.weights.keys import ConversionError, ConversionReport, check_state_dict, rename_key
from m2f_lite.weights.unpickler import read_state_dict

# ---------------------------------------------------------------------------------------------
# Key table: (ours, theirs), read by ``rename_key`` in either direction
# ---------------------------------------------------------------------------------------------

_PD, _PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
_CROSS, _SELF = (
    _PR + "transformer_cross_attention_layers.{i}.",
    _PR + "transformer_self_attention_layers.{i}.",
)
_LAYER = "transformer_decoder.layers.{i}."
DETECTRON2_HEAD: list[tuple[str, str]] = [
    ("pixel_decoder.encoder.{i}.{rest}", _PD + "transformer.encoder.layers.{i}.{rest}"),
    ("pixel_decoder.level_embed", _PD + "transformer.level_embed"),
    ("pixel_decoder.lateral_convs.{i}.conv.weight", _PD + "adapter_{i+1}.weight"),
    ("pixel_decoder.lateral_convs.{i}.norm.{rest}", _PD + "adapter_{i+1}.norm.{rest}"),
    ("pixel_decoder.output_convs.{i}.conv.weight", _PD + "layer_{i+1}.weight"),
    ("pixel_decoder.output_convs.{i}.norm.{rest}", _PD + "layer_{i+1}.norm.{rest}"),
    ("pixel_decoder.input_proj.{rest}", _PD + "input_proj.{rest}"),
    ("pixel_decoder.mask_features.{rest}", _PD + "mask_features.{rest}"),
    (_LAYER + "cross_attn.attn.{rest}", _CROSS + "multihead_attn.{rest}"),
    (_LAYER + "cross_attn.norm.{rest}", _CROSS + "norm.{rest}"),
    (_LAYER + "self_attn.attn.{rest}", _SELF + "self_attn.{rest}"),
    (_LAYER + "self_attn.norm.{rest}", _SELF + "norm.{rest}"),
    (_LAYER + "ffn.{rest}", _PR + "transformer_ffn_layers.{i}.{rest}"),
    # query_feat, query_embed, level_embed, input_proj, decoder_norm, class_embed, mask_embed
    ("transformer_decoder.{rest}", _PR + "{rest}"),
]
# Official keys that are not weights of the network: the loss's class weights, pixel statistics.
DETECTRON2_IGNORED = ("criterion.empty_weight", "pixel_mean", "pixel_std")


# ---------------------------------------------------------------------------------------------
# Official detectron2 checkpoints
# ---------------------------------------------------------------------------------------------


def detectron2_backbone_name(sd: dict[str, Tensor]) -> str:
    """The backbone an official checkpoint holds, from its keys and shapes (``resnet50``, ``swin_large_384``, ...)."""
    if "backbone.stem.conv1.weight" in sd:
        blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.res4.")})
        bottleneck = "backbone.res2.0.conv3.weight" in sd
        depths = {6: 50, 23: 101} if bottleneck else {2: 18}
        if blocks not in depths:
            raise ConversionError(
                f"backbone: a ResNet with {blocks} res4 blocks (bottleneck={bottleneck}) is not R18/50/101"
            )
        return f"resnet{depths[blocks]}"
    if "backbone.patch_embed.proj.weight" in sd:
        embed_dim = sd["backbone.patch_embed.proj.weight"].shape[0]
        stage3 = len({k.split(".")[4] for k in sd if k.startswith("backbone.layers.2.blocks.")})
        table = sd["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        window = (round(table**0.5) + 1) // 2  # the table has (2M - 1)² rows
        variants = {(96, 6, 7): "swin_tiny", (96, 18, 7): "swin_small", (128, 18, 7): "swin_base"}
        variants |= {(128, 18, 12): "swin_base_384", (192, 18, 12): "swin_large_384"}
        if (embed_dim, stage3, window) not in variants:
            raise ConversionError(
                f"backbone: Swin with embed_dim {embed_dim}, {stage3} stage-3 blocks, window {window} is unknown"
            )
        return variants[(embed_dim, stage3, window)]
    raise ConversionError(
        "backbone: the checkpoint has neither backbone.stem.* (ResNet) nor backbone.patch_embed.* (Swin)"
    )


def convert_detectron2(
    path_or_state_dict: str | os.PathLike | dict[str, Any], *, backbone: str | None = None
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Official weights (a file, or a dict of arrays/tensors) → this package's names, and a report.

    ``backbone`` is read from the checkpoint when not given. Head keys no table knows go to
    ``report.unexpected`` (and are left out); ``criterion.empty_weight`` and pixel statistics to
    ``report.ignored``; unknown backbone keys raise. ``check_state_dict`` compares with a model.
    """
    if isinstance(path_or_state_dict, dict):
        sd = {
            k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
            for k, v in path_or_state_dict.items()
        }
    else:
        sd = read_state_dict(path_or_state_dict)
    report = ConversionReport(backbone=backbone or detectron2_backbone_name(sd))
    out, backbone_sd = {}, {}
    for k, v in sd.items():
        if k in DETECTRON2_IGNORED:
            report.ignored.append(k)
        elif k.startswith("backbone."):
            backbone_sd[k.removeprefix("backbone.")] = v
        else:  # (checkpoints older than the official v2 call query_feat "static_query")
            new = rename_key(
                k.replace("predictor.static_query", "predictor.query_feat"),
                DETECTRON2_HEAD,
                reverse=True,
            )
            report.unexpected += [k] if new is None else []
            out.update({new: v} if new is not None else {})
    out |= {
        f"backbone.{k}": v
        for k, v in detectron2_backbone_to_timm(backbone_sd, report.backbone).items()
    }
    return out, report


def to_detectron2(state_dict: dict[str, Tensor], *, backbone: str) -> dict[str, Tensor]:
    """This package's state dict → the official names (the exact inverse of ``convert_detectron2``)."""
    out = {}
    for k, v in state_dict.items():
        if not k.startswith("backbone."):
            new = rename_key(k, DETECTRON2_HEAD)
            if new is None:
                raise ConversionError(f"to_detectron2: no official name for {k!r}")
            out[new] = v
    backbone_sd = {
        k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")
    }
    return out | {
        f"backbone.{k}": v for k, v in timm_to_detectron2_backbone(backbone_sd, backbone).items()
    }


def load_official(
    model: Mask2Former, path: str | os.PathLike, *, backbone: str | None = None
) -> ConversionReport:
    """Load an official checkpoint into ``model``; ``ConversionError`` lists every key that does not fit."""
    sd, report = convert_detectron2(path, backbone=backbone)
    report = check_state_dict(model, sd, report)
    if not report.ok:
        raise ConversionError(f"{path} does not fit the model:\n{report}")
    model.load_state_dict(sd)
    return report


def model_fields(sd: dict[str, Tensor], backbone: str) -> dict[str, Any]:
    """The ``cfg.model`` fields that a state dict (our names) implies through its keys and shapes."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    return {
        "model.backbone": backbone,
        "model.num_classes": sd["transformer_decoder.class_embed.weight"].shape[0] - 1,
        "model.num_queries": sd["transformer_decoder.query_feat.weight"].shape[0],
        "model.hidden_dim": sd["transformer_decoder.query_feat.weight"].shape[1],
        "model.dim_feedforward": sd["transformer_decoder.layers.0.ffn.linear1.weight"].shape[0],
        "model.dec_layers": count("transformer_decoder.layers."),
        "model.conv_dim": sd["pixel_decoder.level_embed"].shape[1],
        "model.mask_dim": sd["pixel_decoder.mask_features.weight"].shape[0],
        "model.enc_layers": count("pixel_decoder.encoder."),
        "model.enc_dim_feedforward": sd["pixel_decoder.encoder.0.linear1.weight"].shape[0],
        # sampling offsets: heads × 3 levels × 4 points × (x, y) rows; the official code fixes 4 points
        "model.enc_nheads": sd["pixel_decoder.encoder.0.self_attn.sampling_offsets.weight"].shape[0]
        // 24,
    }
