"""Write the golden fixtures: the official Mask2Former code run at tiny sizes, as test oracles.

    python tests/golden/make_golden.py OFFICIAL_DIR [--out tests/golden]

``OFFICIAL_DIR`` holds checkouts of github.com/facebookresearch/Mask2Former and
github.com/facebookresearch/detectron2 (as ``OFFICIAL_DIR/Mask2Former`` and
``OFFICIAL_DIR/detectron2``); neither is installed nor compiled. detectron2's pure-Python
dependencies (fvcore, iopath, omegaconf, yacs, termcolor, cloudpickle, hydra-core, portalocker)
must be importable (``pip install --target DIR ...`` and ``PYTHONPATH=DIR``). Stand-ins replace
what is compiled or irrelevant here: the deformable attention's CUDA op
(``MultiScaleDeformableAttention``: absent, so the official ``MSDeformAttn`` runs its own
pure-PyTorch reference, ``ms_deform_attn_core_pytorch``), detectron2's ``_C`` (its fast COCO
evaluation imports it) and OpenCV (only the data augmentation imports it); nothing here calls
the last two.

It writes, for the official R50 and Swin-T models at tiny widths (random weights, fp16-exact):

- ``{r50,swin_t}_weights.pkl``: the weights under the official names (numpy, as a model-zoo file);
- ``{r50,swin_t}_outputs.npz``: the input images, the raw head outputs (``pred_logits``,
  ``pred_masks``, the auxiliary predictions) and the three post-processings' results
  (``MaskFormer.semantic_inference / panoptic_inference / instance_inference`` at the
  official thresholds);
- ``criterion.npz``: the official ``SetCriterion``'s inputs, every random point it drew, and its
  loss terms (unweighted, as its ``forward`` returns them);
- ``golden.json``: the tiny config both sides use, the panoptic segments, the losses;
- ``official_yaml.json``: every preset's official YAML after ``_BASE_`` inheritance, the keys the
  presets mirror.

The tests (``tests/test_golden.py``) compare m2f_lite with these files on every run.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

SEED = 0
NUM_CLASSES = 7
THING_IDS = [0, 1, 2, 3]  # contiguous ids of the thing classes (the rest are stuff)
# (H, W) of the two images, and the original sizes post-processing resizes the results to
IMAGE_SIZES = [(64, 96), (72, 56)]
ORIG_SIZES = [(64, 96), (90, 70)]
TINY = {  # the official config keys set for both models (everything else: the official YAML)
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": NUM_CLASSES,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 32,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 2,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 32,
    "MODEL.MASK_FORMER.NHEADS": 4,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 64,
    "MODEL.MASK_FORMER.DEC_LAYERS": 4,  # 3 layers + the prediction from the queries
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 12,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 64,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": True,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
    "TEST.DETECTIONS_PER_IMAGE": 10,
}
MODELS = {
    "r50": (
        "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
        {"MODEL.RESNETS.RES2_OUT_CHANNELS": 32, "MODEL.RESNETS.WIDTH_PER_GROUP": 8},
    ),
    "swin_t": (
        "configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml",
        {"MODEL.SWIN.EMBED_DIM": 16, "MODEL.SWIN.NUM_HEADS": [1, 2, 2, 4]},
    ),
}


def import_official(root: Path):
    """detectron2 and mask2former from source, with the stand-ins of the module doc."""
    for name in ("MultiScaleDeformableAttention", "cv2", "detectron2._C"):
        stub = types.ModuleType(name)
        stub.__version__ = "0.0"  # detectron2.utils.env reads cv2.__version__
        sys.modules[name] = stub
    sys.path[:0] = [str(root / "detectron2"), str(root / "Mask2Former")]
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    MetadataCatalog.get("golden_shapes").set(
        thing_dataset_id_to_contiguous_id={i: i for i in THING_IDS}
    )

    def config(yaml: str, extra: dict | None = None):
        cfg = get_cfg()
        add_deeplab_config(cfg)
        add_maskformer2_config(cfg)
        cfg.merge_from_file(str(root / "Mask2Former" / yaml))
        if extra is not None:
            pairs = [
                ("MODEL.DEVICE", "cpu"),
                ("MODEL.WEIGHTS", ""),
                ("DATASETS.TRAIN", ("golden_shapes",)),
            ]
            pairs += list({**TINY, **extra}.items())
            cfg.merge_from_list([x for kv in pairs for x in kv])
        return cfg

    return config


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values in every float parameter and buffer, exactly representable in fp16 (so the
    fixture stores fp16 and both sides compute with the same fp32 numbers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            # not weights: pixel statistics, and the loss's class weights (empty_weight)
            if not t.is_floating_point() or name in ("pixel_mean", "pixel_std"):
                continue
            if name.startswith("criterion."):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
            if "class_embed" in name:  # confident classes: the 0.8 thresholds keep some queries
                t.mul_(20.0)
            t.copy_(t.half().float())


def images(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in IMAGE_SIZES]


def run_model(name: str, config, out: Path) -> dict:
    from detectron2.modeling import build_model

    yaml, extra = MODELS[name]
    cfg = config(yaml, extra)
    torch.manual_seed(SEED)
    model = build_model(cfg).eval()
    randomise(model, SEED + 1)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = {
        k: (v.half() if v.is_floating_point() else v).numpy() for k, v in sd.items()
    }  # fp16-exact by construction
    with (out / f"{name}_weights.pkl").open("wb") as f:
        pickle.dump({"model": weights, "__author__": "make_golden"}, f, protocol=4)

    raw = {}
    hook = model.sem_seg_head.register_forward_hook(lambda m, i, o: raw.update(o))
    xs = images(SEED + 2)
    inputs = [{"image": x, "height": h, "width": w} for x, (h, w) in zip(xs, ORIG_SIZES)]
    with torch.no_grad():
        results = model(inputs)
    hook.remove()
    arrays = {
        **{f"image{i}": x.to(torch.uint8).numpy() for i, x in enumerate(xs)},
        "pred_logits": raw["pred_logits"].numpy(),
        "pred_masks": raw["pred_masks"].numpy(),
        "aux_logits": np.stack([a["pred_logits"].numpy() for a in raw["aux_outputs"]]),
        "aux_masks": np.stack([a["pred_masks"].numpy() for a in raw["aux_outputs"]]),
    }
    segments = []
    for i, r in enumerate(results):
        ids, info = r["panoptic_seg"]
        inst = r["instances"]
        arrays |= {
            f"sem_seg{i}": r["sem_seg"].numpy(),
            f"panoptic{i}": ids.numpy().astype(np.int32),
            f"inst_masks{i}": inst.pred_masks.numpy(),
            f"inst_scores{i}": inst.scores.numpy(),
            f"inst_labels{i}": inst.pred_classes.numpy(),
        }
        segments.append(
            [{k: (bool(v) if k == "isthing" else int(v)) for k, v in s.items()} for s in info]
        )
    np.savez_compressed(out / f"{name}_outputs.npz", **arrays)
    print(
        f"{name}: {sum(v.size for v in weights.values())} weights; segments per image "
        f"{[len(s) for s in segments]}, instances {[len(r['instances']) for r in results]}"
    )
    return {"segments": segments, "targets": None, "raw": raw, "model": model}


def run_criterion(r50: dict, out: Path) -> dict:
    """The official SetCriterion on the R50's raw outputs and random targets, every torch.rand it
    draws recorded (the matcher's shared points, the importance sampling's candidates)."""
    model, raw = r50["model"], r50["raw"]
    hp, wp = (raw["pred_masks"].shape[-2] * 4, raw["pred_masks"].shape[-1] * 4)
    g = torch.Generator().manual_seed(SEED + 3)
    targets = []
    for n, (h, w) in zip((3, 2), IMAGE_SIZES):
        masks = torch.zeros(n, hp, wp, dtype=torch.bool)
        masks[:, :h, :w] = torch.rand(n, h, w, generator=g) > 0.5
        masks[0] = False  # an all-zero target mask (kept by the official panoptic mappers)
        masks[-1, : h // 2, : w // 2] = True
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "masks": masks})
    draws = []
    real_rand = torch.rand

    def recording_rand(*args, **kwargs):
        value = real_rand(*args, **kwargs)
        draws.append(value.clone())
        return value

    torch.manual_seed(SEED + 4)
    torch.rand = recording_rand
    try:
        with torch.no_grad():
            losses = model.criterion(raw, targets)
    finally:
        torch.rand = real_rand
    arrays = {f"draw{i}": d.numpy() for i, d in enumerate(draws)}
    for i, t in enumerate(targets):
        arrays |= {f"labels{i}": t["labels"].numpy(), f"masks{i}": t["masks"].numpy()}
    np.savez_compressed(out / "criterion.npz", **arrays)
    print(f"criterion: {len(draws)} random draws, {len(losses)} loss terms")
    return {k: float(v) for k, v in losses.items()}


# the presets (m2f_lite.presets) and the official YAML each mirrors
def preset_yamls() -> dict[str, str]:
    out = {}
    swin = {
        "swin_t": "swin_tiny",
        "swin_s": "swin_small",
        "swin_b": "swin_base_384",
        "swin_l": "swin_large_IN21k_384",
    }
    folder = {
        "panoptic": "panoptic-segmentation",
        "instance": "instance-segmentation",
        "semantic": "semantic-segmentation",
    }
    for dataset, tasks, schedule in (
        ("coco", ("panoptic", "instance"), "bs16_50ep"),
        ("ade20k", ("semantic", "panoptic"), "bs16_160k"),
        ("cityscapes", ("semantic", "instance", "panoptic"), "bs16_90k"),
    ):
        for task in tasks:
            for arch in ("r50", "r101", "swin_t", "swin_s", "swin_b", "swin_l"):
                if dataset == "ade20k" and task == "panoptic" and arch not in ("r50", "swin_l"):
                    continue
                sched = schedule
                if arch == "r101" and dataset == "ade20k":
                    sched = "bs16_90k"
                if arch == "swin_l" and dataset == "coco":
                    sched = "bs16_100ep"
                if arch in ("r50", "r101"):
                    file = f"maskformer2_{arch.upper()}_{sched}.yaml"
                else:
                    name = swin[arch]
                    if dataset == "cityscapes" and arch == "swin_b":
                        name = "swin_base_IN21k_384"
                    if dataset == "ade20k" and task == "semantic" and arch in ("swin_b", "swin_l"):
                        sched += "_res640"
                    file = f"swin/maskformer2_{name}_{sched}.yaml"
                out[f"{dataset}_{task}_{arch}"] = f"configs/{dataset}/{folder[task]}/{file}"
    return out


YAML_KEYS = [  # the official keys the presets set (m2f_lite.config names each one)
    "MODEL.BACKBONE.FREEZE_AT",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.NORM",
    "MODEL.SWIN.EMBED_DIM",
    "MODEL.SWIN.DEPTHS",
    "MODEL.SWIN.NUM_HEADS",
    "MODEL.SWIN.WINDOW_SIZE",
    "MODEL.SWIN.DROP_PATH_RATE",
    "MODEL.BACKBONE.NAME",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "MODEL.SEM_SEG_HEAD.MASK_DIM",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE",
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
    "MODEL.MASK_FORMER.HIDDEN_DIM",
    "MODEL.MASK_FORMER.NHEADS",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "MODEL.MASK_FORMER.DEC_LAYERS",
    "MODEL.MASK_FORMER.PRE_NORM",
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ",
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY",
    "MODEL.MASK_FORMER.CLASS_WEIGHT",
    "MODEL.MASK_FORMER.MASK_WEIGHT",
    "MODEL.MASK_FORMER.DICE_WEIGHT",
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO",
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO",
    "MODEL.MASK_FORMER.DEEP_SUPERVISION",
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON",
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON",
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD",
    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD",
    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE",
    "TEST.DETECTIONS_PER_IMAGE",
    "INPUT.DATASET_MAPPER_NAME",
    "INPUT.IMAGE_SIZE",
    "INPUT.MIN_SCALE",
    "INPUT.MAX_SCALE",
    "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING",
    "INPUT.CROP.ENABLED",
    "INPUT.CROP.SIZE",
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA",
    "INPUT.COLOR_AUG_SSD",
    "INPUT.SIZE_DIVISIBILITY",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "INPUT.FORMAT",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.BASE_LR",
    "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_EMBED",
    "SOLVER.BACKBONE_MULTIPLIER",
    "SOLVER.MAX_ITER",
    "SOLVER.LR_SCHEDULER_NAME",
    "SOLVER.STEPS",
    "SOLVER.GAMMA",
    "SOLVER.POLY_LR_POWER",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.WARMUP_FACTOR",
    "SOLVER.CLIP_GRADIENTS.ENABLED",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "SOLVER.AMP.ENABLED",
    "SOLVER.CHECKPOINT_PERIOD",
    "TEST.EVAL_PERIOD",
    "MODEL.WEIGHTS",
]


def yaml_values(config) -> dict:
    out = {}
    for preset, yaml in preset_yamls().items():
        cfg = config(yaml)
        values = {}
        for key in YAML_KEYS:
            node = cfg
            for part in key.split("."):
                node = node[part]
            values[key] = list(node) if isinstance(node, tuple | list) else node
        out[preset] = {"yaml": yaml, "values": values}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="folder with Mask2Former/ and detectron2/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = import_official(args.official.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {name: run_model(name, config, args.out) for name in MODELS}
    losses = run_criterion(runs["r50"], args.out)
    golden = {
        "tiny": TINY,
        "models": {name: {"yaml": MODELS[name][0], "extra": MODELS[name][1]} for name in MODELS},
        "image_sizes": IMAGE_SIZES,
        "orig_sizes": ORIG_SIZES,
        "thing_ids": THING_IDS,
        "segments": {name: run["segments"] for name, run in runs.items()},
        "losses": losses,
    }
    (args.out / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    (args.out / "official_yaml.json").write_text(
        json.dumps(yaml_values(config), indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
