"""The one place that reads ``cfg.data``: dataset name -> reader + augmentation, and batching.

>>> ds = build_dataset(get_config("shapes_tiny"), "train", train=True)   # doctest: +SKIP
>>> images, targets = collate([ds[0], ds[1]])                           # doctest: +SKIP

Dataset names (``data.dataset``) and the split names they accept:

=====================  ==========================================  ===================
name                   reader                                      splits
=====================  ==========================================  ===================
coco_panoptic          COCOPanopticDataset, 133 classes            train, val (2017)
coco_instance          COCOInstanceDataset, 80 classes             train, val (2017)
ade20k_semantic        SemanticDataset, 150 classes                train, val
ade20k_panoptic        COCOPanopticDataset, 150 classes            train, val
cityscapes_semantic    SemanticDataset, 19 classes                 train, val
cityscapes_instance    CityscapesInstanceDataset, 8 classes        train, val
cityscapes_panoptic    COCOPanopticDataset, 19 classes             train, val
coco_custom            your COCO-format folder (``custom.py``)     any
shapes                 the synthetic shapes, panoptic, 7 classes   train, val
shapes_instance        the synthetic shapes, instance, 4 classes   train, val
shapes_semantic        the synthetic shapes, semantic, 7 classes   train, val
=====================  ==========================================  ===================
"""

from __future__ import annotations

from pathlib import Path

import torch

from m2f_lite.data import transforms as T
from m2f_lite.data.meta import DatasetMeta

DATASETS = (
    "coco_panoptic",
    "coco_instance",
    "ade20k_semantic",
    "ade20k_panoptic",
    "cityscapes_semantic",
    "cityscapes_instance",
    "cityscapes_panoptic",
    "coco_custom",
    "shapes",
    "shapes_instance",
    "shapes_semantic",
)


def build_transforms(data, *, train: bool) -> T.Compose:
    """The augmentation of ``data.mapper`` (a ``DataConfig``) for training, or the test-time resize."""
    test = [
        T.ResizeShortestEdge(short_edge_length=(data.min_size_test,), max_size=data.max_size_test)
    ]
    if not train or data.mapper == "none":
        return T.Compose(test if data.min_size_test > 0 else [])
    if data.mapper == "lsj":  # coco_*_new_baseline_dataset_mapper.py
        size = data.image_size
        return T.Compose(
            [
                T.RandomFlip(),
                T.ResizeScale(
                    min_scale=data.min_scale,
                    max_scale=data.max_scale,
                    target_height=size,
                    target_width=size,
                ),
                T.FixedSizeCrop(crop_size=(size, size), ignore_label=data.ignore_label),
            ]
        )
    if data.mapper == "semantic":  # mask_former_{semantic,instance,panoptic}_dataset_mapper.py
        if not data.min_size_train:
            raise ValueError(
                "data.mapper=semantic needs data.min_size_train (short-edge sizes to choose from)"
            )
        out = [
            T.ResizeShortestEdge(
                short_edge_length=data.min_size_train, max_size=data.max_size_train
            )
        ]
        if data.crop_size[0] > 0 and data.crop_size[1] > 0:
            out.append(
                T.RandomCrop(
                    crop_size=data.crop_size,
                    single_category_max_area=data.single_category_max_area,
                    ignore_label=data.ignore_label,
                )
            )
        if data.color_aug:
            out.append(T.ColorAugSSD())
        out.append(T.RandomFlip())
        if data.mapper_size_divisibility > 0:
            d = data.mapper_size_divisibility
            out.append(T.Pad(size=(d, d), ignore_label=data.ignore_label))
        return T.Compose(out)
    raise ValueError(f"data.mapper={data.mapper!r}: expected 'lsj', 'semantic' or 'none'")


def _coco_split(split: str) -> str:
    return {"train": "train2017", "val": "val2017"}.get(split, split)


def build_dataset(cfg, split: str, *, train: bool):
    """The dataset ``cfg.data.dataset`` of ``split`` under ``cfg.data.root``, with the training
    augmentation (``train=True``) or the test-time resize. As detectron2, ``data.filter_empty``
    drops training images without a non-crowd instance from *instance* data only (its
    ``filter_images_with_only_crowd_annotations`` runs on records with ``annotations``; panoptic
    and semantic records have none), and only the COCO instance LSJ mapper drops the targets
    that augmentation emptied (``drop_empty_masks``). Refuses a config whose ``model.num_classes`` differs from the dataset's class count."""
    data = cfg.data
    name, root = data.dataset, Path(data.root)
    tf = build_transforms(data, train=train)
    fe = train and data.filter_empty
    if name == "coco_panoptic":
        from m2f_lite.data.coco_panoptic import COCOPanopticDataset, coco_panoptic_meta

        s = _coco_split(split)
        ds = COCOPanopticDataset(
            image_root=root / s,
            panoptic_json=root / "annotations" / f"panoptic_{s}.json",
            panoptic_root=root / f"panoptic_{s}",
            meta=coco_panoptic_meta(),
            transforms=tf,
        )
    elif name == "coco_instance":
        from m2f_lite.data.coco_instance import COCOInstanceDataset, coco_instance_meta

        s = _coco_split(split)
        ds = COCOInstanceDataset(
            image_root=root / s,
            instances_json=root / "annotations" / f"instances_{s}.json",
            meta=coco_instance_meta(),
            transforms=tf,
            filter_empty=fe,
        )
    elif name in ("ade20k_semantic", "ade20k_panoptic"):
        from m2f_lite.data import ade20k

        if name == "ade20k_semantic":
            ds = ade20k.ade20k_semantic(root, split, transforms=tf)
        else:
            ds = ade20k.ade20k_panoptic(root, split, transforms=tf)
    elif name.startswith("cityscapes_"):
        from m2f_lite.data import cityscapes

        if name == "cityscapes_semantic":
            ds = cityscapes.cityscapes_semantic(root, split, transforms=tf)
        elif name == "cityscapes_instance":
            ds = cityscapes.CityscapesInstanceDataset(root=root, split=split, transforms=tf)
        elif name == "cityscapes_panoptic":
            ds = cityscapes.cityscapes_panoptic(root, split, transforms=tf)
        else:
            raise ValueError(f"data.dataset={name!r}: expected one of {', '.join(DATASETS)}")
    elif name == "coco_custom" or name in ("shapes", "shapes_instance", "shapes_semantic"):
        from m2f_lite.data.custom import coco_folder

        if name == "coco_custom":  # panoptic if its files are there, else instances
            task = "panoptic" if (root / f"panoptic_{split}.json").exists() else "instance"
            meta = None
        else:
            task = {"shapes_instance": "instance", "shapes_semantic": "semantic"}.get(
                name, "panoptic"
            )
            meta = _shapes_meta(task)
        fe = fe and task == "instance"  # panoptic records are never filtered
        ds = coco_folder(root, split, task=task, meta=meta, transforms=tf, filter_empty=fe)
    else:
        raise ValueError(f"data.dataset={name!r}: expected one of {', '.join(DATASETS)}")
    ds.drop_empty_masks = train and data.mapper == "lsj" and ds.task == "instance"
    if cfg.model.num_classes != ds.meta.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but dataset {name!r} has {ds.meta.num_classes} classes"
        )
    return ds


def _shapes_meta(task: str) -> DatasetMeta:
    from m2f_lite.data.synthetic import shapes_meta

    meta = shapes_meta()
    if task != "instance":
        return meta
    things = meta.thing_ids
    return DatasetMeta(
        name="shapes_instance",
        classes=[meta.classes[k] for k in things],
        is_thing=[True] * len(things),
        dataset_ids=[meta.dataset_ids[k] for k in things],
        colors=[meta.colors[k] for k in things],
    )


def dataset_meta(name: str) -> DatasetMeta:
    """The class names, thing flags and category ids of a dataset name (``cfg.data.dataset``),
    for checkpoints that do not carry their own (converted official weights)."""
    from m2f_lite.data import ade20k, cityscapes, coco_instance, coco_panoptic, synthetic

    known = {
        "coco_panoptic": coco_panoptic.coco_panoptic_meta,
        "coco_instance": coco_instance.coco_instance_meta,
        "ade20k_semantic": ade20k.ade20k_meta,
        "ade20k_panoptic": ade20k.ade20k_meta,
        "cityscapes_semantic": cityscapes.cityscapes_meta,
        "cityscapes_panoptic": cityscapes.cityscapes_meta,
        "cityscapes_instance": cityscapes.cityscapes_instance_meta,
        "shapes": synthetic.shapes_meta,
        "shapes_semantic": synthetic.shapes_meta,
        "shapes_instance": lambda: _shapes_meta("instance"),
    }
    if name not in known:
        raise ValueError(
            f"no built-in class list for dataset {name!r}: use a checkpoint trained by m2f-lite (it stores its classes)"
        )
    return known[name]()


def collate(batch: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
    """``(images, targets)``: the ``[3, H, W]`` images (sizes may differ; the model pads) and one
    dict per image with everything else (``labels``, ``masks``, ``image_id``, sizes, ...)."""
    images = [b["image"] for b in batch]
    targets = [{k: v for k, v in b.items() if k != "image"} for b in batch]
    return images, targets
