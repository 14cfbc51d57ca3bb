"""COCO instance segmentation (Lin et al., 2014): 80 thing classes, masks as polygons or RLE.

Folder layout (``m2f-lite data download coco``)::

    coco/
      train2017/  val2017/                        images (*.jpg)
      annotations/instances_{train,val}2017.json  images, annotations, categories

Each annotation's ``segmentation`` is a list of polygons ``[[x1, y1, x2, y2, ...], ...]``, an
uncompressed RLE ``{"size": [h, w], "counts": [..]}`` (COCO's crowd regions) or a compressed RLE
(``counts`` a string); pycocotools decodes all three. Crowd annotations (``iscrowd: 1``) are kept
out of the targets, as in the official mapper; evaluation reads them from the JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from m2f_lite.data.base import SegmentationDataset
from m2f_lite.data.categories import COCO_PANOPTIC_CATEGORIES
from m2f_lite.data.files import DatasetError, read_image, read_json, require
from m2f_lite.data.meta import DatasetMeta


def coco_instance_meta() -> DatasetMeta:
    """The 80 COCO thing categories (ids 1-90), contiguous in id order."""
    things = [c for c in COCO_PANOPTIC_CATEGORIES if c[2]]
    return DatasetMeta(
        name="coco_instance",
        classes=[c[1] for c in things],
        is_thing=[True] * len(things),
        dataset_ids=[c[0] for c in things],
        colors=[c[3] for c in things],
    )


def decode_segmentation(
    segm, h: int, w: int, *, file: str | Path = "", field: str = "segmentation"
) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or compressed RLE) as a bool mask ``[h, w]``."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if len(polys) != len(segm):
            raise DatasetError(
                "polygons need an even number (>= 6) of coordinates x1, y1, x2, y2, ...",
                file=file,
                field=field,
            )
        if not polys:
            return np.zeros((h, w), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            raise DatasetError(
                f"RLE size {segm['size']} differs from the image's [{h}, {w}]",
                file=file,
                field=field,
            )
        rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DatasetError(
            "expected polygons (a list) or an RLE dict with size and counts", file=file, field=field
        )
    return mask_util.decode(rle).astype(bool)


class COCOInstanceDataset(SegmentationDataset):
    """Images + a COCO instances JSON (see the module docstring for the layout)."""

    task = "instance"

    def __init__(
        self,
        *,
        image_root: str | Path,
        instances_json: str | Path,
        meta: DatasetMeta,
        transforms=None,
        filter_empty: bool = False,
    ):
        """``filter_empty`` drops images without a non-crowd instance (for training)."""
        super().__init__(meta=meta, transforms=transforms)
        self.image_root, self.instances_json = Path(image_root), Path(instances_json)
        data = read_json(self.instances_json)
        f = self.instances_json
        if not isinstance(data, dict):
            raise DatasetError(
                "expected a JSON object with images, annotations, categories", file=f
            )
        to_contiguous = {d: k for k, d in enumerate(meta.dataset_ids)}
        images = {}
        for i, im in enumerate(require(data, "images", f)):
            for key in ("id", "file_name", "height", "width"):
                require(im, key, f, f"images[{i}].")
            if not isinstance(im["id"], int | str) or isinstance(im["id"], bool):
                raise DatasetError(
                    f"expected an integer image id, got {im['id']!r}",
                    file=f,
                    field=f"images[{i}].id",
                )
            if not isinstance(im["file_name"], str):
                raise DatasetError(
                    f"expected a file name, got {im['file_name']!r}",
                    file=f,
                    field=f"images[{i}].file_name",
                )
            images[im["id"]] = {"image": im, "annotations": []}
        for i, ann in enumerate(require(data, "annotations", f)):
            where = f"annotations[{i}]."
            image_id, cat = (
                require(ann, "image_id", f, where),
                require(ann, "category_id", f, where),
            )
            require(ann, "segmentation", f, where)
            if image_id not in images:
                raise DatasetError(
                    f"image_id {image_id!r} is not in images", file=f, field=where + "image_id"
                )
            if cat not in to_contiguous:
                raise DatasetError(
                    f"unknown category id {cat} (known: {sorted(to_contiguous)})",
                    file=f,
                    field=where + "category_id",
                )
            images[image_id]["annotations"].append((i, ann))
        self.records = list(images.values())  # images without annotations are kept (no targets)
        if filter_empty:
            self.records = [
                r for r in self.records if any(not a.get("iscrowd", 0) for _, a in r["annotations"])
            ]
        self._to_contiguous = to_contiguous

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        r = self.records[index]
        im = r["image"]
        path = self.image_root / im["file_name"]
        image = read_image(path)
        h, w = image.shape[:2]
        if (h, w) != (im["height"], im["width"]):
            raise DatasetError(
                f"image is {h}x{w} but {self.instances_json} says {im['height']}x{im['width']}",
                file=path,
                field="height/width",
            )
        masks = [
            decode_segmentation(
                a["segmentation"],
                h,
                w,
                file=self.instances_json,
                field=f"annotations[{i}].segmentation",
            )
            for i, a in r["annotations"]
        ]
        return {
            "image": image,
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),  # [N, H, W]
            "labels": [self._to_contiguous[a["category_id"]] for _, a in r["annotations"]],
            "iscrowd": [bool(a.get("iscrowd", 0)) for _, a in r["annotations"]],
            "image_id": im["id"],
            "file_name": path,
        }
