"""Cityscapes (Cordts et al., 2016): 19 evaluated classes (8 with instances), fine annotations.

Folder layout (download needs a login: ``m2f-lite data download cityscapes`` prints the steps)::

    cityscapes/
      leftImg8bit/{train,val,test}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
      gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png      uint8 label ids
      gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png   uint16
      # made by ``m2f-lite data prepare cityscapes`` (as cityscapesScripts' createPanopticImgs.py)
      gtFine/cityscapes_panoptic_{train,val}.json
      gtFine/cityscapes_panoptic_{train,val}/{city}_{seq}_{frame}_gtFine_panoptic.png

- semantic: label ids -> train ids through the official table (``categories.CITYSCAPES_LABELS``);
  classes ignored in evaluation become 255;
- instance: ``instanceIds`` values ``>= 1000`` are instances of label ``id // 1000``; smaller values of
  a class with instances are crowd groups ("car group"), excluded; caravan and trailer are ignored.
  The 8 classes are person, rider, car, truck, bus, train, motorcycle, bicycle;
- panoptic: the COCO panoptic reader over the ``cityscapes_panoptic_*`` files, label ids -> train ids.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from m2f_lite.data.base import SegmentationDataset
from m2f_lite.data.categories import CITYSCAPES_LABELS
from m2f_lite.data.coco_panoptic import COCOPanopticDataset
from m2f_lite.data.files import DatasetError, read_image, read_label_png
from m2f_lite.data.meta import DatasetMeta
from m2f_lite.data.semantic import UNKNOWN, SemanticDataset

IMAGE_SUFFIX = "_leftImg8bit.png"


def _evaluated() -> list[tuple]:
    """The 19 labels with a train id, in train-id order."""
    return sorted((lb for lb in CITYSCAPES_LABELS if 0 <= lb[2] < 255), key=lambda lb: lb[2])


def cityscapes_meta() -> DatasetMeta:
    """19 classes in train-id order; ``dataset_ids`` are the Cityscapes label ids (7..33)."""
    labels = _evaluated()
    return DatasetMeta(
        name="cityscapes",
        classes=[lb[0] for lb in labels],
        is_thing=[bool(lb[4]) for lb in labels],
        dataset_ids=[lb[1] for lb in labels],
        colors=[lb[6] for lb in labels],
    )


def cityscapes_instance_meta() -> DatasetMeta:
    """The 8 thing classes (person .. bicycle), label ids 24-28 and 31-33."""
    labels = [lb for lb in _evaluated() if lb[4]]
    return DatasetMeta(
        name="cityscapes_instance",
        classes=[lb[0] for lb in labels],
        is_thing=[True] * len(labels),
        dataset_ids=[lb[1] for lb in labels],
        colors=[lb[6] for lb in labels],
    )


def label_id_to_train_id() -> np.ndarray:
    """Look-up table label id (0..33) -> train id (255 = ignored); larger ids are refused."""
    lut = np.full(256, UNKNOWN, dtype=np.int64)
    for lb in CITYSCAPES_LABELS:
        if lb[1] >= 0:
            lut[lb[1]] = lb[2]
    return lut


def find_images(root: Path, split: str) -> list[tuple[Path, str]]:
    """``(image path, "{city}_{seq}_{frame}")`` for every image of ``split``, sorted."""
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError("missing image folder (no such directory)", file=image_dir)
    files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not files:
        raise DatasetError(f"no *{IMAGE_SUFFIX} images found", file=image_dir)
    return [(f, f.name[: -len(IMAGE_SUFFIX)]) for f in files]


def _gt(root: Path, split: str, stem: str, kind: str) -> Path:
    return root / "gtFine" / split / stem.split("_")[0] / f"{stem}_gtFine_{kind}.png"


def cityscapes_semantic(root: str | Path, split: str, *, transforms=None) -> SemanticDataset:
    root = Path(root)
    images = find_images(root, split)
    pairs = [(img, _gt(root, split, stem, "labelIds")) for img, stem in images]
    dataset = SemanticDataset(
        pairs=pairs,
        meta=cityscapes_meta(),
        transforms=transforms,
        label_map=label_id_to_train_id(),
        image_ids=[stem for _, stem in images],
    )
    dataset.cityscapes_gt_dir = root / "gtFine" / split  # the benchmark's evaluation reads it
    return dataset


class CityscapesInstanceDataset(SegmentationDataset):
    """Instances from ``*_gtFine_instanceIds.png`` (see the module docstring)."""

    task = "instance"

    def __init__(self, *, root: str | Path, split: str, transforms=None):
        super().__init__(meta=cityscapes_instance_meta(), transforms=transforms)
        self.root, self.split = Path(root), split
        self.cityscapes_gt_dir = self.root / "gtFine" / split  # the benchmark's evaluation reads it
        self.images = find_images(self.root, split)
        self._label = {lb[1]: lb for lb in CITYSCAPES_LABELS}
        self._to_contiguous = {d: k for k, d in enumerate(self.meta.dataset_ids)}

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> dict:
        image_path, stem = self.images[index]
        inst_path = _gt(self.root, self.split, stem, "instanceIds")
        inst = read_label_png(inst_path)  # [H, W]
        ids = np.unique(inst[inst >= 24])  # label ids < 24 are stuff
        keep, labels, crowd = [], [], []
        for v in ids.tolist():
            label_id = v // 1000 if v >= 1000 else v
            if label_id not in self._label:
                raise DatasetError(
                    f"instance id {v} has unknown label id {label_id}",
                    file=inst_path,
                    field="pixel values",
                )
            if label_id not in self._to_contiguous:  # no instances, or ignored in evaluation
                continue
            keep.append(v)
            labels.append(self._to_contiguous[label_id])
            crowd.append(v < 1000)
        masks = inst[None] == np.asarray(keep, dtype=np.int64)[:, None, None]  # [N, H, W]
        return {
            "image": read_image(image_path),
            "masks": masks,
            "labels": labels,
            "iscrowd": crowd,
            "image_id": stem,
            "file_name": image_path,
        }


def cityscapes_panoptic(
    root: str | Path, split: str, *, transforms=None, filter_empty: bool = False
) -> COCOPanopticDataset:
    """The ``gtFine/cityscapes_panoptic_{split}`` files (``m2f-lite data prepare cityscapes``)."""
    root = Path(root)
    dataset = COCOPanopticDataset(
        image_root=root / "leftImg8bit" / split,
        panoptic_json=root / "gtFine" / f"cityscapes_panoptic_{split}.json",
        panoptic_root=root / "gtFine" / f"cityscapes_panoptic_{split}",
        meta=cityscapes_meta(),
        transforms=transforms,
        filter_empty=filter_empty,
        image_file=functools.partial(_image_of_entry, root / "leftImg8bit" / split),
    )
    dataset.cityscapes_gt_dir = root / "gtFine" / split  # the benchmark's evaluation reads it
    return dataset


def _image_of_entry(image_dir: Path, entry: dict) -> Path:
    """``leftImg8bit/{split}/{city}/{file_name}``, the city being the image id's first part."""
    return image_dir / str(entry["id"]).split("_")[0] / entry["file_name"]
