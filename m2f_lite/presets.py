"""Presets: the official Mask2Former recipes and the tiny CPU one, as plain dicts.

Each preset is a dict of dotted overrides applied to the defaults of :mod:`m2f_lite.config`, which
are the COCO panoptic R50 recipe (``configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml``
of facebookresearch/Mask2Former). Every value below was checked against the official YAML it
names; ``m2f-lite train --help`` lists the presets.
"""

from __future__ import annotations

from typing import Any

_SWIN = {  # backbone name, MODEL.SWIN.DROP_PATH_RATE
    "swin_t": {"model.backbone": "swin_tiny", "model.drop_path_rate": 0.3},
    "swin_s": {"model.backbone": "swin_small", "model.drop_path_rate": 0.3},
    "swin_b": {"model.backbone": "swin_base_384", "model.drop_path_rate": 0.3},
    "swin_l": {"model.backbone": "swin_large_384", "model.drop_path_rate": 0.3},
}
_R101 = {"model.backbone": "resnet101"}

_COCO_PANOPTIC = {
    "data.dataset": "coco_panoptic",
    "data.root": "data/coco",
    "model.num_classes": 133,
}
_COCO_INSTANCE = {
    "data.dataset": "coco_instance",
    "data.root": "data/coco",
    "model.num_classes": 80,
    "inference.semantic_on": False,
    "inference.panoptic_on": False,
}
_COCO_100EP = {"solver.steps": (655556, 710184), "solver.max_iter": 737500}

_ADE_SEMANTIC = {
    "data.dataset": "ade20k_semantic",
    "data.root": "data/ADEChallengeData2016",
    "data.mapper": "semantic",
    "data.min_size_train": tuple(int(x * 0.1 * 512) for x in range(5, 21)),
    "data.max_size_train": 2048,
    "data.crop_size": (512, 512),
    "data.color_aug": True,
    "data.mapper_size_divisibility": 512,
    "data.min_size_test": 512,
    "data.max_size_test": 2048,
    "model.num_classes": 150,
    "inference.instance_on": False,
    "inference.panoptic_on": False,
    "solver.max_iter": 160000,
    "solver.lr_scheduler": "poly",
    "solver.steps": (),
    "solver.warmup_iters": 0,
}
_ADE_640 = {  # the Swin-B/L res640 recipes
    "data.min_size_train": tuple(int(x * 0.1 * 640) for x in range(5, 21)),
    "data.max_size_train": 2560,
    "data.crop_size": (640, 640),
    "data.mapper_size_divisibility": 640,
    "data.min_size_test": 640,
    "data.max_size_test": 2560,
}

# Cityscapes (Base-Cityscapes-*.yaml) and the ADE20K R101 recipe set MODEL.RESNETS.NORM: "SyncBN":
# trainable BatchNorm, synchronised over the processes (m2f_lite.engine, under DDP); every other
# recipe keeps FrozenBN. The Swin presets inherit the key, as the YAMLs do, and ignore it.
_SYNCBN = {"model.backbone_norm": "syncbn"}
_CITYSCAPES = {
    **_SYNCBN,
    "data.root": "data/cityscapes",
    "data.mapper": "semantic",
    "data.min_size_train": tuple(int(x * 0.1 * 1024) for x in range(5, 21)),
    "data.max_size_train": 4096,
    "data.crop_size": (512, 1024),
    "data.color_aug": True,
    "data.mapper_size_divisibility": -1,
    "data.min_size_test": 1024,
    "data.max_size_test": 2048,
    "solver.max_iter": 90000,
    "solver.lr_scheduler": "poly",
    "solver.steps": (),
    "solver.warmup_iters": 0,
}
_CITYSCAPES_SEMANTIC = {
    **_CITYSCAPES,
    "data.dataset": "cityscapes_semantic",
    "model.num_classes": 19,
    "inference.instance_on": False,
    "inference.panoptic_on": False,
}
_CITYSCAPES_INSTANCE = {
    **_CITYSCAPES,
    "data.dataset": "cityscapes_instance",
    "model.num_classes": 8,
    "inference.semantic_on": False,
    "inference.panoptic_on": False,
}
_CITYSCAPES_PANOPTIC = {
    **_CITYSCAPES,
    "data.dataset": "cityscapes_panoptic",
    "model.num_classes": 19,
}

# ADE20K panoptic (configs/ade20k/panoptic-segmentation): the 640 crop even with R50.
_ADE_PANOPTIC = {
    **_ADE_SEMANTIC,
    **_ADE_640,
    "data.dataset": "ade20k_panoptic",
    "inference.instance_on": True,
    "inference.panoptic_on": True,
}

# The tiny CPU recipe for the synthetic shapes dataset (the book's running example), trained from
# scratch. Measured: `m2f-lite train shapes_tiny` took 9.0 minutes on two CPU cores (dataset made
# first, four evaluations included) and reported PQ 48.3 (things 12.5, stuff 96.0), AP 19.5,
# mIoU 55.6 on the val split; PQ passes 40 by step ~1000; 2500 steps give PQ ~52 in ~11 minutes.
# Unlike the official recipes: a 10× larger lr with a short warmup from 1 %, trainable BatchNorm,
# no backbone lr multiplier and clipping at 1.0 (no pretrained weights to protect), fp32.
_SHAPES_TINY = {
    "data.dataset": "shapes",
    "data.root": "data/shapes",
    "data.mapper": "lsj",
    "data.image_size": 128,
    "data.min_scale": 0.5,
    "data.max_scale": 1.5,
    "data.min_size_test": 128,
    "data.max_size_test": 128,
    "data.num_workers": 0,
    "model.backbone": "resnet18",
    "model.backbone_norm": "bn",  # trained from scratch: no ImageNet weights offline
    "model.num_classes": 7,
    "model.num_queries": 20,
    "model.hidden_dim": 64,
    "model.nheads": 4,
    "model.dim_feedforward": 128,
    "model.dec_layers": 3,
    "model.conv_dim": 64,
    "model.mask_dim": 64,
    "model.enc_layers": 2,
    "model.enc_nheads": 4,
    "model.enc_dim_feedforward": 128,
    "loss.num_points": 1024,
    "solver.ims_per_batch": 8,
    "solver.base_lr": 1e-3,
    "solver.backbone_multiplier": 1.0,
    "solver.max_iter": 2000,
    "solver.lr_scheduler": "poly",
    "solver.steps": (),
    "solver.warmup_iters": 50,
    "solver.warmup_factor": 0.01,
    "solver.amp": "off",
    "solver.clip_value": 1.0,
    "solver.checkpoint_period": 500,
    "solver.eval_period": 500,
    "solver.log_period": 20,
}

# The book's model (m2f_lite/assets/shapes_book.pt, which the chapters load): shapes_tiny on a
# backbone of half the width (3.1x fewer multiply-adds), twice the decoder layers, a narrower scale
# jitter, trained 2.25x longer (0.7 s a step on 2 cores: 55 minutes). `make book-model`
# retrains it with the command recorded in m2f_lite/assets/shapes_book.json, which also holds the
# metrics it scored at the paper's test thresholds (object 0.8, overlap 0.8).
_SHAPES_BOOK = {
    **_SHAPES_TINY,
    "model.backbone": "resnet18_half",
    "model.dec_layers": 6,  # two rounds over the three scales: the classes need the second one
    "data.min_scale": 0.75,  # the val images are at scale 1: little time spent on tiny shapes
    "data.max_scale": 1.25,
    "solver.max_iter": 4500,
    "solver.checkpoint_period": 900,
    "solver.eval_period": 900,
    "solver.log_period": 50,
}

PRESETS: dict[str, dict[str, Any]] = {
    # COCO panoptic (Table 1 / 2 of the paper)
    "coco_panoptic_r50": {**_COCO_PANOPTIC},
    "coco_panoptic_r101": {**_COCO_PANOPTIC, **_R101},
    "coco_panoptic_swin_t": {**_COCO_PANOPTIC, **_SWIN["swin_t"]},
    "coco_panoptic_swin_s": {**_COCO_PANOPTIC, **_SWIN["swin_s"]},
    "coco_panoptic_swin_b": {**_COCO_PANOPTIC, **_SWIN["swin_b"]},
    "coco_panoptic_swin_l": {
        **_COCO_PANOPTIC,
        **_SWIN["swin_l"],
        **_COCO_100EP,
        "model.num_queries": 200,
    },
    # COCO instance
    "coco_instance_r50": {**_COCO_INSTANCE},
    "coco_instance_r101": {**_COCO_INSTANCE, **_R101},
    "coco_instance_swin_t": {**_COCO_INSTANCE, **_SWIN["swin_t"]},
    "coco_instance_swin_s": {**_COCO_INSTANCE, **_SWIN["swin_s"]},
    "coco_instance_swin_b": {**_COCO_INSTANCE, **_SWIN["swin_b"]},
    "coco_instance_swin_l": {
        **_COCO_INSTANCE,
        **_SWIN["swin_l"],
        **_COCO_100EP,
        "model.num_queries": 200,
    },
    # ADE20K semantic
    "ade20k_semantic_r50": {**_ADE_SEMANTIC},
    # maskformer2_R101_bs16_90k.yaml: despite its name it inherits MAX_ITER 160000 from the R50 one
    "ade20k_semantic_r101": {**_ADE_SEMANTIC, **_R101, **_SYNCBN},
    "ade20k_semantic_swin_t": {**_ADE_SEMANTIC, **_SWIN["swin_t"]},
    "ade20k_semantic_swin_s": {**_ADE_SEMANTIC, **_SWIN["swin_s"]},
    "ade20k_semantic_swin_b": {**_ADE_SEMANTIC, **_SWIN["swin_b"], **_ADE_640},
    "ade20k_semantic_swin_l": {**_ADE_SEMANTIC, **_SWIN["swin_l"], **_ADE_640},
    # ADE20K panoptic
    "ade20k_panoptic_r50": {**_ADE_PANOPTIC},
    "ade20k_panoptic_swin_l": {**_ADE_PANOPTIC, **_SWIN["swin_l"], "model.num_queries": 200},
    # Cityscapes: Swin-L uses 200 queries for instance and panoptic, 100 for semantic; the Swin-B
    # recipes are the IN-21k 384 ones (window 12).
    **{
        f"cityscapes_{task}_{arch}": {**base, **extra}
        for task, base in (
            ("semantic", _CITYSCAPES_SEMANTIC),
            ("instance", _CITYSCAPES_INSTANCE),
            ("panoptic", _CITYSCAPES_PANOPTIC),
        )
        for arch, extra in (
            ("r50", {}),
            ("r101", _R101),
            ("swin_t", _SWIN["swin_t"]),
            ("swin_s", _SWIN["swin_s"]),
            ("swin_b", _SWIN["swin_b"]),
            (
                "swin_l",
                {**_SWIN["swin_l"], "model.num_queries": 100 if task == "semantic" else 200},
            ),
        )
    },
    # CPU
    "shapes_tiny": {**_SHAPES_TINY},
    "shapes_book": {**_SHAPES_BOOK},
}
