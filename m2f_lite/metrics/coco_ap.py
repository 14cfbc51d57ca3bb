"""COCO mask AP with pycocotools: instance predictions -> COCO results json -> ``COCOeval("segm")``.

AP is not re-implemented: pycocotools' ``COCOeval`` computes it (AP averaged over IoU thresholds
0.50:0.05:0.95 and 101 recall points, at most 100 detections per image; APs/APm/APl by mask area).
This module does what detectron2's ``COCOEvaluator`` does around it, with the same output keys in
percent: masks are RLE-encoded, contiguous class indices mapped back to the dataset's category
ids, no ``bbox`` is given (so pycocotools sizes instances by mask area, as for segm it should),
and per-category AP is read from ``eval["precision"]`` (all areas, 100 detections).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask ``[H, W]`` as a COCO RLE ``{"size": [H, W], "counts": str}`` (json-serialisable)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)[:, :, None]))[0]
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def instances_to_coco_results(
    instances: dict[str, Any], image_id: int | str, dataset_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO result entries ``{image_id, category_id, segmentation, score}`` of one image.

    Args:
        instances: ``{"masks": [k, H, W] bool, "scores": [k], "labels": [k]}`` (tensors or arrays;
            ``"rles"``, COCO RLE dicts, in place of ``"masks"``),
            as :func:`m2f_lite.inference.instance_inference` returns, at the original image size.
        dataset_ids: ``[K]`` dataset category id of each contiguous class index.
    """
    if "rles" in instances:  # already encoded (inference.instance_inference(as_rle=True))
        rles = list(instances["rles"])
    else:
        rles = [encode_mask(m) for m in np.asarray(_to_numpy(instances["masks"]), dtype=bool)]
    scores = _to_numpy(instances["scores"]).tolist()
    labels = _to_numpy(instances["labels"]).tolist()
    return [
        {
            "image_id": image_id,
            "category_id": int(dataset_ids[label]),
            "segmentation": rle,
            "score": float(score),
        }
        for rle, score, label in zip(rles, scores, labels)
    ]


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def load_coco(gt: str | os.PathLike | COCO) -> COCO:
    """A ``COCO`` ground truth object from a json path (quietly), or the object itself."""
    if isinstance(gt, COCO):
        return gt
    if not os.path.isfile(gt):
        raise FileNotFoundError(f"COCO ground truth json {gt} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(gt))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"COCO ground truth json {gt}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e


def check_results(coco_gt: COCO, results: list[dict[str, Any]], source: str = "results") -> None:
    """Clear errors for result entries pycocotools would reject with a bare assert or KeyError."""
    known_images, known_cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{source}[{i}]: expected a dict, got {type(r).__name__}")
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in r:
                raise ValueError(f"{source}[{i}] has no {key!r} field")
        if r["image_id"] not in known_images:
            raise ValueError(
                f"{source}[{i}]: image_id {r['image_id']!r} is not in the ground truth"
            )
        if r["category_id"] not in known_cats:
            raise ValueError(
                f"{source}[{i}]: unknown category_id {r['category_id']!r} (ground truth ids: "
                f"{sorted(known_cats)[:10]}{'...' if len(known_cats) > 10 else ''})"
            )


def evaluate_coco_instances(
    gt: str | os.PathLike | COCO,
    results: list[dict[str, Any]],
    *,
    img_ids: Sequence[int] | None = None,
    per_class: bool = True,
) -> dict[str, float]:
    """Mask AP of COCO-format ``results`` against the ground truth ``gt`` (json path or ``COCO``).

    Args:
        img_ids: evaluate on these images only (default: every image of the ground truth).
        per_class: add ``"AP-<category name>"`` for each category (NaN if it has no ground truth).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<name>", ...}`` in percent. With no
        results at all, every AP is 0 (detectron2 reports -1 as a placeholder there; 0 is what
        COCOeval computes for categories that have ground truth and no detections).
    """
    coco_gt = load_coco(gt)
    check_results(coco_gt, results)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        if results:
            coco_dt = coco_gt.loadRes(
                [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            )
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "categories": coco_gt.dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.debug("COCOeval:\n%s", printed.getvalue())
    # COCOeval marks a metric it cannot compute (no ground truth in an area range) with -1;
    # detectron2's COCOEvaluator reports NaN there, and so does this.
    out = {
        key: float(100 * coco_eval.stats[i]) if coco_eval.stats[i] >= 0 else float("nan")
        for i, key in enumerate(AP_KEYS)
    }
    if per_class:
        precision = coco_eval.eval["precision"]  # [T iou, R recall, K cat, A area, M max dets]
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = coco_gt.cats[cat_id].get("name", str(cat_id))
            out[f"AP-{name}"] = float(100 * p.mean()) if p.size else float("nan")
    return out
