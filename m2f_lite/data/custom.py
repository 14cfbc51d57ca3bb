"""Your own data in COCO format (``coco_custom``), and the folder layout the shapes dataset uses.

Give the files explicitly::

    ds = coco_custom(image_root="my/images", panoptic_json="my/panoptic.json", panoptic_root="my/panoptic")
    ds = coco_custom(image_root="my/images", instances_json="my/instances.json")

or keep one folder per dataset in this layout (``data.dataset=coco_custom``, ``data.root=PATH``)::

    PATH/
      images/{split}/*.png|jpg
      panoptic_{split}.json + panoptic_{split}/*.png   (panoptic: things and stuff)
      instances_{split}.json                           (instance: things)
      semantic_{split}/*.png                           (semantic: uint8 contiguous ids, 255 = ignore)

Classes come from the JSON's ``categories`` (contiguous in id order) unless a ``meta`` is given.
"""

from __future__ import annotations

from pathlib import Path

from m2f_lite.data.coco_instance import COCOInstanceDataset
from m2f_lite.data.coco_panoptic import COCOPanopticDataset, meta_from_categories
from m2f_lite.data.files import DatasetError, read_json, require
from m2f_lite.data.meta import DatasetMeta
from m2f_lite.data.semantic import SemanticDataset, pair_by_stem


def meta_from_json(path: str | Path, *, name: str = "coco_custom") -> DatasetMeta:
    """Class metadata from a COCO (panoptic or instances) JSON's ``categories``."""
    return meta_from_categories(require(read_json(path), "categories", path), name=name, file=path)


def coco_custom(
    *,
    image_root: str | Path,
    panoptic_json: str | Path | None = None,
    panoptic_root: str | Path | None = None,
    instances_json: str | Path | None = None,
    meta: DatasetMeta | None = None,
    transforms=None,
    filter_empty: bool = False,
) -> COCOPanopticDataset | COCOInstanceDataset:
    """A panoptic dataset (``panoptic_json`` + ``panoptic_root``) or an instance one (``instances_json``)."""
    if (panoptic_json is None) == (instances_json is None):
        raise ValueError(
            "coco_custom: give either panoptic_json (with panoptic_root) or instances_json"
        )
    if panoptic_json is not None:
        if panoptic_root is None:
            raise ValueError(
                "coco_custom: panoptic_json needs panoptic_root (the folder of panoptic PNGs)"
            )
        return COCOPanopticDataset(
            image_root=image_root,
            panoptic_json=panoptic_json,
            panoptic_root=panoptic_root,
            meta=meta or meta_from_json(panoptic_json),
            transforms=transforms,
            filter_empty=filter_empty,
        )
    return COCOInstanceDataset(
        image_root=image_root,
        instances_json=instances_json,
        meta=meta or meta_from_json(instances_json),
        transforms=transforms,
        filter_empty=filter_empty,
    )


def coco_folder(
    root: str | Path,
    split: str,
    *,
    task: str = "panoptic",
    meta: DatasetMeta | None = None,
    transforms=None,
    filter_empty: bool = False,
):
    """The dataset of ``split`` in the one-folder layout above, read as ``task``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("missing dataset folder (no such directory)", file=root)
    images = root / "images" / split
    if task == "panoptic":
        return coco_custom(
            image_root=images,
            panoptic_json=root / f"panoptic_{split}.json",
            panoptic_root=root / f"panoptic_{split}",
            meta=meta,
            transforms=transforms,
            filter_empty=filter_empty,
        )
    if task == "instance":
        return coco_custom(
            image_root=images,
            instances_json=root / f"instances_{split}.json",
            meta=meta,
            transforms=transforms,
            filter_empty=filter_empty,
        )
    if task == "semantic":
        if meta is None:
            meta = meta_from_json(root / f"panoptic_{split}.json")
        pairs = pair_by_stem(images, root / f"semantic_{split}")
        return SemanticDataset(pairs=pairs, meta=meta, transforms=transforms)
    raise ValueError(f"task={task!r}: expected 'panoptic', 'instance' or 'semantic'")
