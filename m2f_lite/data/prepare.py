"""``m2f-lite data prepare NAME``: derived annotation files the official recipes expect.

- ``coco``: unpacks ``annotations/panoptic_{train,val}2017.zip`` into ``coco/panoptic_{split}2017/``,
  then writes ``coco/panoptic_semseg_{split}2017/*.png``, the semantic labels derived from the
  panoptic ones as the official ``datasets/prepare_coco_semantic_annos_from_panoptic_annos.py``:
  every segment (crowd included) takes its contiguous class 0..132, void stays 255.
- ``cityscapes``: for each ``*_gtFine_labelIds.png`` a ``*_gtFine_labelTrainIds.png`` (as
  cityscapesScripts' ``createTrainIdLabelImgs.py``), and the COCO-format panoptic files
  ``gtFine/cityscapes_panoptic_{split}.json`` + ``gtFine/cityscapes_panoptic_{split}/`` (as its
  ``createPanopticImgs.py``: segment id = the ``instanceIds`` value, category id = label id,
  values < 1000 of classes with instances are crowd, classes ignored in evaluation are void).
- ``ade20k``: nothing to convert for semantic segmentation (the reader maps labels on the fly).

No cityscapesScripts or panopticapi needed. Finished files are skipped and every file is written
atomically, so an interrupted run can simply be started again.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m2f_lite.atomic_io import atomic_write_bytes
from m2f_lite.data.base import panoptic_to_semantic
from m2f_lite.data.categories import CITYSCAPES_LABELS
from m2f_lite.data.coco_panoptic import coco_panoptic_meta, parse_panoptic_json
from m2f_lite.data.download import extract
from m2f_lite.data.files import (
    DatasetError,
    id2rgb,
    read_json,
    read_label_png,
    read_panoptic_png,
)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _semseg_one(job: tuple[Path, Path, list[tuple[int, int, bool]]]) -> None:
    png, out, segments = job
    pan = torch.from_numpy(read_panoptic_png(png))  # [H, W]
    ids = torch.tensor([s[0] for s in segments], dtype=torch.long)
    cls = torch.tensor([s[1] for s in segments], dtype=torch.long)
    sem = panoptic_to_semantic(pan, ids, cls, 255).numpy().astype(np.uint8)  # [H, W]
    atomic_write_bytes(out, _png_bytes(sem), durable=False)


def panoptic_to_semseg_files(
    panoptic_json: Path, panoptic_root: Path, out_dir: Path, meta, *, workers: int = 1
) -> int:
    """Write one semantic PNG per panoptic annotation; returns how many were written."""
    records = parse_panoptic_json(read_json(panoptic_json), meta, panoptic_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(panoptic_root / r["png"], out_dir / r["png"], r["segments"]) for r in records]
    jobs = [j for j in jobs if not j[1].exists()]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_semseg_one, jobs, chunksize=64):
                pass
    else:
        for j in jobs:
            _semseg_one(j)
    return len(jobs)


def prepare_coco(
    root: str | Path = "data", *, workers: int = 1, log: Callable[[str], None] = print
) -> Path:
    coco = Path(root) / "coco"
    done = 0
    for split in ("train2017", "val2017"):
        pjson, proot = coco / "annotations" / f"panoptic_{split}.json", coco / f"panoptic_{split}"
        zipped = coco / "annotations" / f"panoptic_{split}.zip"
        if not proot.is_dir() and zipped.exists():
            log(f"{zipped.name}: extracting into {coco}")
            extract(zipped, coco)
        if not pjson.exists() or not proot.is_dir():
            log(f"{split}: no panoptic annotations ({pjson}, {proot}); skipped")
            continue
        n = panoptic_to_semseg_files(
            pjson, proot, coco / f"panoptic_semseg_{split}", coco_panoptic_meta(), workers=workers
        )
        log(f"{split}: wrote {n} semantic PNGs to {coco / f'panoptic_semseg_{split}'}")
        done += 1
    if done == 0:
        raise DatasetError(
            "no COCO panoptic annotations found; run `m2f-lite data download coco` first", file=coco
        )
    return coco


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def cityscapes_panoptic_split(city_root: Path, split: str) -> Path:
    """Write ``gtFine/cityscapes_panoptic_{split}.json`` + PNGs from the ``instanceIds`` PNGs."""
    labels = {lb[1]: lb for lb in CITYSCAPES_LABELS if lb[1] >= 0}
    categories = [
        {"id": lb[1], "name": lb[0], "color": list(lb[6]), "supercategory": lb[3], "isthing": lb[4]}
        for lb in CITYSCAPES_LABELS
        if not lb[5]
    ]
    out_dir = city_root / "gtFine" / f"cityscapes_panoptic_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted((city_root / "gtFine" / split).glob("*/*_gtFine_instanceIds.png"))
    if not files:
        raise DatasetError("no *_gtFine_instanceIds.png found", file=city_root / "gtFine" / split)
    images, annotations = [], []
    for f in files:
        inst = read_label_png(f)  # [H, W]
        stem = f.name[: -len("_gtFine_instanceIds.png")]
        pan = np.zeros_like(inst)
        segments = []
        for v in np.unique(inst).tolist():
            label_id, crowd = (v, 1) if v < 1000 else (v // 1000, 0)
            if label_id not in labels:
                raise DatasetError(
                    f"value {v} has unknown label id {label_id}", file=f, field="pixel values"
                )
            lb = labels[label_id]
            if lb[5]:  # ignored in evaluation: void
                continue
            mask = inst == v
            pan[mask] = v
            segments.append(
                {
                    "id": int(v),
                    "category_id": label_id,
                    "area": int(mask.sum()),
                    "bbox": _bbox(mask),
                    "iscrowd": crowd if lb[4] else 0,
                }
            )
        atomic_write_bytes(
            out_dir / f"{stem}_gtFine_panoptic.png", _png_bytes(id2rgb(pan)), durable=False
        )
        images.append(
            {
                "id": stem,
                "width": int(inst.shape[1]),
                "height": int(inst.shape[0]),
                "file_name": f"{stem}_leftImg8bit.png",
            }
        )
        annotations.append(
            {
                "image_id": stem,
                "file_name": f"{stem}_gtFine_panoptic.png",
                "segments_info": segments,
            }
        )
    out = city_root / "gtFine" / f"cityscapes_panoptic_{split}.json"
    atomic_write_bytes(
        out,
        json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}
        ).encode(),
        durable=False,
    )
    return out


def cityscapes_train_ids(city_root: Path, split: str) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png``."""
    from m2f_lite.data.cityscapes import label_id_to_train_id

    lut = label_id_to_train_id()
    n = 0
    for f in sorted((city_root / "gtFine" / split).glob("*/*_gtFine_labelIds.png")):
        out = f.with_name(f.name.replace("_labelIds.png", "_labelTrainIds.png"))
        if out.exists():
            continue
        ids = read_label_png(f)
        if ids.max(initial=0) >= len(lut) or (lut[ids] < 0).any():
            raise DatasetError(
                "label ids outside the Cityscapes table", file=f, field="pixel values"
            )
        atomic_write_bytes(out, _png_bytes(lut[ids].astype(np.uint8)), durable=False)
        n += 1
    return n


def prepare_cityscapes(
    root: str | Path = "data", *, splits=("train", "val"), log: Callable[[str], None] = print
) -> Path:
    city = Path(root) / "cityscapes"
    if not (city / "gtFine").is_dir():
        raise DatasetError(
            "missing gtFine/; run `m2f-lite data download cityscapes` for the steps", file=city
        )
    for split in splits:
        if not (city / "gtFine" / split).is_dir():
            log(f"{split}: no gtFine/{split}; skipped")
            continue
        log(f"{split}: wrote {cityscapes_train_ids(city, split)} labelTrainIds PNGs")
        log(f"{split}: wrote {cityscapes_panoptic_split(city, split)}")
    return city


def prepare_ade20k(root: str | Path = "data", *, log: Callable[[str], None] = print) -> Path:
    ade = Path(root) / "ADEChallengeData2016"
    for d in (
        "images/training",
        "images/validation",
        "annotations/training",
        "annotations/validation",
    ):
        if not (ade / d).is_dir():
            raise DatasetError(f"missing {d}/; run `m2f-lite data download ade20k` first", file=ade)
    log(
        f"ade20k: {ade} is ready for semantic segmentation (labels are mapped when read). For "
        "panoptic, run the official datasets/prepare_ade20k_pan_seg.py (it needs annotations_instance.tar)."
    )
    return ade


def prepare(
    name: str, root: str | Path = "data", *, workers: int = 1, log: Callable[[str], None] = print
) -> Path:
    if name == "coco":
        return prepare_coco(root, workers=workers, log=log)
    if name == "cityscapes":
        return prepare_cityscapes(root, log=log)
    if name == "ade20k":
        return prepare_ade20k(root, log=log)
    raise ValueError(f"unknown dataset {name!r}: expected one of coco, ade20k, cityscapes")
