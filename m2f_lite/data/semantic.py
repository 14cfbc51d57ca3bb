"""Semantic segmentation from label PNGs: one image, one class map per image.

The generic reader behind ADE20K SceneParsing, Cityscapes semantic, COCO's ``panoptic_semseg`` and
the shapes ``semantic_{split}`` folder. A ``label_map`` look-up table turns the values stored in the
PNG into contiguous class ids (ADE20K: 0 -> 255 ignore, k -> k - 1; Cityscapes: label id ->
train id); a stored value the table does not know is refused with the file name, never guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2f_lite.data.base import SegmentationDataset, check_label_values
from m2f_lite.data.files import DatasetError, read_image, read_label_png
from m2f_lite.data.meta import DatasetMeta

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
UNKNOWN = -1  # a label_map entry for stored values that must not occur


def pair_by_stem(
    image_dir: str | Path, label_dir: str | Path, *, label_ext: str = ".png"
) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs matched by file stem, sorted; an image without a label is an error."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for d, what in ((image_dir, "image folder"), (label_dir, "label folder")):
        if not d.is_dir():
            raise DatasetError(f"missing {what} (no such directory)", file=d)
    pairs = []
    for img in sorted(p for p in image_dir.iterdir() if p.suffix in IMAGE_EXTENSIONS):
        label = label_dir / (img.stem + label_ext)
        if not label.is_file():
            raise DatasetError(f"missing label file for image {img.name}", file=label)
        pairs.append((img, label))
    if not pairs:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS[:3])}) found", file=image_dir)
    return pairs


class SemanticDataset(SegmentationDataset):
    """``(image, label PNG)`` pairs; targets are one mask per class present (255 = ignore)."""

    task = "semantic"

    def __init__(
        self,
        *,
        pairs: list[tuple[Path, Path]],
        meta: DatasetMeta,
        transforms=None,
        label_map: np.ndarray | None = None,
        ignore_label: int = 255,
        image_ids: list | None = None,
    ):
        """``label_map[v]`` is the contiguous class of stored value ``v`` (``ignore_label`` to
        ignore, ``UNKNOWN`` = -1 to refuse); ``None`` means the PNG already holds contiguous ids.
        ``image_ids`` default to the image file stems."""
        super().__init__(meta=meta, transforms=transforms, ignore_label=ignore_label)
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.image_ids = (
            list(image_ids) if image_ids is not None else [a.stem for a, _ in self.pairs]
        )
        if len(self.image_ids) != len(self.pairs):
            raise ValueError(f"{len(self.image_ids)} image_ids for {len(self.pairs)} images")
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        sem = self.read_labels(label_path)
        return {
            "image": read_image(image_path),
            "sem_seg": sem,
            "image_id": self.image_ids[index],
            "file_name": image_path,
        }

    def read_labels(self, label_path: Path) -> np.ndarray:
        """The label PNG as contiguous class ids ``[H, W]``, values checked."""
        stored = read_label_png(label_path)
        if self.label_map is None:
            sem = stored
        else:
            lut = self.label_map
            if stored.size and stored.max() >= len(lut):
                lut = np.concatenate([lut, np.full(int(stored.max()) + 1 - len(lut), UNKNOWN)])
            sem = lut[stored]
            if (sem == UNKNOWN).any():
                bad = np.unique(stored[sem == UNKNOWN])[:10].tolist()
                raise DatasetError(
                    f"stored label values {bad} have no class",
                    file=label_path,
                    field="pixel values",
                )
        check_label_values(sem, self.meta.num_classes, self.ignore_label, label_path)
        return sem
