"""Backbone weight names: HF transformers, detectron2/official and timm, mapped onto our ``Backbone``.

Our keys are ``Backbone.state_dict()``'s: timm's names under ``body.`` (``body.layer1.0.conv1.weight``,
``body.layers.0.blocks.0.attn.qkv.weight``) plus the Swin output norms ``body.norm{i}``. Three
other spellings of the same tensors exist:

- detectron2 / official Mask2Former (without the leading ``backbone.``): ResNet ``stem.conv1``,
  ``stem.conv1.norm``, ``res{2..5}.{b}.conv{1,2,3}[.norm]``, ``res{2..5}.{b}.shortcut[.norm]``;
  Swin the original names, where each stage *ends* with its patch merging (``layers.{i}.downsample``
  is timm's ``layers.{i+1}.downsample``). The merging's channel order is the same in all three
  implementations (``[x(0,0), x(1,0), x(0,1), x(1,1)]``, row offset first), so no permutation.
- HF transformers' ``ResNetBackbone`` / ``SwinBackbone`` (the part of
  ``Mask2FormerForUniversalSegmentation`` under ``model.pixel_level_module.encoder.``), whose Swin
  attention has separate q/k/v projections where timm and the official code have one ``qkv``.

The model-level ``m2f_lite.weights.detectron2`` and ``.transformers`` build on these maps. Values may be numpy arrays (detectron2's
``.pkl`` files store numpy); they come out as tensors.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.swin_transformer import get_relative_position_index
from torch import Tensor

from m2f_lite.modeling.backbone import BACKBONES, Backbone, backbone_family
from m2f_lite.weights.unpickler import read_state_dict, to_tensor

# A name table is a list of (theirs, ours) templates. A field ``{x}`` with a one-letter name is an
# integer (stage, block, ...), ``{x+1}`` says that side spells it one higher; a field with a longer
# name (``{param}``, ``{rest}``) is any text. Each table maps both ways.
Table = list[tuple[str, str]]
_FIELD = re.compile(r"\{([a-z]+)([+-]\d+)?\}")


@functools.cache
def _regex(template: str) -> re.Pattern[str]:
    pattern, start = "", 0
    for f in _FIELD.finditer(template):
        kind = r"\d+" if len(f[1]) == 1 else r".+"
        pattern += re.escape(template[start : f.start()]) + f"(?P<{f[1]}>{kind})"
        start = f.end()
    return re.compile(pattern + re.escape(template[start:]))


def _translate(key: str, source: str, target: str) -> str | None:
    """``key`` spelled by template ``source`` → the same key spelled by ``target`` (None if no match)."""
    match = _regex(source).fullmatch(key)
    if match is None:
        return None
    values: dict[str, Any] = match.groupdict()
    for f in _FIELD.finditer(source):  # undo the source's offsets: integers in our numbering
        if len(f[1]) == 1:
            values[f[1]] = int(values[f[1]]) - int(f[2] or 0)
    return _FIELD.sub(
        lambda f: str(values[f[1]] + int(f[2] or 0)) if len(f[1]) == 1 else values[f[1]], target
    )


def _rename(
    state: Mapping[str, Any], table: Table, *, to_ours: bool, drop: list[str], source: str
) -> dict[str, Tensor]:
    """Rename every key of ``state`` by the first matching row of ``table``; keys matching a
    ``drop`` regex are left out; a key that matches nothing is an error (nothing silently lost)."""
    out, unknown = {}, []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in drop):
            continue
        for theirs, ours in table:
            new = _translate(key, theirs, ours) if to_ours else _translate(key, ours, theirs)
            if new is not None:
                out[new] = to_tensor(value, key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys have no mapping, e.g. {unknown[:8]}")
    return out


# ---------------------------------------------------------------------------------------------
# detectron2 / official names  <->  ours
# ---------------------------------------------------------------------------------------------

_RESNET_D2: Table = [  # detectron2's ResNet: stem, res2..res5 = timm's layer1..layer4
    ("stem.conv1.weight", "body.conv1.weight"),
    ("stem.conv1.norm.{param}", "body.bn1.{param}"),
    ("res{s+1}.{b}.conv{k}.weight", "body.layer{s}.{b}.conv{k}.weight"),
    ("res{s+1}.{b}.conv{k}.norm.{param}", "body.layer{s}.{b}.bn{k}.{param}"),
    ("res{s+1}.{b}.shortcut.weight", "body.layer{s}.{b}.downsample.0.weight"),
    ("res{s+1}.{b}.shortcut.norm.{param}", "body.layer{s}.{b}.downsample.1.{param}"),
]
_SWIN_OFFICIAL: Table = [  # the official Swin: the patch merging ends stage i, timm starts i+1 with it
    ("patch_embed.{rest}", "body.patch_embed.{rest}"),
    ("layers.{i}.blocks.{rest}", "body.layers.{i}.blocks.{rest}"),
    ("layers.{i}.downsample.{rest}", "body.layers.{i+1}.downsample.{rest}"),
    ("norm{i}.{param}", "body.norm{i}.{param}"),
]
_NUM_BATCHES = r".*num_batches_tracked"  # BatchNorm's counter: FrozenBN has none
_SWIN_BUFFERS = [r".*relative_position_index", r".*attn_mask"]  # recomputed, never loaded
_CLASSIFIERS = {"resnet": [r"stem\.fc\..*", r"fc\..*"], "swin": [r"norm\.\w+", r"head\..*"]}


def detectron2_backbone_to_timm(d2_state_dict: Mapping[str, Any], name: str) -> dict[str, Tensor]:
    """Official detectron2 names (no ``backbone.`` prefix) → our ``Backbone.state_dict()`` keys.

    ``name`` is a key of ``BACKBONES`` (only its family matters). ImageNet classifier weights
    (``stem.fc.*`` in detectron2's ``R-50.pkl``, ``head.*`` / ``norm.*`` in Swin checkpoints) and
    Swin's index buffers are dropped.
    """
    if backbone_family(name) == "resnet":
        drop = [_NUM_BATCHES, *_CLASSIFIERS["resnet"]]
        return _rename(
            d2_state_dict, _RESNET_D2, to_ours=True, drop=drop, source="detectron2 ResNet"
        )
    drop = [*_SWIN_BUFFERS, *_CLASSIFIERS["swin"]]
    return _rename(d2_state_dict, _SWIN_OFFICIAL, to_ours=True, drop=drop, source="official Swin")


def timm_to_detectron2_backbone(state_dict: Mapping[str, Any], name: str) -> dict[str, Tensor]:
    """Our ``Backbone.state_dict()`` → official detectron2 names (no ``backbone.`` prefix).

    For Swin the ``relative_position_index`` buffers of the official ``WindowAttention`` are
    added (timm keeps them out of the state dict), so an official model loads the result strictly.
    """
    if backbone_family(name) == "resnet":
        return _rename(
            state_dict, _RESNET_D2, to_ours=False, drop=[_NUM_BATCHES], source="ResNet backbone"
        )
    out = _rename(
        state_dict, _SWIN_OFFICIAL, to_ours=False, drop=_SWIN_BUFFERS, source="Swin backbone"
    )
    for key in [k for k in out if k.endswith(".attn.relative_position_bias_table")]:
        window = (round(out[key].shape[0] ** 0.5) + 1) // 2  # the table has (2M-1)² rows
        out[key.replace("bias_table", "index")] = get_relative_position_index(window, window)
    return out


# ---------------------------------------------------------------------------------------------
# HF transformers  ->  ours
# ---------------------------------------------------------------------------------------------

_RESNET_HF: Table = [  # HF ResNetConvLayer = convolution + normalization; stages 0..3
    ("embedder.embedder.convolution.weight", "body.conv1.weight"),
    ("embedder.embedder.normalization.{param}", "body.bn1.{param}"),
    (
        "encoder.stages.{s}.layers.{b}.shortcut.convolution.weight",
        "body.layer{s+1}.{b}.downsample.0.weight",
    ),
    (
        "encoder.stages.{s}.layers.{b}.shortcut.normalization.{param}",
        "body.layer{s+1}.{b}.downsample.1.{param}",
    ),
    (
        "encoder.stages.{s}.layers.{b}.layer.{k}.convolution.weight",
        "body.layer{s+1}.{b}.conv{k+1}.weight",
    ),
    (
        "encoder.stages.{s}.layers.{b}.layer.{k}.normalization.{param}",
        "body.layer{s+1}.{b}.bn{k+1}.{param}",
    ),
]
_HF_BLOCK, _BLOCK = "swin.encoder.layers.{i}.blocks.{j}", "body.layers.{i}.blocks.{j}"
_SWIN_HF: Table = [
    ("swin.embeddings.patch_embeddings.projection.{param}", "body.patch_embed.proj.{param}"),
    ("swin.embeddings.norm.{param}", "body.patch_embed.norm.{param}"),
    (f"{_HF_BLOCK}.layernorm_before.{{param}}", f"{_BLOCK}.norm1.{{param}}"),
    (f"{_HF_BLOCK}.layernorm_after.{{param}}", f"{_BLOCK}.norm2.{{param}}"),
    (f"{_HF_BLOCK}.attention.qkv.{{param}}", f"{_BLOCK}.attn.qkv.{{param}}"),  # fused below
    (f"{_HF_BLOCK}.attention.o_proj.{{param}}", f"{_BLOCK}.attn.proj.{{param}}"),
    (
        f"{_HF_BLOCK}.attention.relative_position_bias.relative_position_bias_table",
        f"{_BLOCK}.attn.relative_position_bias_table",
    ),
    (f"{_HF_BLOCK}.mlp.{{rest}}", f"{_BLOCK}.mlp.{{rest}}"),
    ("swin.encoder.layers.{i}.downsample.{rest}", "body.layers.{i+1}.downsample.{rest}"),
    ("hidden_states_norms.stage{i+1}.{param}", "body.norm{i}.{param}"),
]
# transformers 4.x spelled the Swin attention differently; rename to the 5.x names first.
_HF4_SWIN_ATTENTION = {
    ".attention.self.query.": ".attention.q_proj.",
    ".attention.self.key.": ".attention.k_proj.",
    ".attention.self.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
    ".attention.self.relative_position_bias_table": ".attention.relative_position_bias.relative_position_bias_table",
}


def _fuse_hf_qkv(state: Mapping[str, Any]) -> dict[str, Any]:
    """HF's separate ``q_proj``, ``k_proj``, ``v_proj`` → one ``qkv`` (rows q, then k, then v), as
    timm's and the official ``WindowAttention`` read it (``qkv.reshape(B, N, 3, heads, d)``)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        for old, new in _HF4_SWIN_ATTENTION.items():
            key = key.replace(old, new)
        out[key] = value
    for key in [k for k in out if ".attention.q_proj." in k]:
        parts = [
            to_tensor(out.pop(key.replace("q_proj", p)), key)
            for p in ("q_proj", "k_proj", "v_proj")
        ]
        out[key.replace("q_proj", "qkv")] = torch.cat(parts, dim=0)  # [3C, C] or [3C]
    return out


def hf_backbone_to_timm(hf_state_dict: Mapping[str, Any], name: str) -> dict[str, Tensor]:
    """HF ``ResNetBackbone`` / ``SwinBackbone`` keys (without ``model.pixel_level_module.encoder.``)
    → our ``Backbone.state_dict()`` keys. HF's ResNet is torchvision style (stride in the 3×3 conv)
    and maps onto timm's one to one; HF Swin's unused final ``swin.layernorm`` is dropped."""
    if backbone_family(name) == "resnet":
        return _rename(
            hf_state_dict, _RESNET_HF, to_ours=True, drop=[_NUM_BATCHES], source="HF ResNetBackbone"
        )
    drop = [r"swin\.layernorm\.\w+", *_SWIN_BUFFERS]
    return _rename(
        _fuse_hf_qkv(hf_state_dict), _SWIN_HF, to_ours=True, drop=drop, source="HF SwinBackbone"
    )


def _require(config: Any, field: str, expected: Any) -> None:
    value = getattr(config, field, expected)
    if value != expected:
        raise ValueError(
            f"HF backbone config: {field}={value!r} is not supported (expected {expected!r})"
        )


def backbone_name_from_hf_config(hf_backbone_config: Any) -> tuple[str, dict[str, Any]]:
    """The ``BACKBONES`` entry and the architecture overrides that rebuild HF's backbone:
    ``build_backbone(name, **overrides)`` then has the same shapes (``overrides`` is empty for
    the official architectures). Unsupported HF options raise a ``ValueError`` naming the field."""
    config = hf_backbone_config
    kind = getattr(config, "model_type", None)
    _require(config, "num_channels", 3)
    stages = list(getattr(config, "out_features", None) or [])
    if stages != ["stage1", "stage2", "stage3", "stage4"]:
        raise ValueError(
            f"HF backbone config: out_features={stages!r}; Mask2Former needs stage1..stage4"
        )
    if kind == "resnet":
        _require(config, "hidden_act", "relu")
        # stride in the 3x3 conv (torchvision style), as detectron2's STRIDE_IN_1X1: False
        _require(config, "downsample_in_bottleneck", False)
        _require(config, "downsample_in_first_stage", False)
        if config.layer_type not in ("basic", "bottleneck"):
            raise ValueError(
                f"HF ResNet config: layer_type={config.layer_type!r}; expected 'basic' or 'bottleneck'"
            )
        _require(config, "embedding_size", 64)  # timm's 7x7 stem is always 64 wide
        expansion = 4 if config.layer_type == "bottleneck" else 1
        arch = {
            "layers": tuple(config.depths),
            "channels": tuple(h // expansion for h in config.hidden_sizes),
        }
        candidates = ["resnet50", "resnet101"] if expansion == 4 else ["resnet18"]
    elif kind == "swin":
        _require(config, "patch_size", 4)
        _require(config, "qkv_bias", True)
        _require(config, "use_absolute_embeddings", False)
        _require(config, "hidden_act", "gelu")
        _require(config, "layer_norm_eps", 1e-5)
        arch = {
            "embed_dim": config.embed_dim,
            "depths": tuple(config.depths),
            "num_heads": tuple(config.num_heads),
            "window_size": config.window_size,
            "mlp_ratio": float(config.mlp_ratio),
        }
        candidates = [n for n, entry in BACKBONES.items() if entry["family"] == "swin"]
    else:
        raise ValueError(f"HF backbone config: model_type={kind!r}; expected 'resnet' or 'swin'")

    def overrides(name: str) -> dict[str, Any]:
        return {k: v for k, v in arch.items() if BACKBONES[name]["arch"][k] != v}

    name = min(candidates, key=lambda n: len(overrides(n)))  # the closest entry; ties: the first
    return name, overrides(name)


def to_backbone_state_dict(state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Recognise the naming of ``state`` and return it with our keys: ours (``body.``), a full
    checkpoint's ``backbone.`` part, detectron2/official, or timm/torchvision classification
    weights (classifier dropped)."""
    if any(k.startswith("backbone.") for k in state):
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    if any(k.startswith("body.") for k in state):
        return dict(state)
    family = backbone_family(name)
    if "stem.conv1.weight" in state or "layers.0.downsample.reduction.weight" in state:
        return detectron2_backbone_to_timm(
            state, name
        )  # detectron2 / official (merging ends stage 0)
    drop = [_NUM_BATCHES, *_SWIN_BUFFERS, *_CLASSIFIERS[family]]
    return _rename(
        state, [("{rest}", "body.{rest}")], to_ours=True, drop=drop, source=f"timm {family}"
    )


def load_pretrained_backbone(backbone: Backbone, path: str) -> None:
    """Load ImageNet (or backbone) weights from the local file ``path`` into ``backbone``, in place.

    Accepted: timm/torchvision state dicts (``.pth``, ``.pt``, ``.bin``, ``.safetensors``), official
    Swin checkpoints (``.pth`` with original key names), ``.pkl`` files (detectron2's ``R-50.pkl``
    of numpy arrays, the official Swin conversion's torch tensors; both read without running code,
    ``m2f_lite.weights.unpickler``) and full Mask2Former checkpoints (the ``backbone.`` part). Classifier weights are ignored; the Swin output norms ``norm0..3`` may be absent (ImageNet
    checkpoints lack them, the official code starts them at identity too). Any other missing,
    unexpected or mis-shaped key raises a ``ValueError`` naming the keys and the file.
    """
    state = to_backbone_state_dict(read_state_dict(path), backbone.name)
    own = backbone.state_dict()
    output_norms = {f"body.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    optional = output_norms if backbone.family == "swin" else set()
    # trainable BatchNorms count their updates; ImageNet and detectron2 files need not carry that
    optional |= {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path}: weights do not fit backbone {backbone.name!r} ({backbone.arch})"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): "
                    + ", ".join(keys[:20])
                    + (" ..." if len(keys) > 20 else "")
                )
        raise ValueError("\n".join(lines))
    backbone.load_state_dict(state, strict=False)
