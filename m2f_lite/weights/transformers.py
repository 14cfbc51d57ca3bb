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
from m2f_lite.modeling.backbone import backbone_family, build_backbone
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


# ---------------------------------------------------------------------------------------------
# m2f_lite  ->  HF transformers
# ---------------------------------------------------------------------------------------------

_STAGES = ["stage1", "stage2", "stage3", "stage4"]
# in HF's state dict but not in ours: recomputed buffers, HF Swin's unused final norm (left at
# HF's initialisation), BatchNorm's update counter (FrozenBN has none)
_HF_ONLY = re.compile(
    r"criterion\.empty_weight|.*num_batches_tracked|"
    + re.escape(HF_BACKBONE_PREFIX)
    + r"swin\.layernorm\.(weight|bias)"
)


class NotRepresentableError(ValueError):
    """An m2f_lite model that HF's ``Mask2FormerForUniversalSegmentation`` cannot hold (one line)."""


def _unsupported(what: str) -> NotRepresentableError:
    return NotRepresentableError(f"to_transformers: {what}; HF's Mask2Former cannot represent it")


def _hf_backbone_config(backbone: nn.Module) -> Any:
    """HF's ``ResNetConfig`` / ``SwinConfig`` of our backbone, as ``backbone_name_from_hf_config``
    reads it back (HF's ResNet is torchvision style, stride in the 3×3 conv, as timm's)."""
    from transformers import ResNetConfig, SwinConfig

    arch = backbone.arch
    if backbone.family == "resnet":
        stem = arch.get("stem_width", 64)
        if stem != 64:  # HF's embedding_size could hold it; our reader maps 64 only (timm's)
            raise NotRepresentableError(
                f"to_transformers: backbone {backbone.name} has a {stem}-wide stem; HF ResNets "
                "are read back (from_transformers) with timm's 64-wide stem only"
            )
        expansion = backbone.channels[-1] // arch["channels"][-1]  # 4: bottleneck, 1: basic
        return ResNetConfig(
            embedding_size=64,
            depths=list(arch["layers"]),
            hidden_sizes=[c * expansion for c in arch["channels"]],
            layer_type="bottleneck" if expansion == 4 else "basic",
            out_features=_STAGES,
        )
    return SwinConfig(
        embed_dim=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]),
        window_size=arch["window_size"],
        mlp_ratio=arch["mlp_ratio"],
        drop_path_rate=0.0,  # a training setting; eval mode ignores it
        out_features=_STAGES,
    )


def transformers_config(model: Mask2Former) -> Any:
    """HF's ``Mask2FormerConfig`` of ``model``, read from its modules (the inverse of
    :func:`transformers_model_fields`). Raises :class:`NotRepresentableError` for what HF fixes
    otherwise: one head count for the encoder and the decoder, 4 sampling points, 3 encoder
    levels of strides 8..32, GroupNorm(32), masked attention, a ResNet stem 64 wide."""
    from transformers import Mask2FormerConfig

    pd, td = model.pixel_decoder, model.transformer_decoder
    if not len(pd.encoder) or not len(td.layers):
        raise _unsupported(f"{len(pd.encoder)} encoder, {len(td.layers)} decoder layers")
    attn = pd.encoder[0].self_attn  # MSDeformAttn
    checks = [
        (attn.n_heads != td.num_heads, f"{attn.n_heads} encoder heads, {td.num_heads} decoder"),
        (attn.n_points != 4, f"{attn.n_points} sampling points (HF: 4)"),
        (pd.num_encoder_levels != 3, f"{pd.num_encoder_levels} encoder levels (HF: 3)"),
        (pd.strides != [4, 8, 16, 32], f"backbone strides {pd.strides}"),
        (pd.input_proj[0][1].num_groups != 32, "GroupNorm groups other than 32"),
        (not td.masked_attention, "masked_attention=False"),
    ]
    for failed, what in checks:
        if failed:
            raise _unsupported(what)
    num_fpn = len(pd.lateral_convs)  # FPN steps from stride 8 down to common_stride
    layer = td.layers[0]
    return Mask2FormerConfig(
        backbone_config=_hf_backbone_config(model.backbone),
        num_labels=td.class_embed.out_features - 1,
        num_queries=td.query_feat.num_embeddings,
        hidden_dim=td.query_feat.embedding_dim,
        num_attention_heads=td.num_heads,
        dim_feedforward=layer.ffn.linear1.out_features,
        decoder_layers=len(td.layers) + 1,  # HF counts the prediction from the queries too
        pre_norm=layer.ffn.pre_norm,
        enforce_input_projection=isinstance(td.input_proj[0], nn.Conv2d),
        feature_size=pd.conv_dim,
        mask_feature_size=pd.mask_dim,
        encoder_layers=len(pd.encoder),
        encoder_feedforward_dim=pd.encoder[0].linear1.out_features,
        common_stride=pd.strides[-pd.num_encoder_levels] // 2**num_fpn,
        dropout=0.0,
    )


def timm_backbone_to_hf(state_dict: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Our ``Backbone.state_dict()`` → HF ``ResNetBackbone`` / ``SwinBackbone`` keys (without
    ``model.pixel_level_module.encoder.``): the inverse of ``hf_backbone_to_timm``; Swin's
    packed ``qkv`` is split into HF's ``q_proj``, ``k_proj``, ``v_proj`` (rows q, k, v)."""
    from m2f_lite.weights import backbone as bb

    if backbone_family(name) == "resnet":
        drop = [bb._NUM_BATCHES]
        return bb._rename(state_dict, bb._RESNET_HF, to_ours=False, drop=drop, source=name)
    hf = bb._rename(state_dict, bb._SWIN_HF, to_ours=False, drop=bb._SWIN_BUFFERS, source=name)
    for key in [k for k in hf if ".attention.qkv." in k]:
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), hf.pop(key).chunk(3, dim=0)):
            hf[key.replace("qkv", proj)] = part.clone()  # [C, C] or [C] each
    return hf


def transformers_head_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our pixel-decoder and transformer-decoder weights → HF's (the inverse of
    :func:`transformers_head_to_ours`): the packed self-attention ``in_proj`` → ``q/k/v_proj``."""
    out, packed = (
        {},
        re.compile(r"transformer_decoder\.layers\.(\d+)\.self_attn\.attn\.in_proj_(\w+)"),
    )
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            continue
        if m := packed.fullmatch(k):  # [3C, C] / [3C] -> 3 × [C, C] / [C]
            for proj, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{_HL.format(i=m[1])}self_attn.{proj}_proj.{m[2]}"] = part.clone()
        elif (new := rename_key(k, TRANSFORMERS_HEAD)) is not None:
            out[new] = v
        else:
            raise ConversionError(f"to_transformers: {k} has no HF name")
    return out


def to_transformers(model: Mask2Former) -> nn.Module:
    """HF's ``Mask2FormerForUniversalSegmentation`` with the configuration and weights of ``model``
    (eval mode), the inverse of :func:`from_transformers`: ``from_transformers(to_transformers(m))``
    has ``m``'s state dict. ``save_pretrained(folder)`` then writes HF's layout (``config.json``,
    ``model.safetensors``). HF takes normalised pixels: feed it ``(x - mean) / std``, as the
    module docstring says. Training-only state is not carried: BatchNorm's update counters
    (``num_batches_tracked``; HF's ResNet then reads back as FrozenBN, same statistics) and drop
    path (HF's Swin gets 0). Raises :class:`NotRepresentableError` (see
    :func:`transformers_config`) for a model HF cannot hold.
    """
    from transformers import Mask2FormerForUniversalSegmentation

    hf = Mask2FormerForUniversalSegmentation(transformers_config(model)).eval()
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    backbone = {
        k.removeprefix("backbone."): v for k, v in ours.items() if k.startswith("backbone.")
    }
    sd = transformers_head_to_hf(ours)
    sd |= {
        HF_BACKBONE_PREFIX + k: v
        for k, v in timm_backbone_to_hf(backbone, model.backbone.name).items()
    }
    own = hf.state_dict()
    missing = [k for k in own if k not in sd and not _HF_ONLY.fullmatch(k)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or mismatched:
        report = ConversionReport(missing=missing, unexpected=unexpected + mismatched)
        raise ConversionError(f"to_transformers: the weights do not fit HF's model: {report}")
    hf.load_state_dict(sd, strict=False)  # the _HF_ONLY keys keep HF's values
    return hf


def to_transformers_main(checkpoint: str, out_dir: str) -> str:
    """``m2f-lite convert CHECKPOINT --to transformers DIR``: write HF's ``save_pretrained`` layout
    of an m2f_lite checkpoint into ``out_dir``; returns the line to print."""
    from pathlib import Path

    from m2f_lite import checkpoint as ckpt

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; give a new folder")
    state = ckpt.load_checkpoint(checkpoint)
    model = build_model(ckpt.checkpoint_config(state, checkpoint))
    ckpt.load_model_state(
        model, {k: v.float() for k, v in state["model"].items()}, source=checkpoint
    )
    hf = to_transformers(model)
    try:
        hf.save_pretrained(out)
    except OSError as e:
        raise ValueError(f"{out}: cannot write ({e.strerror or e})") from e
    return (
        f"wrote {out} (HF Mask2FormerForUniversalSegmentation, {model.backbone.name}): "
        f"Mask2FormerForUniversalSegmentation.from_pretrained({str(out)!r})"
    )
