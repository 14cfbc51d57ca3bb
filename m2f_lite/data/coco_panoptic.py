"""COCO panoptic segmentation (Kirillov et al., 2019): 133 classes, 80 things and 53 stuff.

Folder layout (``m2f-lite data download coco`` + ``prepare coco`` make it)::

    coco/
      train2017/  val2017/                      images (*.jpg)
      annotations/panoptic_{train,val}2017.json   images, annotations[].segments_info, categories
      panoptic_{train,val}2017/                   PNGs, segment id = R + 256 G + 256^2 B (0 = void)
      panoptic_semseg_{train,val}2017/            contiguous class PNGs (made by ``prepare coco``)

The same reader serves every dataset stored in this format (ADE20K panoptic, Cityscapes panoptic,
the synthetic shapes, your own data): give it the JSON, the PNG folder, the image folder and a
:class:`DatasetMeta` whose ``dataset_ids`` are the JSON's category ids. Each segment in
``segments_info`` becomes one target (crowd segments excluded). A segment id in the JSON but not in
the PNG, or the reverse, and an image whose size differs from the JSON's ``height``/``width``, are
refused with a :class:`DatasetError` naming the file, as ``m2f-lite data check`` reports them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from m2f_lite.data.base import SegmentationDataset
from m2f_lite.data.categories import COCO_PANOPTIC_CATEGORIES
from m2f_lite.data.files import DatasetError, read_image, read_json, read_panoptic_png, require
from m2f_lite.data.meta import DatasetMeta


def coco_panoptic_meta() -> DatasetMeta:
    """The 133 COCO panoptic categories, contiguous in id order (things 0-79, stuff 80-132)."""
    return DatasetMeta(
        name="coco_panoptic",
        classes=[c[1] for c in COCO_PANOPTIC_CATEGORIES],
        is_thing=[bool(c[2]) for c in COCO_PANOPTIC_CATEGORIES],
        dataset_ids=[c[0] for c in COCO_PANOPTIC_CATEGORIES],
        colors=[c[3] for c in COCO_PANOPTIC_CATEGORIES],
    )


def meta_from_categories(
    categories: list[dict], *, name: str, file: str | Path = ""
) -> DatasetMeta:
    """A :class:`DatasetMeta` from a COCO ``categories`` list, contiguous in id order (as detectron2)."""
    rows = []
    for i, c in enumerate(categories):
        where = f"categories[{i}]."
        rows.append((require(c, "id", file, where), require(c, "name", file, where), c))
    rows.sort(key=lambda r: r[0])
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        raise DatasetError(
            f"duplicate category ids in {sorted(ids)}", file=file, field="categories"
        )
    colors = [tuple(r[2]["color"]) for r in rows] if all("color" in r[2] for r in rows) else []
    return DatasetMeta(
        name=name,
        classes=[r[1] for r in rows],
        is_thing=[bool(r[2].get("isthing", 1)) for r in rows],  # instances JSONs: all things
        dataset_ids=ids,
        colors=colors,
    )


class COCOPanopticDataset(SegmentationDataset):
    """Images + COCO panoptic JSON + panoptic PNGs (see the module docstring for the layout)."""

    task = "panoptic"

    def __init__(
        self,
        *,
        image_root: str | Path,
        panoptic_json: str | Path,
        panoptic_root: str | Path,
        meta: DatasetMeta,
        transforms=None,
        filter_empty: bool = False,
        image_file: Callable[[dict], Path] | None = None,
    ):
        """``image_file(image_entry)`` overrides where an image is found (default:
        ``image_root / file_name``); ``filter_empty`` drops images without a non-crowd segment
        (detectron2's ``FILTER_EMPTY_ANNOTATIONS``, for training)."""
        super().__init__(meta=meta, transforms=transforms)
        self.image_root, self.panoptic_root = Path(image_root), Path(panoptic_root)
        self.panoptic_json = Path(panoptic_json)
        self._image_file = image_file  # a module-level function or partial: picklable for workers
        data = read_json(self.panoptic_json)
        self.records = parse_panoptic_json(data, meta, self.panoptic_json)
        if filter_empty:
            self.records = [r for r in self.records if any(not s[2] for s in r["segments"])]

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        r = self.records[index]
        im = r["image"]
        image_path = self._image_file(im) if self._image_file else self.image_root / im["file_name"]
        image = read_image(image_path)
        if "height" in im and "width" in im and image.shape[:2] != (im["height"], im["width"]):
            raise DatasetError(
                f"image is {image.shape[0]}x{image.shape[1]} but {self.panoptic_json} says "
                f"{im['height']}x{im['width']}",
                file=image_path,
                field="height/width",
            )
        return {
            "image": image,
            "pan_seg": read_panoptic_png(self.panoptic_root / r["png"]),
            "pan_file": self.panoptic_root / r["png"],  # named by the segment id checks
            "segments": r["segments"],
            "image_id": r["image_id"],
            "file_name": image_path,
        }


def parse_panoptic_json(data: dict, meta: DatasetMeta, file: Path) -> list[dict]:
    """One record per annotation: ``{"image_id", "image" (its images[] entry), "png", "segments"}``
    with ``segments`` = ``[(segment id, contiguous class, iscrowd), ...]``. Unknown category ids and
    missing fields raise :class:`DatasetError` naming the file and the field."""
    if not isinstance(data, dict):
        raise DatasetError("expected a JSON object with images, annotations, categories", file=file)
    images = {}
    for i, im in enumerate(require(data, "images", file)):
        images[require(im, "id", file, f"images[{i}].")] = im
        require(im, "file_name", file, f"images[{i}].")
    to_contiguous = {d: k for k, d in enumerate(meta.dataset_ids)}
    records = []
    for i, ann in enumerate(require(data, "annotations", file)):
        where = f"annotations[{i}]."
        image_id = require(ann, "image_id", file, where)
        if image_id not in images:
            raise DatasetError(
                f"image_id {image_id!r} is not in images", file=file, field=where + "image_id"
            )
        segments = []
        for j, seg in enumerate(require(ann, "segments_info", file, where)):
            w = f"{where}segments_info[{j}]."
            cat = require(seg, "category_id", file, w)
            if cat not in to_contiguous:
                raise DatasetError(
                    f"unknown category id {cat} (known: {sorted(to_contiguous)})",
                    file=file,
                    field=w + "category_id",
                )
            seg_id = require(seg, "id", file, w)
            if not isinstance(seg_id, int) or isinstance(seg_id, bool):
                raise DatasetError(
                    f"expected an integer segment id, got {seg_id!r}", file=file, field=w + "id"
                )
            segments.append((seg_id, to_contiguous[cat], bool(seg.get("iscrowd", 0))))
        records.append(
            {
                "image_id": image_id,
                "image": images[image_id],
                "png": require(ann, "file_name", file, where),
                "segments": segments,
            }
        )
    return records
