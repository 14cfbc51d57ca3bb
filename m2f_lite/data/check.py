"""``m2f-lite data check PATH``: validate a dataset folder and report every problem at once.

Formats (``--format``, or detected from the files found under PATH):

- ``coco_panoptic``: ``panoptic_{split}.json`` + ``panoptic_{split}/`` PNGs + images, either in the
  one-folder layout (``images/{split}/``, as the shapes dataset and ``coco_custom``) or in COCO's
  (``annotations/panoptic_{split}.json``, ``panoptic_{split}/``, ``{split}/``);
- ``coco_instance``: ``instances_{split}.json`` (same two layouts) + images;
- ``semantic``: ``images/{split}/`` + ``semantic_{split}/`` label PNGs, or ADE20K's
  ``images/{training,validation}`` + ``annotations/{training,validation}`` (values 0..150).

Each problem names its file and field and has a severity: ``error`` (reading, training or
evaluation would fail or be wrong), ``warning`` (readable, but suspicious: an image without
segments, an empty mask, a wrong area) or ``info`` (handled when read: grayscale, RGBA or 16-bit
images are converted, EXIF rotation is applied). The command exits non-zero if any error is found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from m2f_lite.data.coco_instance import decode_segmentation
from m2f_lite.data.files import (
    DatasetError,
    image_mode_note,
    read_json,
    read_label_png,
    read_panoptic_png,
)
from m2f_lite.data.semantic import IMAGE_EXTENSIONS

FORMATS = ("auto", "coco_panoptic", "coco_instance", "semantic")
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning" | "info"
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.file, self.field) if x)
        return f"{self.severity}: {where}: {self.message}"


class Report:
    """The problems found, each once (an image used by several annotation files is reported once)."""

    def __init__(self):
        self.problems: list[Problem] = []
        self._seen: set[Problem] = set()
        self.opened: dict[Path, tuple[int, int] | None] = {}  # image -> upright (h, w) or None

    def add(self, severity: str, file, field: str, message: str) -> None:
        p = Problem(severity, str(file), field, message)
        if p not in self._seen:
            self._seen.add(p)
            self.problems.append(p)

    def error(self, file, field: str, message: str) -> None:
        self.add("error", file, field, message)

    def warning(self, file, field: str, message: str) -> None:
        self.add("warning", file, field, message)

    def info(self, file, field: str, message: str) -> None:
        self.add("info", file, field, message)

    def count(self, severity: str) -> int:
        return sum(p.severity == severity for p in self.problems)


def check_image(
    path: Path, report: Report, *, size: tuple[int, int] | None = None, what: str = "image"
):
    """Open an image fully; report missing/corrupt files, mode conversions, EXIF rotation and a
    size (after rotation) different from ``size`` = (height, width). Returns (h, w) or None."""
    if path not in report.opened:
        report.opened[path] = _open_image(path, report, what)
    if report.opened[path] is None:
        return None
    h, w = report.opened[path]
    if size is not None and (h, w) != tuple(size):
        report.error(
            path, "height/width", f"image is {h}x{w} but the annotation says {size[0]}x{size[1]}"
        )
    return h, w


def _open_image(path: Path, report: Report, what: str) -> tuple[int, int] | None:
    if not path.is_file():
        report.error(path, "", f"missing {what} (no such file)")
        return None
    try:
        with Image.open(path) as img:
            img.load()
            note, orientation = image_mode_note(img), img.getexif().get(0x0112, 1)
            w, h = img.size
    except Image.DecompressionBombError as e:  # > 2 x Image.MAX_IMAGE_PIXELS: not decoded
        report.error(path, "", f"{what} too large to decode ({e})")
        return None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        report.error(path, "", f"corrupt or truncated {what} ({e})")
        return None
    if note and what == "image":  # label PNGs are single-channel (semantic) or RGB (panoptic)
        report.info(path, "mode", note)
    if orientation != 1:
        report.info(path, "EXIF", f"orientation {orientation}: readers rotate the image upright")
        if orientation in ROTATED:
            h, w = w, h
    return h, w


def _load_json(path: Path, report: Report, keys: tuple[str, ...]):
    try:
        data = read_json(path)
    except DatasetError as e:
        report.error(path, e.field or "", str(e).split(": ", 1)[-1])
        return None
    if not isinstance(data, dict):
        report.error(path, "", "expected a JSON object")
        return None
    missing = [k for k in keys if not isinstance(data.get(k), list)]
    for k in missing:
        report.error(path, k, "missing field (a list)")
    return None if missing else data


def _categories(data: dict, path: Path, report: Report) -> dict:
    cats = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            report.error(path, f"categories[{i}].id", "missing field")
        elif c["id"] in cats:
            report.error(path, f"categories[{i}].id", f"duplicate category id {c['id']}")
        else:
            cats[c["id"]] = c
    return cats


def _images(data: dict, path: Path, report: Report) -> dict:
    if not data["images"]:  # training would have nothing to draw, evaluation nothing to score
        report.error(path, "images", "no images: the split is empty")
    images = {}
    for i, im in enumerate(data["images"]):
        missing = [k for k in ("id", "file_name") if not isinstance(im, dict) or k not in im]
        for k in missing:
            report.error(path, f"images[{i}].{k}", "missing field")
        if not missing:
            images[im["id"]] = im
    return images


def _size(im: dict):
    return (im["height"], im["width"]) if "height" in im and "width" in im else None


def check_panoptic(
    jp: Path, png_root: Path, image_root: Path, report: Report, limit: int | None = None
) -> None:
    data = _load_json(jp, report, ("images", "annotations", "categories"))
    if data is None:
        return
    cats, images = _categories(data, jp, report), _images(data, jp, report)
    annotated = set()
    for i, ann in enumerate(data["annotations"][:limit]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or any(
            k not in ann for k in ("image_id", "file_name", "segments_info")
        ):
            report.error(jp, where, "needs image_id, file_name and segments_info")
            continue
        im = images.get(ann["image_id"])
        annotated.add(ann["image_id"])
        if im is None:
            report.error(jp, f"{where}.image_id", f"image_id {ann['image_id']!r} is not in images")
            continue
        hw = check_image(image_root / im["file_name"], report, size=_size(im))
        segs = ann["segments_info"]
        if not any(not s.get("iscrowd", 0) for s in segs if isinstance(s, dict)):
            report.warning(
                jp, f"{where}.segments_info", f"image {im['file_name']} has no (non-crowd) segments"
            )
        ids = Counter(s.get("id") for s in segs if isinstance(s, dict))
        for j, s in enumerate(segs):
            if not isinstance(s, dict) or "id" not in s or "category_id" not in s:
                report.error(jp, f"{where}.segments_info[{j}]", "needs id and category_id")
            elif s["category_id"] not in cats:
                report.error(
                    jp,
                    f"{where}.segments_info[{j}].category_id",
                    f"unknown category id {s['category_id']}",
                )
            if isinstance(s, dict) and ids[s.get("id")] > 1:
                report.error(
                    jp, f"{where}.segments_info[{j}].id", f"duplicate segment id {s['id']}"
                )
        png = png_root / ann["file_name"]
        if check_image(png, report, size=hw, what="panoptic PNG") is None:
            continue
        try:
            pan = read_panoptic_png(png)
        except DatasetError as e:
            report.error(png, e.field or "", str(e).split(": ")[-1])
            continue
        present, counts = np.unique(pan, return_counts=True)
        area = dict(zip(present.tolist(), counts.tolist()))
        for j, s in enumerate(segs):
            if not isinstance(s, dict) or "id" not in s:
                continue
            if s["id"] not in area:
                report.error(
                    png,
                    f"segment {s['id']}",
                    f"in the JSON ({where}.segments_info[{j}]) but not in the PNG (a mask of 0 px)",
                )
            elif "area" in s and s["area"] != area[s["id"]]:
                report.warning(
                    jp,
                    f"{where}.segments_info[{j}].area",
                    f"{s['area']} but the PNG has {area[s['id']]} px",
                )
        for v in sorted(set(area) - set(ids) - {0}):
            report.error(
                png,
                f"segment {v}",
                f"in the PNG ({area[v]} px) but not in the JSON ({where}.segments_info)",
            )
    for image_id in sorted(set(images) - annotated, key=str)[: limit or None]:
        report.warning(
            jp, "images", f"image {images[image_id]['file_name']} has no annotation entry"
        )


def check_instances(jp: Path, image_root: Path, report: Report, limit: int | None = None) -> None:
    data = _load_json(jp, report, ("images", "annotations", "categories"))
    if data is None:
        return
    cats, images = _categories(data, jp, report), _images(data, jp, report)
    by_image: dict = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or any(
            k not in ann for k in ("image_id", "category_id", "segmentation")
        ):
            report.error(jp, where, "needs image_id, category_id and segmentation")
        elif ann["image_id"] not in images:
            report.error(jp, f"{where}.image_id", f"image_id {ann['image_id']!r} is not in images")
        elif ann["category_id"] not in cats:
            report.error(jp, f"{where}.category_id", f"unknown category id {ann['category_id']}")
        else:
            by_image[ann["image_id"]].append((i, ann))
    for image_id, anns in list(by_image.items())[:limit]:
        im = images[image_id]
        hw = check_image(image_root / im["file_name"], report, size=_size(im))
        if not any(not a.get("iscrowd", 0) for _, a in anns):
            report.warning(
                jp, "annotations", f"image {im['file_name']} has no (non-crowd) instances"
            )
        if hw is None:
            continue
        for i, a in anns:
            try:
                mask = decode_segmentation(
                    a["segmentation"], *hw, file=jp, field=f"annotations[{i}].segmentation"
                )
            except (DatasetError, ValueError, TypeError) as e:
                report.error(jp, f"annotations[{i}].segmentation", str(e).split(": ")[-1])
                continue
            if not mask.any():
                report.warning(jp, f"annotations[{i}].segmentation", "empty mask (< 1 px)")


def check_semantic(
    image_dir: Path,
    label_dir: Path,
    report: Report,
    *,
    num_classes: int | None,
    offset: int = 0,
    limit: int | None = None,
) -> None:
    """``offset`` = 1 for ADE20K (stored 0 = ignore, k = class k - 1)."""
    for d in (image_dir, label_dir):
        if not d.is_dir():
            report.error(d, "", "missing folder")
            return
    images = sorted(p for p in image_dir.iterdir() if p.suffix in IMAGE_EXTENSIONS)[:limit]
    if not images:
        report.error(image_dir, "", "no images: the split is empty")
    stems = {p.stem for p in images}
    for label in sorted(label_dir.glob("*.png")):
        if label.stem not in stems and limit is None:
            report.warning(label, "", "label file without an image")
    for img in images:
        hw = check_image(img, report)
        label = label_dir / f"{img.stem}.png"
        if check_image(label, report, size=hw, what="label PNG") is None:
            continue
        try:
            values = np.unique(read_label_png(label))
        except DatasetError as e:
            report.error(label, e.field or "", str(e).split(": ")[-1])
            continue
        classes = values - offset if offset else values
        ignore = (values == 0) if offset else (values == 255)
        if num_classes is not None:
            bad = values[((classes < 0) | (classes >= num_classes)) & ~ignore]
            if len(bad):
                report.error(
                    label,
                    "pixel values",
                    f"class ids {bad[:10].tolist()} >= num_classes ({num_classes})",
                )
        if ignore.all():
            report.warning(label, "", "every pixel is ignored (no segments)")


def _split_of(path: Path, prefix: str) -> str:
    return path.stem[len(prefix) :]


def check(
    path: str | Path, *, fmt: str = "auto", num_classes: int | None = None, limit: int | None = None
) -> Report:
    """Check everything found under ``path``; see the module docstring."""
    path, report = Path(path), Report()
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not path.is_dir():
        report.error(path, "", "missing dataset folder (no such directory)")
        return report
    found = 0
    for ann_dir in (path, path / "annotations"):
        coco_layout = ann_dir != path
        if fmt in ("auto", "coco_panoptic"):
            for js in sorted(ann_dir.glob("panoptic_*.json")):
                split = _split_of(js, "panoptic_")
                images = path / split if coco_layout else path / "images" / split
                check_panoptic(js, path / f"panoptic_{split}", images, report, limit)
                found += 1
        if fmt in ("auto", "coco_instance"):
            for js in sorted(ann_dir.glob("instances_*.json")):
                split = _split_of(js, "instances_")
                check_instances(
                    js, path / split if coco_layout else path / "images" / split, report, limit
                )
                found += 1
    if fmt in ("auto", "semantic"):
        k = num_classes
        for sem in sorted(p for p in path.glob("semantic_*") if p.is_dir()):
            if k is None and (path / f"panoptic_{_split_of(sem, 'semantic_')}.json").exists():
                data = _load_json(
                    path / f"panoptic_{_split_of(sem, 'semantic_')}.json", Report(), ("categories",)
                )
                k = len(data["categories"]) if data else None
            check_semantic(
                path / "images" / _split_of(sem, "semantic_"),
                sem,
                report,
                num_classes=k,
                limit=limit,
            )
            found += 1
        for split in ("training", "validation"):  # ADE20K SceneParsing
            if (path / "annotations" / split).is_dir():
                check_semantic(
                    path / "images" / split,
                    path / "annotations" / split,
                    report,
                    num_classes=num_classes or 150,
                    offset=1,
                    limit=limit,
                )
                found += 1
    if not found:
        report.error(
            path, "", f"no annotations found for format {fmt!r} (see `m2f-lite data check --help`)"
        )
    return report


def main(
    path: str, *, fmt: str = "auto", num_classes: int | None = None, limit: int | None = None
) -> int:
    """Print every problem and a summary; return the exit code (1 if any error)."""
    report = check(path, fmt=fmt, num_classes=num_classes, limit=limit)
    for p in report.problems:
        print(p)
    e, w, i = (report.count(s) for s in ("error", "warning", "info"))
    print(f"{path}: {e} error(s), {w} warning(s), {i} note(s)")
    return 1 if e else 0
