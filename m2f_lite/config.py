"""Configuration: nested dataclasses, named presets, dotted overrides.

One builder reads a config (``build_model``, ``build_criterion``, the data and engine builders);
modules themselves take plain keyword arguments. The presets reproduce the official Mask2Former
recipes (``configs/`` of facebookresearch/Mask2Former) field by field; the field comments name the
official key each value comes from.

>>> cfg = get_config("coco_panoptic_r50", ["model.num_queries=50"])
>>> cfg.model.num_queries
50
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN, RGB, 0..255
IMAGENET_STD = (58.395, 57.120, 57.375)  # MODEL.PIXEL_STD


@dataclass
class ModelConfig:
    backbone: str = (
        "resnet50"  # a name in modeling.backbone.BACKBONES (resnet50, swin_large_384, ...)
    )
    backbone_norm: str = "frozen_bn"  # ResNet norm: "frozen_bn" (detectron2's FrozenBN) | "bn"
    freeze_at: int = (
        0  # MODEL.BACKBONE.FREEZE_AT: stages frozen (0 = none, 1 = stem, 2 = stem+res2, ...)
    )
    drop_path_rate: float = 0.0  # MODEL.SWIN.DROP_PATH_RATE (0.3 for Swin)
    num_classes: int = (
        133  # MODEL.SEM_SEG_HEAD.NUM_CLASSES (K; the model predicts K+1 with no-object)
    )
    num_queries: int = 100  # MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    hidden_dim: int = 256  # MODEL.MASK_FORMER.HIDDEN_DIM
    nheads: int = 8  # MODEL.MASK_FORMER.NHEADS
    dim_feedforward: int = 2048  # MODEL.MASK_FORMER.DIM_FEEDFORWARD
    dec_layers: int = (
        9  # decoder layers; the official DEC_LAYERS=10 counts the query prediction too
    )
    pre_norm: bool = False  # MODEL.MASK_FORMER.PRE_NORM
    enforce_input_proj: bool = False  # MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ
    masked_attention: bool = True  # False: standard cross-attention (the paper's ablation)
    conv_dim: int = 256  # MODEL.SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # MODEL.SEM_SEG_HEAD.MASK_DIM
    enc_layers: int = 6  # MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    enc_nheads: int = 8  # DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS
    enc_n_points: int = 4  # DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS
    enc_dim_feedforward: int = 1024  # hard-coded in the official MSDeformAttnPixelDecoder
    common_stride: int = 4  # MODEL.SEM_SEG_HEAD.COMMON_STRIDE
    size_divisibility: int = 32  # MODEL.MASK_FORMER.SIZE_DIVISIBILITY
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class LossConfig:
    class_weight: float = 2.0  # MODEL.MASK_FORMER.CLASS_WEIGHT
    mask_weight: float = 5.0  # MODEL.MASK_FORMER.MASK_WEIGHT (sigmoid cross-entropy)
    dice_weight: float = 5.0  # MODEL.MASK_FORMER.DICE_WEIGHT
    no_object_weight: float = 0.1  # MODEL.MASK_FORMER.NO_OBJECT_WEIGHT
    num_points: int = 12544  # MODEL.MASK_FORMER.TRAIN_NUM_POINTS (112 * 112)
    oversample_ratio: float = 3.0  # MODEL.MASK_FORMER.OVERSAMPLE_RATIO
    importance_sample_ratio: float = 0.75  # MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO
    deep_supervision: bool = True  # MODEL.MASK_FORMER.DEEP_SUPERVISION
    point_loss: bool = True  # False: BCE and dice on full masks (the paper's ablation)
    point_matching: bool = True  # False: match on full masks (the paper's ablation)


@dataclass
class InferenceConfig:
    semantic_on: bool = True  # MODEL.MASK_FORMER.TEST.SEMANTIC_ON
    instance_on: bool = True  # MODEL.MASK_FORMER.TEST.INSTANCE_ON
    panoptic_on: bool = True  # MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    object_mask_threshold: float = 0.8  # MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD
    overlap_threshold: float = 0.8  # MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD
    topk_per_image: int = 100  # TEST.DETECTIONS_PER_IMAGE
    sem_seg_postprocessing_before_inference: bool = False


@dataclass
class DataConfig:
    dataset: str = "coco_panoptic"  # coco_panoptic | coco_instance | ade20k_semantic | ade20k_panoptic | cityscapes_{semantic,instance,panoptic} | coco_custom | shapes
    root: str = "data/coco"
    train_split: str = "train"
    val_split: str = "val"
    # INPUT.DATASET_MAPPER_NAME: "lsj" (coco_*_lsj) | "semantic" (mask_former_semantic, and the
    # mask_former_instance/panoptic mappers, whose augmentations are the same: resize the short
    # side, crop, colour, flip) | "none"
    mapper: str = "lsj"
    # LSJ (coco_*_lsj mappers)
    image_size: int = 1024  # INPUT.IMAGE_SIZE
    min_scale: float = 0.1  # INPUT.MIN_SCALE
    max_scale: float = 2.0  # INPUT.MAX_SCALE
    # semantic mapper (ADE20K, Cityscapes)
    min_size_train: tuple[int, ...] = ()  # INPUT.MIN_SIZE_TRAIN, sampled by "choice"
    max_size_train: int = 1333  # INPUT.MAX_SIZE_TRAIN
    crop_size: tuple[int, int] = (0, 0)  # INPUT.CROP.SIZE, (0, 0) = no crop
    single_category_max_area: float = 1.0  # INPUT.CROP.SINGLE_CATEGORY_MAX_AREA
    color_aug: bool = False  # INPUT.COLOR_AUG_SSD
    mapper_size_divisibility: int = -1  # INPUT.SIZE_DIVISIBILITY (padding in the mapper)
    # test-time resize
    min_size_test: int = 800  # INPUT.MIN_SIZE_TEST
    max_size_test: int = 1333  # INPUT.MAX_SIZE_TEST
    ignore_label: int = 255  # MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    filter_empty: bool = True  # DATALOADER.FILTER_EMPTY_ANNOTATIONS
    num_workers: int = 4  # DATALOADER.NUM_WORKERS


@dataclass
class SolverConfig:
    ims_per_batch: int = 16  # SOLVER.IMS_PER_BATCH (global, across processes)
    base_lr: float = 1e-4  # SOLVER.BASE_LR
    weight_decay: float = 0.05  # SOLVER.WEIGHT_DECAY
    weight_decay_norm: float = 0.0  # SOLVER.WEIGHT_DECAY_NORM
    weight_decay_embed: float = 0.0  # SOLVER.WEIGHT_DECAY_EMBED
    backbone_multiplier: float = 0.1  # SOLVER.BACKBONE_MULTIPLIER
    max_iter: int = 368750  # SOLVER.MAX_ITER
    lr_scheduler: str = "step"  # "step" (WarmupMultiStepLR) | "poly" (WarmupPolyLR)
    steps: tuple[int, ...] = (327778, 355092)  # SOLVER.STEPS
    gamma: float = 0.1  # SOLVER.GAMMA
    poly_power: float = 0.9  # SOLVER.POLY_LR_POWER
    warmup_iters: int = 10  # SOLVER.WARMUP_ITERS
    warmup_factor: float = 1.0  # SOLVER.WARMUP_FACTOR
    clip_value: float = 0.01  # SOLVER.CLIP_GRADIENTS.CLIP_VALUE (full model, L2); 0 disables
    # SOLVER.AMP.ENABLED: "bf16" | "fp16" (with GradScaler: the official AMP) | "off". bf16 needs
    # no scaler; the engine falls back to fp16 on GPUs without bf16 and runs fp32 on the CPU.
    amp: str = "bf16"
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpoint_period: int = 5000  # SOLVER.CHECKPOINT_PERIOD
    eval_period: int = 5000  # TEST.EVAL_PERIOD
    log_period: int = 20
    nonfinite_loss: str = "skip"  # "skip" the step or "stop" the run on a NaN/inf loss


@dataclass
class Config:
    name: str = "coco_panoptic_r50"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    seed: int = 0
    device: str = (
        "auto"  # "auto" (cuda:LOCAL_RANK when a GPU is visible, else cpu) | "cpu" | "cuda"
    )
    output_dir: str = "runs/coco_panoptic_r50"
    weights: str = ""  # backbone or full-model weights to start from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Presets: the official recipes. Each is a dict of dotted overrides applied to the defaults above,
# which are the COCO panoptic R50 recipe (configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml).
# ----------------------------------------------------------------------------------------------

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

# Cityscapes (and the ADE20K R101 recipe) set MODEL.RESNETS.NORM: "SyncBN" in the official YAMLs;
# m2f_lite's ResNets offer FrozenBN (the default, as every other recipe) or plain trainable BN
# (model.backbone_norm), not SyncBN: a known difference for those ResNet runs.
_CITYSCAPES = {
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
    "ade20k_semantic_r101": {**_ADE_SEMANTIC, **_R101, "solver.max_iter": 90000},
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
}


def _coerce(value: Any, like: Any, key: str) -> Any:
    """Turn an override (a string from the command line, or a Python value) into the field's type."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"override {key}={value!r}: expected a boolean (true/false)")
    if isinstance(like, tuple):
        if isinstance(value, str):
            text = value.strip()
            if text in ("", "()", "[]"):
                return ()
            try:
                value = json.loads(text if text.startswith("[") else f"[{text.strip('()')}]")
            except json.JSONDecodeError as e:
                raise ValueError(f"override {key}={value!r}: expected a list like [1,2,3]") from e
        inner = like[0] if like else (value[0] if value else 0)
        return tuple(_coerce(v, inner, key) for v in value)
    for typ in (int, float, str):
        if isinstance(like, typ):
            if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, typ) and not isinstance(value, bool):
                return value
            try:
                return typ(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"override {key}={value!r}: expected {typ.__name__}") from e
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a copy of ``cfg`` with dotted overrides applied.

    ``overrides`` is a dict ``{"model.num_queries": 50}`` or a list of ``"model.num_queries=50"``
    strings (``--model.num_queries=50`` is accepted too). Unknown keys and wrong types raise a
    ``ValueError`` naming the key.
    """
    cfg = copy.deepcopy(cfg)
    if isinstance(overrides, list | tuple):
        pairs = {}
        for item in overrides:
            item = item.removeprefix("--")
            if "=" not in item:
                raise ValueError(
                    f"override {item!r}: expected key=value, e.g. model.num_queries=50"
                )
            key, value = item.split("=", 1)
            pairs[key.strip()] = value
        overrides = pairs
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node) or part not in {
                f.name for f in dataclasses.fields(node)
            }:
                where = ".".join(parts[:i]) or "the config"
                known = (
                    ", ".join(f.name for f in dataclasses.fields(node))
                    if dataclasses.is_dataclass(node)
                    else ""
                )
                raise ValueError(
                    f"unknown config key {key!r}: {where} has no field {part!r} (fields: {known})"
                )
            if i < len(parts) - 1:
                node = getattr(node, part)
        old = getattr(node, parts[-1])
        if dataclasses.is_dataclass(old):
            raise ValueError(
                f"config key {key!r} is a section; set one of its fields, e.g. {key}.<field>=..."
            )
        setattr(node, parts[-1], _coerce(value, old, key))
    return cfg


def get_config(
    name: str = "coco_panoptic_r50", overrides: dict[str, Any] | list[str] | None = None
) -> Config:
    """The preset ``name`` with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = apply_overrides(Config(name=name, output_dir=f"runs/{name}"), PRESETS[name])
    return apply_overrides(cfg, overrides or {})


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` (as stored in checkpoints)."""
    flat: dict[str, Any] = {}
    for section, values in d.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return apply_overrides(Config(), flat)


def config_diff(a: Config, b: Config) -> list[str]:
    """Lines ``key: a -> b`` for every field where the two configs differ."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        if isinstance(da[section], dict):
            for k in da[section]:
                va, vb = da[section][k], db[section][k]
                if va != vb:
                    out.append(f"{section}.{k}: {va!r} -> {vb!r}")
        elif da[section] != db[section]:
            out.append(f"{section}: {da[section]!r} -> {db[section]!r}")
    return out
