"""ADE20K (Zhou et al., 2017): the 150-class SceneParsing benchmark, semantic and panoptic.

Folder layout (``m2f-lite data download ade20k`` fetches ``ADEChallengeData2016.zip``)::

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg
      annotations/{training,validation}/ADE_*.png    uint8: 0 = "other" (ignored), 1..150 = classes
      objectInfo150.txt
      # panoptic (optional), made by the official datasets/prepare_ade20k_pan_seg.py from the
      # SceneParsing annotations + annotations_instance/: COCO panoptic format, category id = class index
      ade20k_panoptic_{train,val}.json
      ade20k_panoptic_{train,val}/*.png

Semantic labels follow the official ``prepare_ade20k_sem_seg.py``: stored value 0 -> 255 (ignore),
``k`` -> ``k - 1``; a stored value above 150 is an error. The panoptic files are read by the COCO
panoptic reader with ADE20K's class table (100 things, 50 stuff, as the official split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2f_lite.data.categories import ADE20K_150_CATEGORIES
from m2f_lite.data.coco_panoptic import COCOPanopticDataset
from m2f_lite.data.meta import DatasetMeta
from m2f_lite.data.semantic import UNKNOWN, SemanticDataset, pair_by_stem

SPLIT_DIRS = {
    "train": "training",
    "val": "validation",
    "training": "training",
    "validation": "validation",
}


def ade20k_meta() -> DatasetMeta:
    """The 150 classes; ``dataset_ids`` are the panoptic JSON's category ids (0..149)."""
    return DatasetMeta(
        name="ade20k",
        classes=[c[0] for c in ADE20K_150_CATEGORIES],
        is_thing=[bool(c[1]) for c in ADE20K_150_CATEGORIES],
        dataset_ids=list(range(len(ADE20K_150_CATEGORIES))),
        colors=[c[2] for c in ADE20K_150_CATEGORIES],
    )


def ade20k_label_map(num_classes: int = 150) -> np.ndarray:
    """Stored value -> contiguous class: 0 -> 255, 1..150 -> 0..149, anything above refused."""
    lut = np.full(256, UNKNOWN, dtype=np.int64)
    lut[0] = 255
    lut[1 : num_classes + 1] = np.arange(num_classes)
    return lut


def _split_dir(split: str) -> str:
    if split not in SPLIT_DIRS:
        raise ValueError(f"ADE20K split {split!r}: expected one of {sorted(SPLIT_DIRS)}")
    return SPLIT_DIRS[split]


def ade20k_semantic(root: str | Path, split: str, *, transforms=None) -> SemanticDataset:
    """SceneParsing images + annotations of ``split`` (train/val or training/validation)."""
    root, d = Path(root), _split_dir(split)
    pairs = pair_by_stem(root / "images" / d, root / "annotations" / d)
    return SemanticDataset(
        pairs=pairs, meta=ade20k_meta(), transforms=transforms, label_map=ade20k_label_map()
    )


def ade20k_panoptic(
    root: str | Path, split: str, *, transforms=None, filter_empty: bool = False
) -> COCOPanopticDataset:
    """The official ADE20K panoptic files (``ade20k_panoptic_{train,val}.json`` + PNGs)."""
    root, d = Path(root), _split_dir(split)
    short = "train" if d == "training" else "val"
    return COCOPanopticDataset(
        image_root=root / "images" / d,
        panoptic_json=root / f"ade20k_panoptic_{short}.json",
        panoptic_root=root / f"ade20k_panoptic_{short}",
        meta=ade20k_meta(),
        transforms=transforms,
        filter_empty=filter_empty,
    )
