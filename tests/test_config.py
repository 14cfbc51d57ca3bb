"""Config: every preset builds, overrides are typed and checked, and the official values hold.

The official values below were read from facebookresearch/Mask2Former ``configs/`` (and detectron2's
defaults where a YAML leaves a key out); each assert names the YAML it checks.
"""

from __future__ import annotations

import re

import pytest

from m2f_lite.config import (
    PRESETS,
    Config,
    apply_overrides,
    config_diff,
    config_from_dict,
    get_config,
)
from m2f_lite.data.build import DATASETS
from m2f_lite.modeling.backbone import BACKBONES


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_consistent_config(name):
    cfg = get_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    assert cfg.model.backbone in BACKBONES
    assert cfg.data.dataset in DATASETS
    assert cfg.solver.lr_scheduler in ("step", "poly")
    assert all(s <= cfg.solver.max_iter for s in cfg.solver.steps)
    assert any((cfg.inference.semantic_on, cfg.inference.instance_on, cfg.inference.panoptic_on))
    assert config_from_dict(cfg.to_dict()) == cfg  # what checkpoints store round-trips


def test_coco_panoptic_r50_is_the_official_recipe():
    # configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml (+ Base-COCO-...)
    cfg = get_config("coco_panoptic_r50")
    assert (cfg.model.num_classes, cfg.model.num_queries, cfg.model.dec_layers) == (133, 100, 9)
    assert (cfg.solver.ims_per_batch, cfg.solver.base_lr, cfg.solver.weight_decay) == (
        16,
        1e-4,
        0.05,
    )
    assert (cfg.solver.max_iter, cfg.solver.steps, cfg.solver.lr_scheduler) == (
        368750,
        (327778, 355092),
        "step",
    )
    assert (cfg.solver.warmup_iters, cfg.solver.warmup_factor, cfg.solver.clip_value) == (
        10,
        1.0,
        0.01,
    )
    assert cfg.solver.backbone_multiplier == 0.1
    assert (cfg.data.mapper, cfg.data.image_size, cfg.data.min_scale, cfg.data.max_scale) == (
        "lsj",
        1024,
        0.1,
        2.0,
    )
    assert (cfg.data.min_size_test, cfg.data.max_size_test) == (800, 1333)  # detectron2 defaults
    assert (cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight) == (2.0, 5.0, 5.0)
    assert (cfg.loss.num_points, cfg.loss.oversample_ratio, cfg.loss.importance_sample_ratio) == (
        12544,
        3.0,
        0.75,
    )
    inf = cfg.inference
    assert (inf.semantic_on, inf.instance_on, inf.panoptic_on) == (True, True, True)
    assert (inf.object_mask_threshold, inf.overlap_threshold, inf.topk_per_image) == (0.8, 0.8, 100)


def test_swin_l_recipes():
    # coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml
    cfg = get_config("coco_panoptic_swin_l")
    assert (cfg.model.backbone, cfg.model.drop_path_rate, cfg.model.num_queries) == (
        "swin_large_384",
        0.3,
        200,
    )
    assert (cfg.solver.max_iter, cfg.solver.steps) == (737500, (655556, 710184))
    assert get_config("coco_instance_swin_l").model.num_queries == 200
    # ADE20K semantic Swin-L: 100 queries, the res640 recipe
    ade = get_config("ade20k_semantic_swin_l")
    assert (
        ade.model.num_queries,
        ade.data.crop_size,
        ade.data.min_size_test,
        ade.data.max_size_test,
    ) == (100, (640, 640), 640, 2560)
    assert ade.data.min_size_train == tuple(int(x * 0.1 * 640) for x in range(5, 21))
    assert get_config("ade20k_panoptic_swin_l").model.num_queries == 200
    # Cityscapes Swin-L: 200 queries for instance and panoptic, 100 for semantic
    assert get_config("cityscapes_semantic_swin_l").model.num_queries == 100
    assert get_config("cityscapes_instance_swin_l").model.num_queries == 200
    assert get_config("cityscapes_panoptic_swin_l").model.num_queries == 200
    assert get_config("coco_panoptic_swin_b").model.backbone == "swin_base_384"  # window 12, 384


def test_ade20k_semantic_and_cityscapes_recipes():
    # ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml (+ Base-ADE20K-...)
    ade = get_config("ade20k_semantic_r50")
    assert (
        ade.solver.lr_scheduler,
        ade.solver.max_iter,
        ade.solver.warmup_iters,
        ade.solver.poly_power,
    ) == ("poly", 160000, 0, 0.9)
    assert (
        ade.data.mapper,
        ade.data.crop_size,
        ade.data.max_size_train,
        ade.data.mapper_size_divisibility,
    ) == ("semantic", (512, 512), 2048, 512)
    assert ade.data.min_size_train == tuple(
        int(x * 0.1 * 512) for x in range(5, 21)
    )  # the official YAML's expression
    assert (ade.data.min_size_test, ade.data.max_size_test, ade.data.color_aug) == (512, 2048, True)
    assert (ade.model.num_classes, ade.inference.instance_on, ade.inference.panoptic_on) == (
        150,
        False,
        False,
    )
    assert get_config("ade20k_semantic_r101").solver.max_iter == 90000  # maskformer2_R101_bs16_90k
    assert get_config("ade20k_semantic_swin_t").data.crop_size == (512, 512)
    # cityscapes/*/Base-Cityscapes-*.yaml
    for task, classes in (("semantic", 19), ("instance", 8), ("panoptic", 19)):
        cs = get_config(f"cityscapes_{task}_r50")
        assert (cs.model.num_classes, cs.solver.max_iter, cs.solver.lr_scheduler) == (
            classes,
            90000,
            "poly",
        )
        assert (
            cs.data.crop_size,
            cs.data.min_size_test,
            cs.data.max_size_test,
            cs.data.max_size_train,
        ) == ((512, 1024), 1024, 2048, 4096)
        assert cs.data.min_size_train[0] == 512 and cs.data.min_size_train[-1] == 2048
    assert get_config("ade20k_panoptic_r50").data.crop_size == (640, 640)  # even with R50


def test_overrides_typed_both_spellings():
    cfg = get_config(
        "shapes_tiny",
        ["--model.num_queries=5", "solver.base_lr=1e-3", "loss.deep_supervision=false"],
    )
    assert cfg.model.num_queries == 5 and isinstance(cfg.model.num_queries, int)
    assert cfg.solver.base_lr == 1e-3 and cfg.loss.deep_supervision is False
    cfg = apply_overrides(
        cfg, {"solver.steps": "[10, 20]", "data.crop_size": [32, 48], "solver.max_iter": 7}
    )
    assert (
        cfg.solver.steps == (10, 20) and cfg.data.crop_size == (32, 48) and cfg.solver.max_iter == 7
    )
    assert get_config("shapes_tiny").model.num_queries != 5  # presets are not mutated


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("nope.x=1", "has no field 'nope'"),
        ("model=1", "is a section"),
        ("model.num_queries=ten", "expected int"),
        ("loss.point_loss=maybe", "expected a boolean"),
        ("solver.steps=[1,x]", "expected a list"),
        ("model.num_queries", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_config("shapes_tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*shapes_tiny"):
        get_config("nope")


def test_config_diff_lists_changed_fields():
    a = get_config("shapes_tiny")
    b = get_config("shapes_tiny", ["model.num_queries=7", "seed=3"])
    assert config_diff(a, b) == [f"model.num_queries: {a.model.num_queries!r} -> 7", "seed: 0 -> 3"]
    assert config_diff(a, a) == []
