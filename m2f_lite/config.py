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

from m2f_lite.presets import PRESETS  # the official recipes, as dotted overrides

IMAGENET_MEAN = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN, RGB, 0..255
IMAGENET_STD = (58.395, 57.120, 57.375)  # MODEL.PIXEL_STD


@dataclass
class ModelConfig:
    # a name in modeling.backbone.BACKBONES (resnet50, swin_large_384, ...)
    backbone: str = "resnet50"
    # MODEL.RESNETS.NORM: "frozen_bn" (FrozenBN) | "syncbn" (SyncBN: trainable, synchronised over
    # the processes under DDP on GPUs) | "bn" (trainable, per process)
    backbone_norm: str = "frozen_bn"
    # MODEL.BACKBONE.FREEZE_AT: stages frozen (0 = none, 1 = stem, 2 = stem+res2, ...)
    freeze_at: int = 0
    drop_path_rate: float = 0.0  # MODEL.SWIN.DROP_PATH_RATE (0.3 for Swin)
    # MODEL.SEM_SEG_HEAD.NUM_CLASSES (K; the model predicts K+1 with no-object)
    num_classes: int = 133
    num_queries: int = 100  # MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    hidden_dim: int = 256  # MODEL.MASK_FORMER.HIDDEN_DIM
    nheads: int = 8  # MODEL.MASK_FORMER.NHEADS
    dim_feedforward: int = 2048  # MODEL.MASK_FORMER.DIM_FEEDFORWARD
    # decoder layers; the official DEC_LAYERS=10 counts the query prediction too
    dec_layers: int = 9
    pre_norm: bool = False  # MODEL.MASK_FORMER.PRE_NORM
    enforce_input_proj: bool = False  # MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ
    masked_attention: bool = True  # False: standard cross-attention (the paper's ablation)
    conv_dim: int = 256  # MODEL.SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # MODEL.SEM_SEG_HEAD.MASK_DIM
    enc_layers: int = 6  # MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    enc_nheads: int = 8  # the official pixel decoder reads MASK_FORMER.NHEADS here
    enc_n_points: int = 4  # fixed at 4 in the official pixel decoder
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
    # evaluation precision, its own setting: "off" = fp32, as detectron2 evaluates (its
    # inference_on_dataset has no autocast; SOLVER.AMP is for training only) | "bf16" | "fp16"
    amp: str = "off"


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
    # training precision. SOLVER.AMP.ENABLED: True in every official recipe = "fp16" (autocast
    # with a GradScaler, the default) | "bf16" (no scaler; fp16 on GPUs without bf16) | "off"
    # (fp32). CPUs always train in fp32. Evaluation has its own setting: inference.amp.
    amp: str = "fp16"
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
    # "auto" (cuda:LOCAL_RANK when a GPU is visible, else cpu) | "cpu" | "cuda"
    device: str = "auto"
    output_dir: str = "runs/coco_panoptic_r50"
    weights: str = ""  # backbone or full-model weights to start from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
