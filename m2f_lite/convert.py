"""Load weights made elsewhere: the official detectron2 checkpoints and HF transformers' Mask2Former.

* ``convert_detectron2(path_or_state_dict)`` renames an official checkpoint (a model-zoo ``.pkl``,
  read by ``convert_backbone.read_state_dict``'s restricted unpickler that admits only numpy arrays
  and plain containers, or a detectron2 ``.pth``, read with ``weights_only=True``) into this
  package's names; ``to_detectron2`` is its exact inverse; ``load_official(model, path)`` loads.
* ``from_transformers(hf_model)`` builds an ``m2f_lite`` model with the configuration and weights
  of a ``Mask2FormerForUniversalSegmentation`` (``m2f_lite.convert_transformers``).
* ``convert_main(src, dst)`` does either and writes ``{"model": state_dict, "config": cfg.to_dict()}``.

The head's names map one to one to the official ones (``DETECTRON2_HEAD`` below); the
backbone's go through ``m2f_lite.convert_backbone``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m2f_lite.checkpoint import atomic_save
from m2f_lite.config import PRESETS, Config, get_config
from m2f_lite.modeling.mask2former import Mask2Former, build_model


class ConversionError(ValueError):
    """Weights that do not fit the model: the message lists the keys."""


@dataclasses.dataclass
class ConversionReport:
    """What a conversion or a load found, key by key (``shape_mismatch``: key, model, weights)."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # dropped on purpose
    backbone: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        lines = [
            f"{len(keys)} {name} key(s): {', '.join(keys[:20])}" + (" ..." * (len(keys) > 20))
            for name, keys in (("missing", self.missing), ("unexpected", self.unexpected))
            if keys
        ]
        lines += [
            f"shape mismatch at {k}: model {a}, weights {b}" for k, a, b in self.shape_mismatch[:20]
        ]
        lines += [f"ignored: {', '.join(self.ignored)}"] if self.ignored else []
        return "\n".join(lines) or "all keys match"


# ---------------------------------------------------------------------------------------------
# Key tables: (ours, theirs). A template has an index {i} (or {i+1}: the same index written one
# higher) and a tail {rest}; a key converts by the first row that matches, in either direction.
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


@functools.cache
def _compile(template: str) -> tuple[re.Pattern, int]:
    """Template → (regex with groups ``i`` and ``rest``, the index offset written in it)."""
    pattern = (
        re.escape(template).replace(r"\{i\+1\}", r"(?P<i>\d+)").replace(r"\{i\}", r"(?P<i>\d+)")
    )
    return re.compile(pattern.replace(r"\{rest\}", r"(?P<rest>.+)")), int("{i+1}" in template)


def rename_key(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """Convert one key by the first matching row (ours → theirs, or theirs → ours); None if none."""
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        regex, offset = _compile(src)
        m = regex.fullmatch(key)
        if m is not None:
            groups = m.groupdict()
            if "i" in groups:
                i = int(groups["i"]) - offset
                dst = dst.replace("{i+1}", str(i + 1)).replace("{i}", str(i))
            return dst.replace("{rest}", groups.get("rest") or "")
    return None


def check_state_dict(
    model: nn.Module, sd: dict[str, Tensor], report: ConversionReport | None = None
) -> ConversionReport:
    """Compare weights with a model's state dict: missing, unexpected and shape-mismatched keys."""
    report = report or ConversionReport()
    own = model.state_dict()
    report.missing += [k for k in own if k not in sd]
    report.unexpected += [k for k in sd if k not in own]
    report.shape_mismatch += [
        (k, tuple(own[k].shape), tuple(v.shape))
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    return report


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
    from m2f_lite.convert_backbone import detectron2_backbone_to_timm, read_state_dict

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
    from m2f_lite.convert_backbone import timm_to_detectron2_backbone

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


def from_transformers(hf_model: nn.Module, *, cfg: Config | None = None) -> Mask2Former:
    """HF's ``Mask2FormerForUniversalSegmentation`` → an m2f_lite model with its configuration and
    weights (see ``m2f_lite.convert_transformers.from_transformers``)."""
    from m2f_lite.convert_transformers import from_transformers as convert

    return convert(hf_model, cfg=cfg)


# ---------------------------------------------------------------------------------------------
# The `m2f-lite convert` command
# ---------------------------------------------------------------------------------------------


def _config_for(fields: dict[str, Any], preset: str | None, src: str) -> Config:
    """The preset whose model fields are ``fields``: ``preset`` (checked), or the only such preset."""

    def differences(name: str) -> list[str]:
        m = get_config(name).model
        return [
            f"{k}: weights {v!r}, preset {getattr(m, k[6:])!r}"
            for k, v in fields.items()
            if getattr(m, k[6:]) != v
        ]

    # Official and HF weights are fine-tuned with detectron2's FrozenBN: their BatchNorms carry
    # fixed statistics and no step counter, whatever norm the preset trains from scratch with.
    frozen = {"model.backbone_norm": "frozen_bn"}
    if preset is not None:
        if wrong := differences(preset):
            raise ConversionError(f"{src} does not fit preset {preset!r}:\n  " + "\n  ".join(wrong))
        return get_config(preset, frozen)
    matches = [name for name in PRESETS if not differences(name)]
    if len(matches) != 1:
        found = ", ".join(
            f"{k}={fields[k]}" for k in ("model.backbone", "model.num_classes", "model.num_queries")
        )
        hint = f"one of {', '.join(matches)}" if matches else "no preset has these model fields"
        raise ConversionError(
            f"{src}: cannot tell the preset from the weights ({found}); pass --preset ({hint})"
        )
    return get_config(matches[0], frozen)


def convert_main(
    src: str, dst: str, *, source: str = "auto", preset: str | None = None
) -> ConversionReport:
    """Convert ``src`` (an official ``.pkl``/``.pth``, or a local HF model folder) into an m2f_lite checkpoint.

    Writes ``{"model": state_dict, "config": cfg.to_dict()}`` to ``dst`` atomically. ``source``:
    ``"detectron2"``, ``"transformers"`` or ``"auto"`` (a folder = transformers). The config is
    ``preset``, or when none is given the one preset whose model fields the weights imply; a
    preset that disagrees with the weights is an error naming the fields.
    """
    if source == "auto":
        source = "transformers" if Path(src).is_dir() else "detectron2"
    if source == "detectron2":
        backbone = get_config(preset).model.backbone if preset else None
        sd, report = convert_detectron2(src, backbone=backbone)
        cfg = _config_for(model_fields(sd, report.backbone), preset, src)
        if not check_state_dict(build_model(cfg), sd, report).ok:
            raise ConversionError(f"{src} does not fit the {cfg.name} model:\n{report}")
    elif source == "transformers":
        from transformers import Mask2FormerForUniversalSegmentation

        if not Path(src).is_dir():
            raise FileNotFoundError(
                f"{src}: expected a local HF model folder (config.json and weights)"
            )
        from m2f_lite.convert_backbone import backbone_name_from_hf_config
        from m2f_lite.convert_transformers import transformers_model_fields

        hf = Mask2FormerForUniversalSegmentation.from_pretrained(src, local_files_only=True)
        name, arch = backbone_name_from_hf_config(hf.config.backbone_config)
        if arch:
            raise ConversionError(
                f"{src}: the HF backbone is a {name} changed by {arch}; no preset has it"
            )
        cfg = _config_for(transformers_model_fields(hf.config), preset, src)
        sd = from_transformers(hf, cfg=cfg).state_dict()
        report = ConversionReport(backbone=name)
    else:
        raise ValueError(f"source={source!r}: expected 'auto', 'detectron2' or 'transformers'")
    atomic_save({"model": sd, "config": cfg.to_dict()}, dst)  # temporary file, fsync, rename
    return report
