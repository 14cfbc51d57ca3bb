"""The synthetic "shapes" dataset: the book's running example, written in the real COCO formats.

Each image has 1-3 "stuff" regions (sky-like gradient, grass-like noise, water-like stripes) split
by wavy horizon lines, and 1-6 "thing" instances (circle, square, triangle, star) drawn on top in
random order, so later shapes occlude earlier ones. Shape colours are drawn from the whole colour
wheel, so a model must learn shape, not colour; the stuff textures share hues, so it must learn
texture too. A small fraction of pixels is void (the slivers left of a shape hidden almost
entirely, and in some images a 1-pixel unlabelled band along a horizon line), and a few images
hold a crowd segment (a cluster of small shapes annotated as one ``iscrowd`` region), as in COCO.

Layout written under ``out`` (``{split}`` is ``train`` or ``val``)::

    images/{split}/000000.png     RGB images
    panoptic_{split}.json         COCO panoptic: images, annotations (segments_info), categories
    panoptic_{split}/000000.png   segment ids as RGB: id = R + 256 G + 256^2 B, 0 = void
    instances_{split}.json        COCO instances (things only, RLE masks, crowd flagged)
    semantic_{split}/000000.png   uint8 contiguous class ids 0..6, 255 = void

Category ids are not contiguous on purpose (things 1-4, stuff 101-103), as COCO's are, so the
contiguous <-> dataset id mapping (``DatasetMeta.dataset_ids``) is exercised. Every image draws its
randomness from ``numpy.random.default_rng([seed, split, index])``: the output is a function of
the seed alone, whatever order (or process) the images are made in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from m2f_lite.atomic_io import atomic_write_bytes
from m2f_lite.data.files import id2rgb
from m2f_lite.data.meta import DatasetMeta

THINGS = ("circle", "square", "triangle", "star")
STUFF = ("sky", "grass", "water")
THING_IDS = (1, 2, 3, 4)  # dataset category ids of THINGS
STUFF_IDS = (101, 102, 103)  # dataset category ids of STUFF
COLORS = (
    (220, 20, 60),
    (0, 130, 200),
    (255, 180, 0),
    (145, 30, 180),
    (110, 170, 230),
    (60, 180, 75),
    (0, 90, 120),
)
# written first into every folder `generate` fills: the CLI makes shapes data on first use only in
# an empty folder or one that holds this file, never over somebody's own dataset
MARKER = ".m2f_lite_shapes"
# the book's running example (`make` and the chapters make it; m2f_lite.book.SHAPES_ARGS)
SHAPES_ARGS = {"n_train": 500, "n_val": 100, "size": 128, "seed": 0}
MIN_AREA = 12  # a shape left with fewer visible pixels is not annotated: its pixels become void
SPLITS = {"train": 0, "val": 1}


def shapes_meta() -> DatasetMeta:
    """The 7 classes: 4 things (contiguous 0-3), then 3 stuff (4-6), COCO's order."""
    return DatasetMeta(
        name="shapes",
        classes=[*THINGS, *STUFF],
        is_thing=[True] * len(THINGS) + [False] * len(STUFF),
        dataset_ids=[*THING_IDS, *STUFF_IDS],
        colors=list(COLORS),
    )


def _hsv(h, s, v) -> np.ndarray:
    """HSV (each in [0, 1], arrays of one shape or scalars) -> RGB in [0, 255], shape ``[..., 3]``."""
    h, s, v = (np.asarray(a, dtype=np.float64)[..., None] for a in (h, s, v))
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6  # [..., 3]
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _textures(rng: np.random.Generator, size: int) -> np.ndarray:
    """The three stuff textures over the whole image: float ``[3, S, S, 3]`` (sky, grass, water)."""
    y = (np.arange(size) + 0.5)[:, None] / size  # [S, 1]
    x = (np.arange(size) + 0.5)[None, :] / size  # [1, S]
    ones = np.ones((size, size))
    # sky: a smooth vertical gradient between two blue-ish tones
    hue = rng.uniform(0.50, 0.66)
    top = _hsv(hue, rng.uniform(0.35, 0.8), rng.uniform(0.55, 0.85))
    bottom = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.05, 0.35), rng.uniform(0.85, 1.0))
    sky = top + (bottom - top) * (y * ones)[..., None]  # [S, S, 3]
    # grass: green-yellow hue with low-frequency blotches and per-pixel noise
    low = sum(
        np.sin(
            2 * np.pi * (rng.uniform(1, 4) * x * np.cos(a) + rng.uniform(1, 4) * y * np.sin(a))
            + rng.uniform(0, 6.3)
        )
        for a in rng.uniform(0, np.pi, 3)
    )  # [S, S]
    grass = _hsv(
        rng.uniform(0.20, 0.40) + 0.02 * low,
        np.clip(rng.uniform(0.45, 0.8) + 0.05 * low, 0, 1),
        np.clip(rng.uniform(0.35, 0.7) + 0.06 * low + rng.normal(0, 0.09, (size, size)), 0, 1),
    )
    # water: horizontal stripes with a wobble, between two blue-green tones
    period = rng.uniform(4, 10) / size
    wobble = 0.3 * np.sin(2 * np.pi * (x * rng.uniform(1, 3)) + rng.uniform(0, 6.3))
    t = 0.5 + 0.5 * np.sin(2 * np.pi * y / period + wobble)  # [S, S]
    hue = rng.uniform(0.47, 0.64)
    dark = _hsv(hue, rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.55))
    light = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.2, 0.6), rng.uniform(0.6, 0.9))
    water = dark + (light - dark) * t[..., None]
    return np.stack([sky, grass, water])


def _polygon_mask(vertices: np.ndarray, size: int) -> np.ndarray:
    """Pixels whose centres lie inside a polygon (even-odd rule): bool ``[S, S]``; ``vertices`` ``[V, 2]`` (x, y)."""
    lo = np.clip(np.floor(vertices.min(0)).astype(int), 0, size)
    hi = np.clip(np.ceil(vertices.max(0)).astype(int) + 1, 0, size)
    mask = np.zeros((size, size), dtype=bool)
    if (hi <= lo).any():
        return mask
    px = (np.arange(lo[0], hi[0]) + 0.5)[None, :]  # [1, w]
    py = (np.arange(lo[1], hi[1]) + 0.5)[:, None]  # [h, 1]
    inside = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y1 > py) != (y2 > py)  # [h, 1]: the edge spans this row
        x_at = x1 + (x2 - x1) * (py - y1) / (y2 - y1 if y2 != y1 else 1e-12)  # [h, 1]
        inside ^= crosses & (px < x_at)
    mask[lo[1] : hi[1], lo[0] : hi[0]] = inside
    return mask


def _shape_mask(kind: int, cx: float, cy: float, r: float, theta: float, size: int) -> np.ndarray:
    """A filled circle / square / triangle / star of "radius" ``r``: bool ``[S, S]``."""
    if kind == 0:
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.9 * r) ** 2
    if kind == 3:  # star: 10 vertices, alternating outer and inner radius
        radii = np.where(np.arange(10) % 2 == 0, 1.2 * r, 0.5 * r)
        angles = theta + np.arange(10) * np.pi / 5
    else:  # regular square (4) or triangle (3)
        n = 4 if kind == 1 else 3
        radii = np.full(n, r if n == 4 else 1.15 * r)
        angles = theta + np.arange(n) * 2 * np.pi / n
    vertices = np.stack(
        [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1
    )  # [V, 2]
    return _polygon_mask(vertices, size)


def render(index: int, *, size: int = 128, seed: int = 0, split: str = "train"):
    """One image and its panoptic annotation.

    Returns ``(image, pan, segments)``: uint8 RGB ``[S, S, 3]``, int64 segment ids ``[S, S]``
    (0 = void) and a list of ``{"id", "category_id", "iscrowd"}``, one per segment in ``pan``.
    """
    rng = np.random.default_rng([seed, SPLITS[split], index])
    s = size
    # --- stuff: 1-3 distinct classes stacked top to bottom, separated by wavy horizon lines
    n_regions = int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.30]))
    order = rng.permutation(len(STUFF))[:n_regions]
    xs = np.arange(s) + 0.5
    region = np.zeros((s, s), dtype=np.int64)
    yy = (np.arange(s) + 0.5)[:, None]
    for b in np.sort(rng.uniform(0.2, 0.8, n_regions - 1)) * s:
        amp, freq, phase = rng.uniform(0, 0.07 * s), rng.uniform(0.5, 2.5), rng.uniform(0, 6.3)
        line = b + amp * np.sin(2 * np.pi * freq * xs / s + phase)  # [S]
        region += yy >= line[None, :]  # [S, S]: how many horizon lines lie above the pixel
    stuff_class = order[region]  # [S, S], index into STUFF
    textures = _textures(rng, s)  # [3, S, S, 3]
    image = np.take_along_axis(textures, stuff_class[None, :, :, None], axis=0)[0]  # [S, S, 3]
    owner = np.zeros((s, s), dtype=np.int64)  # 0 = stuff, k = the k-th thing drawn
    horizon = np.zeros((s, s), dtype=bool)
    if n_regions > 1 and rng.random() < 0.3:  # annotators left the horizon unlabelled
        horizon[:-1] = region[:-1] != region[1:]

    # --- things: a crowd cluster sometimes, then 1-6 shapes drawn in order (later ones on top)
    things = []  # (kind, iscrowd)
    if rng.random() < 0.06:
        kind, n = int(rng.integers(4)), int(rng.integers(4, 8))
        centre = rng.uniform(0.2 * s, 0.8 * s, 2)
        colour = _hsv(rng.random(), rng.uniform(0.4, 1), rng.uniform(0.4, 1))
        crowd = np.zeros((s, s), dtype=bool)
        for _ in range(n):
            cx, cy = centre + rng.normal(0, 0.06 * s, 2)
            crowd |= _shape_mask(kind, cx, cy, rng.uniform(0.03, 0.05) * s, rng.uniform(0, 6.3), s)
        things.append((kind, 1))
        owner[crowd], image[crowd] = len(things), colour
    for _ in range(int(rng.integers(1, 7))):
        kind = int(rng.integers(4))
        r = rng.uniform(0.07, 0.22) * s
        cx, cy = rng.uniform(0.05 * s, 0.95 * s, 2)
        m = _shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * np.pi), s)
        if not m.any():
            continue
        colour = _hsv(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0))  # [3]
        lit = rng.uniform(-20, 20) * (np.arange(s) + 0.5 - cx) / r  # [S]: one side lit, x-wise
        shade = np.broadcast_to(lit[None, :], (s, s))  # [S, S]
        things.append((kind, 0))
        owner[m] = len(things)
        image[m] = colour + shade[m][:, None]

    # --- segments: stuff id = category * 1000, thing id = category * 1000 + running count
    pan = np.zeros((s, s), dtype=np.int64)
    void = horizon & (owner == 0)  # the band is void where stuff shows, not across shapes
    segments = []
    for c in np.unique(stuff_class[owner == 0]):
        pan[(owner == 0) & (stuff_class == c)] = STUFF_IDS[c] * 1000
        segments.append({"id": STUFF_IDS[c] * 1000, "category_id": STUFF_IDS[c], "iscrowd": 0})
    areas = np.bincount(owner.ravel(), minlength=len(things) + 1)
    count = [0] * len(THINGS)
    for k, (kind, iscrowd) in enumerate(things, start=1):
        if areas[k] < MIN_AREA:  # hidden (almost) entirely: an unlabelled sliver
            void |= owner == k
            continue
        count[kind] += 1
        seg_id = THING_IDS[kind] * 1000 + count[kind]
        pan[owner == k] = seg_id
        segments.append({"id": seg_id, "category_id": THING_IDS[kind], "iscrowd": iscrowd})
    pan[void] = 0
    present = set(np.unique(pan).tolist())
    segments = [sg for sg in segments if sg["id"] in present]

    image = image + rng.normal(0, 3.0, image.shape)  # sensor noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8), pan, segments


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def categories_json() -> tuple[list[dict], list[dict]]:
    """``(panoptic categories, instance categories)`` as written in the JSON files."""
    meta = shapes_meta()
    pan = [
        {
            "id": d,
            "name": n,
            "supercategory": "shape" if t else "background",
            "isthing": int(t),
            "color": list(c),
        }
        for d, n, t, c in zip(meta.dataset_ids, meta.classes, meta.is_thing, meta.colors)
    ]
    ins = [{k: c[k] for k in ("id", "name", "supercategory")} for c in pan if c["isthing"]]
    return pan, ins


def write_split(out: Path, split: str, n: int, *, size: int, seed: int) -> None:
    """Render ``n`` images of ``split`` and write them in all three formats."""
    meta = shapes_meta()
    to_contiguous = {d: k for k, d in enumerate(meta.dataset_ids)}
    for d in (f"images/{split}", f"panoptic_{split}", f"semantic_{split}"):
        (out / d).mkdir(parents=True, exist_ok=True)
    images, pan_annos, ins_annos = [], [], []
    for i in range(n):
        image, pan, segments = render(i, size=size, seed=seed, split=split)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / "images" / split / name, compress_level=1)
        Image.fromarray(id2rgb(pan)).save(out / f"panoptic_{split}" / name, compress_level=1)
        semantic = np.full(pan.shape, 255, dtype=np.uint8)
        for sg in segments:
            mask = pan == sg["id"]
            semantic[mask] = to_contiguous[sg["category_id"]]
            sg["bbox"], sg["area"] = _bbox(mask), int(mask.sum())
            if sg["category_id"] in THING_IDS:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                ins_annos.append(
                    {
                        "id": len(ins_annos) + 1,
                        "image_id": i,
                        "category_id": sg["category_id"],
                        "segmentation": {
                            "size": list(rle["size"]),
                            "counts": rle["counts"].decode("ascii"),
                        },
                        "area": float(sg["area"]),
                        "bbox": [float(v) for v in sg["bbox"]],
                        "iscrowd": sg["iscrowd"],
                    }
                )
        Image.fromarray(semantic).save(out / f"semantic_{split}" / name, compress_level=1)
        images.append({"id": i, "file_name": name, "height": size, "width": size})
        pan_annos.append({"image_id": i, "file_name": name, "segments_info": segments})
    pan_cats, ins_cats = categories_json()
    info = {"description": f"m2f_lite synthetic shapes, split {split}, seed {seed}, size {size}"}
    panoptic = {"info": info, "images": images, "annotations": pan_annos, "categories": pan_cats}
    instances = {"info": info, "images": images, "annotations": ins_annos, "categories": ins_cats}
    atomic_write_bytes(out / f"panoptic_{split}.json", json.dumps(panoptic).encode(), durable=False)
    atomic_write_bytes(
        out / f"instances_{split}.json", json.dumps(instances).encode(), durable=False
    )


def generate(
    out: str | Path, *, n_train: int = 500, n_val: int = 100, size: int = 128, seed: int = 0
) -> Path:
    """Write the train and val splits under ``out`` (and the :data:`MARKER` file, first); returns
    ``out`` as a ``Path``."""
    if size < 16:
        raise ValueError(f"size={size}: the shapes need at least 16 x 16 pixels")
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: expected counts >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    (out / MARKER).write_text(json.dumps({"generator": "m2f_lite.data.synthetic", **args}) + "\n")
    for split, n in (("train", n_train), ("val", n_val)):
        write_split(out, split, n, size=size, seed=seed)
    return out


def ensure_dataset(cfg, splits: tuple[str, ...]) -> None:
    """The synthetic shapes of a config's ``data.root``, made on first use (seconds), so that
    ``m2f-lite train shapes_tiny`` just works (``train`` and ``eval`` call it).

    Only for a shapes dataset, and only into a folder that is absent, empty, or made by the shapes
    generator itself (its ``MARKER`` file): a typo in ``data.root``, a val-only folder or
    somebody's own data is never overwritten; the error names the file that is missing instead.
    """
    import os
    import sys

    if not cfg.data.dataset.startswith("shapes"):
        return
    root = Path(cfg.data.root)
    pattern = {"shapes_instance": "instances_{}.json", "shapes_semantic": "semantic_{}"}.get(
        cfg.data.dataset, "panoptic_{}.json"
    )
    missing = [root / pattern.format(s) for s in splits if not (root / pattern.format(s)).exists()]
    if not missing:
        return
    ours = not root.exists() or (
        root.is_dir() and ((root / MARKER).is_file() or not any(root.iterdir()))
    )
    if not ours:
        raise ValueError(
            f"{missing[0]}: no such file, and {root} was not made by the shapes generator (no "
            f"{MARKER}): not writing shapes data into it; check data.root, or make a "
            "new folder with m2f-lite data synthetic --out DIR"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # not from several processes at once
        raise ValueError(
            f"{root}: no shapes dataset; make it first: m2f-lite data synthetic --out {root}"
        )
    print(
        f"{root} has no shapes dataset: making it (m2f-lite data synthetic --out {root})",
        file=sys.stderr,
    )
    generate(root, **SHAPES_ARGS)


def main(args: argparse.Namespace) -> None:
    """``m2f-lite data synthetic``: generate and say what was written."""
    t0 = time.perf_counter()
    out = generate(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed)
    print(
        f"wrote {args.n_train} train + {args.n_val} val images of {args.size}x{args.size} "
        f"to {out} in {time.perf_counter() - t0:.1f} s"
    )
