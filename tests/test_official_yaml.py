"""Every preset against its official YAML, read by detectron2 itself (``_BASE_`` inheritance done).

``tests/golden/official_yaml.json`` is written by ``tests/golden/make_golden.py`` from the
official Mask2Former configs (detectron2's ``get_cfg`` + ``add_maskformer2_config`` +
``merge_from_file``): the values, not a copy of ``presets.py``. Each official key below names the
m2f_lite field it sets; keys that only apply to some recipes (the LSJ scales, the crop, the
learning-rate schedule's own keys) are compared where the recipe uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2f_lite.config import get_config
from m2f_lite.modeling.backbone import BACKBONES
from m2f_lite.presets import PRESETS
from m2f_lite.weights.model_zoo import ZOO

OFFICIAL = json.loads((Path(__file__).parent / "golden" / "official_yaml.json").read_text())
MAPPERS = {  # INPUT.DATASET_MAPPER_NAME -> data.mapper
    "coco_panoptic_lsj": "lsj",
    "coco_instance_lsj": "lsj",
    "mask_former_semantic": "semantic",
    "mask_former_panoptic": "semantic",  # the same augmentations (m2f_lite.config)
    "mask_former_instance": "semantic",
}
NORMS = {"FrozenBN": "frozen_bn", "SyncBN": "syncbn"}
SCHEDULERS = {"WarmupPolyLR": "poly", "WarmupMultiStepLR": "step"}
SWIN_ARCH = {  # MODEL.SWIN.* -> the arch of m2f_lite.modeling.backbone.BACKBONES
    "EMBED_DIM": "embed_dim",
    "DEPTHS": "depths",
    "NUM_HEADS": "num_heads",
    "WINDOW_SIZE": "window_size",
}


def expected_fields(v: dict) -> dict:
    """The m2f_lite fields (dotted) the official values ``v`` (key -> value) imply."""
    mf, head = "MODEL.MASK_FORMER.", "MODEL.SEM_SEG_HEAD."
    out = {
        "model.freeze_at": v["MODEL.BACKBONE.FREEZE_AT"],
        "model.pixel_mean": tuple(v["MODEL.PIXEL_MEAN"]),
        "model.pixel_std": tuple(v["MODEL.PIXEL_STD"]),
        "model.num_classes": v[head + "NUM_CLASSES"],
        "model.conv_dim": v[head + "CONVS_DIM"],
        "model.mask_dim": v[head + "MASK_DIM"],
        "model.enc_layers": v[head + "TRANSFORMER_ENC_LAYERS"],
        "model.common_stride": v[head + "COMMON_STRIDE"],
        "data.ignore_label": v[head + "IGNORE_VALUE"],
        "model.num_queries": v[mf + "NUM_OBJECT_QUERIES"],
        "model.hidden_dim": v[mf + "HIDDEN_DIM"],
        "model.nheads": v[mf + "NHEADS"],
        "model.enc_nheads": v[mf + "NHEADS"],  # the official pixel decoder reads NHEADS
        "model.dim_feedforward": v[mf + "DIM_FEEDFORWARD"],
        "model.dec_layers": v[mf + "DEC_LAYERS"] - 1,  # DEC_LAYERS counts the queries' prediction
        "model.pre_norm": v[mf + "PRE_NORM"],
        "model.enforce_input_proj": v[mf + "ENFORCE_INPUT_PROJ"],
        "model.size_divisibility": v[mf + "SIZE_DIVISIBILITY"],
        "loss.class_weight": v[mf + "CLASS_WEIGHT"],
        "loss.mask_weight": v[mf + "MASK_WEIGHT"],
        "loss.dice_weight": v[mf + "DICE_WEIGHT"],
        "loss.no_object_weight": v[mf + "NO_OBJECT_WEIGHT"],
        "loss.num_points": v[mf + "TRAIN_NUM_POINTS"],
        "loss.oversample_ratio": v[mf + "OVERSAMPLE_RATIO"],
        "loss.importance_sample_ratio": v[mf + "IMPORTANCE_SAMPLE_RATIO"],
        "loss.deep_supervision": v[mf + "DEEP_SUPERVISION"],
        "inference.semantic_on": v[mf + "TEST.SEMANTIC_ON"],
        "inference.instance_on": v[mf + "TEST.INSTANCE_ON"],
        "inference.panoptic_on": v[mf + "TEST.PANOPTIC_ON"],
        "inference.object_mask_threshold": v[mf + "TEST.OBJECT_MASK_THRESHOLD"],
        "inference.overlap_threshold": v[mf + "TEST.OVERLAP_THRESHOLD"],
        "inference.sem_seg_postprocessing_before_inference": v[
            mf + "TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"
        ],
        "inference.topk_per_image": v["TEST.DETECTIONS_PER_IMAGE"],
        "inference.amp": "off",  # detectron2 evaluates in fp32
        "data.mapper": MAPPERS[v["INPUT.DATASET_MAPPER_NAME"]],
        "data.min_size_test": v["INPUT.MIN_SIZE_TEST"],
        "data.max_size_test": v["INPUT.MAX_SIZE_TEST"],
        "data.filter_empty": v["DATALOADER.FILTER_EMPTY_ANNOTATIONS"],
        "solver.ims_per_batch": v["SOLVER.IMS_PER_BATCH"],
        "solver.base_lr": v["SOLVER.BASE_LR"],
        "solver.weight_decay": v["SOLVER.WEIGHT_DECAY"],
        "solver.weight_decay_norm": v["SOLVER.WEIGHT_DECAY_NORM"],
        "solver.weight_decay_embed": v["SOLVER.WEIGHT_DECAY_EMBED"],
        "solver.backbone_multiplier": v["SOLVER.BACKBONE_MULTIPLIER"],
        "solver.max_iter": v["SOLVER.MAX_ITER"],
        "solver.lr_scheduler": SCHEDULERS[v["SOLVER.LR_SCHEDULER_NAME"]],
        "solver.warmup_iters": v["SOLVER.WARMUP_ITERS"],
        "solver.warmup_factor": v["SOLVER.WARMUP_FACTOR"],
        "solver.amp": "fp16" if v["SOLVER.AMP.ENABLED"] else "off",  # AMP = fp16 + GradScaler
        "solver.checkpoint_period": v["SOLVER.CHECKPOINT_PERIOD"],
        "solver.eval_period": v["TEST.EVAL_PERIOD"],
    }
    if out["solver.lr_scheduler"] == "step":
        out |= {"solver.steps": tuple(v["SOLVER.STEPS"]), "solver.gamma": v["SOLVER.GAMMA"]}
    else:
        out |= {"solver.poly_power": v["SOLVER.POLY_LR_POWER"]}
    assert (
        v["SOLVER.CLIP_GRADIENTS.ENABLED"] and v["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"] == "full_model"
    )
    out["solver.clip_value"] = v["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"]
    if out["data.mapper"] == "lsj":
        out |= {
            "data.image_size": v["INPUT.IMAGE_SIZE"],
            "data.min_scale": v["INPUT.MIN_SCALE"],
            "data.max_scale": v["INPUT.MAX_SCALE"],
        }
    else:
        assert v["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "choice"
        out |= {
            "data.min_size_train": tuple(v["INPUT.MIN_SIZE_TRAIN"]),
            "data.max_size_train": v["INPUT.MAX_SIZE_TRAIN"],
            "data.crop_size": tuple(v["INPUT.CROP.SIZE"]) if v["INPUT.CROP.ENABLED"] else (0, 0),
            "data.single_category_max_area": v["INPUT.CROP.SINGLE_CATEGORY_MAX_AREA"],
            "data.color_aug": v["INPUT.COLOR_AUG_SSD"],
            "data.mapper_size_divisibility": v["INPUT.SIZE_DIVISIBILITY"],
        }
    if v["MODEL.BACKBONE.NAME"] == "build_resnet_backbone":
        out |= {
            "model.backbone": f"resnet{v['MODEL.RESNETS.DEPTH']}",
            "model.backbone_norm": NORMS[v["MODEL.RESNETS.NORM"]],
        }
    else:
        assert v["MODEL.BACKBONE.NAME"] == "D2SwinTransformer"
        out["model.drop_path_rate"] = v["MODEL.SWIN.DROP_PATH_RATE"]
    return out


def test_every_official_preset_has_its_yaml():
    official = sorted(p for p in PRESETS if not p.startswith("shapes_"))
    assert sorted(OFFICIAL) == official


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_preset_equals_its_official_yaml(preset):
    v = OFFICIAL[preset]["values"]
    cfg = get_config(preset)
    wrong = []
    for field, value in expected_fields(v).items():
        section, key = field.split(".")
        ours = getattr(getattr(cfg, section), key)
        if ours != value and not (isinstance(value, float) and ours == pytest.approx(value)):
            wrong.append(f"{field}: preset {ours!r}, official {value!r}")
    if v["MODEL.BACKBONE.NAME"] == "D2SwinTransformer":
        arch = BACKBONES[cfg.model.backbone]["arch"]
        for key, ours_key in SWIN_ARCH.items():
            theirs = v[f"MODEL.SWIN.{key}"]
            theirs = tuple(theirs) if isinstance(theirs, list) else theirs
            if arch[ours_key] != theirs:
                wrong.append(f"MODEL.SWIN.{key}: backbone {arch[ours_key]}, official {theirs}")
    # MODEL.WEIGHTS: the ImageNet backbone the model zoo names for the preset
    assert Path(v["MODEL.WEIGHTS"]).name == ZOO[preset].pretrained, preset
    assert not wrong, f"{preset} ({OFFICIAL[preset]['yaml']}):\n  " + "\n  ".join(wrong)
