"""PQ: m2f_lite.metrics.pq.pq_compute against panopticapi, on synthetic COCO-panoptic files.

Writes a synthetic ground truth and a perturbed prediction (crowd regions, two crowds of one
category, VOID, unmatched and category-swapped segments, predictions lying on VOID or crowd,
merged stuff, ground-truth JSON areas that differ from the PNG, PNG ids missing from the
ground-truth JSON and JSON segments missing from the PNG), times ``pq_compute`` and, given a
copy of panopticapi, times it too and prints the largest difference over every number
(All / Things / Stuff PQ, SQ, RQ, n and each category's PQ, SQ, RQ).

panopticapi is not a dependency and none of its code is in this repository; to compare, unpack
a copy outside the repository, e.g.

    git clone https://github.com/cocodataset/panopticapi /tmp/panopticapi
    python benchmarks/bench_pq.py --images 200 --panopticapi /tmp/panopticapi
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

from m2f_lite.metrics.panoptic_format import write_panoptic_png
from m2f_lite.metrics.pq import pq_compute

THINGS = list(range(1, 11))  # category ids
STUFF = list(range(101, 106))
UNUSED = 200  # a stuff category that never occurs


def _categories() -> list[dict]:
    cats = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in THINGS]
    cats += [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in [*STUFF, UNUSED]]
    return cats


def _shape(rng: np.random.Generator, h: int, w: int) -> tuple[str, int, int, int, int]:
    kind = "ellipse" if rng.random() < 0.5 else "rect"
    hh, ww = rng.integers(h // 16, h // 3), rng.integers(w // 16, w // 3)
    y, x = rng.integers(0, h - hh), rng.integers(0, w - ww)
    return kind, int(y), int(x), int(hh), int(ww)


def _paint(
    shape: tuple[str, int, int, int, int], h: int, w: int, dy: int = 0, dx: int = 0
) -> np.ndarray:
    kind, y, x, hh, ww = shape
    yy, xx = np.ogrid[:h, :w]
    y, x = y + dy, x + dx
    if kind == "rect":
        return (yy >= y) & (yy < y + hh) & (xx >= x) & (xx < x + ww)  # [H, W]
    cy, cx = y + hh / 2, x + ww / 2
    return ((yy - cy) / (hh / 2)) ** 2 + ((xx - cx) / (ww / 2)) ** 2 <= 1  # [H, W]


def _new_id(rng: np.random.Generator, taken: set[int]) -> int:
    while True:
        i = int(rng.integers(1, 256**3))
        if i not in taken:
            taken.add(i)
            return i


def make_image(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """One (gt ids, gt segments, pred ids, pred segments) pair with every edge case in play."""
    gt, pred = np.zeros((h, w), np.uint32), np.zeros((h, w), np.uint32)
    gt_segs, taken_gt, taken_pred = [], set(), set()
    pred_cat: dict[int, int] = {}

    # stuff: horizontal bands; a category seen twice is one segment (merged stuff)
    cuts = np.sort(rng.choice(np.arange(h // 8, h - h // 8), size=3, replace=False))
    pcuts = np.clip(cuts + rng.integers(-h // 10, h // 10, size=3), 1, h - 1)
    stuff_gt_id: dict[int, int] = {}
    stuff_pred_id: dict[int, int] = {}
    for band, (a, b, pa, pb) in enumerate(zip([0, *cuts], [*cuts, h], [0, *pcuts], [*pcuts, h])):
        cat = int(rng.choice(STUFF))
        sid = stuff_gt_id.setdefault(cat, _new_id(rng, taken_gt))
        gt[a:b] = sid
        pcat = cat if rng.random() < 0.85 else int(rng.choice(STUFF))
        pid = stuff_pred_id.setdefault(pcat, _new_id(rng, taken_pred))
        pred[pa:pb] = pid
        pred_cat[pid] = pcat
        if band == 0 and rng.random() < 0.3:  # a VOID band
            gt[a : a + (b - a) // 2] = 0
    for cat, sid in stuff_gt_id.items():
        gt_segs.append({"id": sid, "category_id": cat, "iscrowd": 0})

    # things, some of them crowd (sometimes two crowds of one category)
    crowd_cats: list[int] = []
    for _ in range(int(rng.integers(3, 12))):
        shape = _shape(rng, h, w)
        cat = int(rng.choice(THINGS))
        crowd = int(rng.random() < 0.15)
        if rng.random() < 0.1 and crowd_cats:
            cat, crowd = crowd_cats[0], 1
        if crowd:
            crowd_cats.append(cat)
        sid = _new_id(rng, taken_gt)
        gt[_paint(shape, h, w)] = sid
        gt_segs.append({"id": sid, "category_id": cat, "iscrowd": crowd})
        # prediction: shifted copy, sometimes another category, sometimes missing
        r = rng.random()
        if r < 0.1:
            continue
        pcat = cat if r < 0.85 else int(rng.choice(THINGS))
        jitter = max(2, min(shape[3], shape[4]) // 3)
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
        pid = _new_id(rng, taken_pred)
        pred[_paint(shape, h, w, dy, dx)] = pid
        pred_cat[pid] = pcat
    # VOID patches in the ground truth, and spurious predictions (some on VOID or on a crowd)
    for _ in range(int(rng.integers(0, 3))):
        gt[_paint(_shape(rng, h, w), h, w)] = 0
    for _ in range(int(rng.integers(0, 4))):
        pid = _new_id(rng, taken_pred)
        pred[_paint(_shape(rng, h, w), h, w)] = pid
        pred_cat[pid] = int(
            crowd_cats[0] if crowd_cats and rng.random() < 0.5 else rng.choice(THINGS)
        )

    ids, counts = np.unique(gt, return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist()))
    for s in gt_segs:  # JSON areas; a few disagree with the PNG (panopticapi uses the JSON's)
        s["area"] = area.get(s["id"], 0) + (int(rng.integers(1, 50)) if rng.random() < 0.05 else 0)
    if len(gt_segs) > 3 and rng.random() < 0.1:  # a PNG segment missing from the JSON
        gt_segs.pop(int(rng.integers(len(gt_segs))))
    pred_ids = [i for i in np.unique(pred).tolist() if i != 0]
    pred_segs = [{"id": i, "category_id": pred_cat[i]} for i in pred_ids]
    return gt, gt_segs, pred, pred_segs


def write_dataset(
    root: str, n_images: int, h: int, w: int, seed: int = 0
) -> tuple[str, str, str, str]:
    """Synthetic ground truth and prediction files under ``root``; returns their four paths."""
    rng = np.random.default_rng(seed)
    gt_dir, pred_dir = os.path.join(root, "gt"), os.path.join(root, "pred")
    os.makedirs(gt_dir, exist_ok=True)
    os.makedirs(pred_dir, exist_ok=True)
    gt_anns, pred_anns, images = [], [], []
    for i in range(n_images):
        gt, gt_segs, pred, pred_segs = make_image(rng, h, w)
        name = f"{i:06d}.png"
        write_panoptic_png(os.path.join(gt_dir, name), gt)
        write_panoptic_png(os.path.join(pred_dir, name), pred)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": pred_segs})
    gt_json, pred_json = os.path.join(root, "gt.json"), os.path.join(root, "pred.json")
    with open(gt_json, "w") as f:
        json.dump({"images": images, "annotations": gt_anns, "categories": _categories()}, f)
    with open(pred_json, "w") as f:
        json.dump({"annotations": pred_anns}, f)
    return gt_json, gt_dir, pred_json, pred_dir


def flatten(results: dict) -> dict[str, float]:
    """Every number of a pq_compute result, keyed by its path."""
    out = {}
    for group in ("All", "Things", "Stuff"):
        for k, v in results[group].items():
            out[f"{group}/{k}"] = float(v)
    for cat, d in results["per_class"].items():
        for k, v in d.items():
            out[f"per_class/{cat}/{k}"] = float(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=None, help="m2f_lite workers (default: CPU count)"
    )
    p.add_argument(
        "--panopticapi", default=None, help="folder holding a copy of cocodataset/panopticapi"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_pq") as root:
        t = time.perf_counter()
        files = write_dataset(root, args.images, args.height, args.width, args.seed)
        print(
            f"wrote {args.images} images {args.width}x{args.height} in {time.perf_counter() - t:.1f} s"
        )
        t = time.perf_counter()
        ours = pq_compute(*files[:1], files[2], files[1], files[3], num_workers=args.workers)
        t_ours = time.perf_counter() - t
        print(f"m2f_lite pq_compute: {t_ours:.2f} s  (CPUs: {os.cpu_count()})")
        for g in ("All", "Things", "Stuff"):
            r = ours[g]
            print(
                f"  {g:7s} PQ {100 * r['pq']:6.2f}  SQ {100 * r['sq']:6.2f}  RQ {100 * r['rq']:6.2f}  n {r['n']}"
            )
        if args.panopticapi:
            sys.path.insert(0, args.panopticapi)
            from panopticapi.evaluation import pq_compute as reference

            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                ref = reference(files[0], files[2], gt_folder=files[1], pred_folder=files[3])
            t_ref = time.perf_counter() - t
            a, b = flatten(ours), flatten(ref)
            if a.keys() != b.keys():
                raise SystemExit(f"different keys: {sorted(a.keys() ^ b.keys())[:10]}")
            diff = max(abs(a[k] - b[k]) for k in a)
            print(f"panopticapi pq_compute: {t_ref:.2f} s  (speed-up {t_ref / t_ours:.2f}x)")
            print(f"numbers compared: {len(a)}, max abs difference: {diff:.3g}")
            if diff > 1e-9:
                raise SystemExit("MISMATCH with panopticapi")


if __name__ == "__main__":
    main()
