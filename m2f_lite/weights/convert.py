"""The ``m2f-lite convert`` command: an official checkpoint or an HF model → an m2f_lite checkpoint.

``convert_main(src, dst)`` verifies the archives it reads (zip CRC-32, as the checkpoint loader),
reads the weights (``m2f_lite.weights.detectron2`` or ``m2f_lite.weights.transformers``), finds the preset whose model fields they imply, checks every
key against that model and writes ``{"model": state_dict, "config": cfg.to_dict()}``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from m2f_lite.checkpoint import atomic_save, verify_file
from m2f_lite.config import PRESETS, Config, get_config
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.weights.backbone import backbone_name_from_hf_config
from m2f_lite.weights.detectron2 import convert_detectron2, model_fields
from m2f_lite.weights.keys import ConversionError, ConversionReport, check_state_dict
from m2f_lite.weights.transformers import from_transformers, transformers_model_fields


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


def _verify_archives(src: str) -> None:
    """Refuse a ``torch.save`` zip archive (an official ``.pth``, an HF ``pytorch_model.bin``)
    whose records do not match their CRC-32: ``torch.load`` would read a flipped byte inside a
    tensor silently. The check is the checkpoint loader's (``checkpoint.verify_file``). Pickles
    and ``.safetensors`` carry no checksum to verify."""
    path = Path(src)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if zipfile.is_zipfile(f):
            verify_file(f)


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
    _verify_archives(src)
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
