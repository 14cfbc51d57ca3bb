"""Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019), as the COCO panopticapi computes it.

For one category, with TP the matched (ground truth, prediction) pairs, FP the unmatched predicted
segments and FN the unmatched ground-truth segments,

    PQ = Σ_{(g,p) ∈ TP} IoU(g, p) / (|TP| + ½|FP| + ½|FN|) = SQ × RQ,
    SQ = Σ_TP IoU / |TP|,    RQ = |TP| / (|TP| + ½|FP| + ½|FN|),

and PQ over a set of categories (All, Things, Stuff) is the plain mean over the categories that
occur (TP + FP + FN > 0). The matching rules, exactly as panopticapi's ``evaluation.py`` applies
them, one image at a time:

* a ground-truth and a predicted segment of the same category match when IoU > 0.5 (so each
  segment matches at most once: no assignment problem to solve);
* VOID pixels (ground-truth id 0) are left out of the union: IoU = |g ∩ p| / (|p| + |g| − |g ∩ p|
  − |p ∩ VOID|), with |g| the ``area`` written in the ground-truth JSON and |p| counted in the PNG;
* crowd ground-truth segments (``iscrowd = 1``) are never matched and never false negatives;
* an unmatched prediction is not a false positive when more than half of its pixels lie on VOID
  or on the crowd region of its category (the last crowd segment of that category listed in the
  image's JSON, as panopticapi keeps one per category).

``pq_compute`` takes the same arguments, reads the same files, raises on the same format errors
and returns the same dict as ``panopticapi.evaluation.pq_compute``; it is checked against it to
1e-9 (benchmarks/RESULTS.md). Each image is vectorised (one ``np.unique`` over combined ids),
and images are spread over a process pool in contiguous chunks, one per worker, as panopticapi
does. The workers are spawned (not forked, as panopticapi's): a spawned worker first re-runs the
caller's main script, so when the call comes from a script's top level without an
``if __name__ == "__main__":`` guard, or when a worker dies, the images are evaluated in this
process instead (:func:`_spawn_would_rerun_this_call`): never a pool that restarts its workers
forever. Deviation: where a group has no category at all (``n = 0``, e.g. Stuff on a things-only
dataset) panopticapi divides by zero; here that group reports 0.0 with ``n = 0``.
"""

from __future__ import annotations

import ast
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2f_lite.metrics.panoptic_format import read_panoptic_png

logger = logging.getLogger(__name__)

OFFSET = 256 * 256 * 256  # combined id = gt_id * OFFSET + pred_id: ids are < 256³
VOID = 0


class PanopticFormatError(KeyError, ValueError):
    """Prediction and ground truth files disagree (a ``KeyError``, as in panopticapi, and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class PQStatCat:
    """Sums for one category: IoU over matched pairs, and the TP / FP / FN counts."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category :class:`PQStatCat`, summed over images with ``+=``."""

    def __init__(self) -> None:
        self.pq_per_cat: defaultdict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: PQStat) -> PQStat:
        for category_id, stat in other.pq_per_cat.items():
            self.pq_per_cat[category_id] += stat
        return self

    def pq_average(
        self, categories: dict[int, dict], isthing: bool | None
    ) -> tuple[dict[str, float | int], dict[int, dict[str, float]]]:
        """Mean PQ/SQ/RQ over the categories of a group (``isthing`` None = all) that occur."""
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[int, dict[str, float]] = {}
        for category_id, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            s = self.pq_per_cat[category_id]
            if s.tp + s.fp + s.fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pq_c, sq_c, rq_c = (
                s.iou / denominator,
                (s.iou / s.tp if s.tp else 0.0),
                s.tp / denominator,
            )
            per_class[category_id] = {"pq": float(pq_c), "sq": float(sq_c), "rq": float(rq_c)}
            pq, sq, rq = pq + pq_c, sq + sq_c, rq + rq_c
        if n == 0:  # panopticapi raises ZeroDivisionError here
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": float(pq / n), "sq": float(sq / n), "rq": float(rq / n), "n": n}, per_class


def pq_compute_single_image(
    gt_ann: dict,
    pred_ann: dict,
    pan_gt: np.ndarray,
    pan_pred: np.ndarray,
    categories: dict[int, dict],
) -> PQStat:
    """TP/FP/FN and IoU sums of one image, from its JSON entries and id maps ``[H, W]``."""
    image_id = gt_ann["image_id"]
    if pan_gt.shape != pan_pred.shape:
        raise ValueError(
            f"image {image_id}: ground truth PNG is {pan_gt.shape[1]}x{pan_gt.shape[0]} but the "
            f"prediction PNG is {pan_pred.shape[1]}x{pan_pred.shape[0]} (W x H)"
        )
    gt_segms = {s["id"]: s for s in gt_ann["segments_info"]}
    pred_segms = {s["id"]: dict(s) for s in pred_ann["segments_info"]}
    stat = PQStat()

    # Predicted areas come from the PNG; every PNG id but VOID must be in the JSON and vice versa.
    unseen = {s["id"] for s in pred_ann["segments_info"]}
    ids, counts = np.unique(pan_pred, return_counts=True)
    for pred_id, count in zip(ids.tolist(), counts.tolist()):
        if pred_id not in pred_segms:
            if pred_id == VOID:
                continue
            raise PanopticFormatError(
                f"In the image with ID {image_id} segment with ID {pred_id} is presented in PNG "
                "and not presented in JSON."
            )
        pred_segms[pred_id]["area"] = count
        unseen.discard(pred_id)
        if pred_segms[pred_id]["category_id"] not in categories:
            raise PanopticFormatError(
                f"In the image with ID {image_id} segment with ID {pred_id} has unknown "
                f"category_id {pred_segms[pred_id]['category_id']}."
            )
    if unseen:
        raise PanopticFormatError(
            f"In the image with ID {image_id} the following segment IDs {sorted(unseen)} are "
            "presented in JSON and not presented in PNG."
        )

    # Intersections of every (gt id, pred id) pair that shares a pixel, in (gt, pred) order.
    combined = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)  # [H, W]
    pairs, counts = np.unique(combined, return_counts=True)  # [P], [P]
    gt_of, pred_of = (pairs // OFFSET).tolist(), (pairs % OFFSET).tolist()
    intersection = dict(zip(zip(gt_of, pred_of), counts.tolist()))

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), inter in intersection.items():
        if gt_id not in gt_segms or pred_id not in pred_segms:
            continue
        gt, pred = gt_segms[gt_id], pred_segms[pred_id]
        if gt["iscrowd"] == 1 or gt["category_id"] != pred["category_id"]:
            continue
        union = pred["area"] + gt["area"] - inter - intersection.get((VOID, pred_id), 0)
        iou = inter / union
        if iou > 0.5:
            stat[gt["category_id"]].tp += 1
            stat[gt["category_id"]].iou += iou
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    # False negatives: unmatched, non-crowd ground truth. Keep one crowd segment per category.
    crowd_of_category: dict[int, int] = {}
    for gt_id, gt in gt_segms.items():
        if gt_id in gt_matched:
            continue
        if gt["iscrowd"] == 1:
            crowd_of_category[gt["category_id"]] = gt_id
            continue
        stat[gt["category_id"]].fn += 1

    # False positives: unmatched predictions, unless mostly on VOID or their category's crowd.
    for pred_id, pred in pred_segms.items():
        if pred_id in pred_matched:
            continue
        ignored = intersection.get((VOID, pred_id), 0)
        if pred["category_id"] in crowd_of_category:
            ignored += intersection.get((crowd_of_category[pred["category_id"]], pred_id), 0)
        if ignored / pred["area"] > 0.5:
            continue
        stat[pred["category_id"]].fp += 1
    return stat


def _evaluate_chunk(
    chunk: list[tuple[dict, dict]], gt_folder: str, pred_folder: str, categories: dict[int, dict]
) -> list[PQStat]:
    """Per-image stats of a chunk of (gt, pred) annotation pairs, read from the PNG folders."""
    out = []
    for gt_ann, pred_ann in chunk:
        pan_gt = read_panoptic_png(os.path.join(gt_folder, gt_ann["file_name"]))
        pan_pred = read_panoptic_png(os.path.join(pred_folder, pred_ann["file_name"]))
        out.append(pq_compute_single_image(gt_ann, pred_ann, pan_gt, pan_pred, categories))
    return out


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either order, either quotes)."""
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in (
        '__name__ == "__main__"',
        '"__main__" == __name__',
    )


def _spawn_would_rerun_this_call() -> bool:
    """True when a spawned worker would call :func:`pq_compute` again as it starts.

    A "spawn" worker begins by running the parent's main script (or ``-m`` module) again, under
    the name ``__mp_main__``, so that functions defined there exist in the worker. Code at the
    script's top level outside ``if __name__ == "__main__":`` runs again in every worker; when it
    reaches ``pq_compute``, multiprocessing refuses to start processes from a starting process,
    the worker dies, and a ``multiprocessing.Pool`` would replace it forever (the hang). This
    finds the frame of the main script's top level in the call stack and tells whether its
    current line lies inside such a guard. No main file (``python -c``, a notebook, a REPL): nothing
    is re-run.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) is None:
        return False
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)
    ):
        frame = frame.f_back
    if frame is None:  # the script's top level has finished running (a thread, a callback)
        return False
    try:
        with open(frame.f_code.co_filename, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True  # cannot tell: evaluate in this process
    line = frame.f_lineno
    return not any(
        _is_main_guard(node) and node.lineno <= line <= (node.end_lineno or node.lineno)
        for node in tree.body
    )


def read_json(path: str | os.PathLike, what: str) -> object:
    """A JSON file; a syntax error is one line: ``what`` (the file, as the caller names it), the
    line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not UTF-8 text ({e})") from e


def _load_json(path: str | os.PathLike, role: str, fields: tuple[str, ...]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} JSON file {path} does not exist")
    data = read_json(path, f"{role} JSON file {path}")
    if not isinstance(data, dict):
        raise ValueError(
            f"{role} JSON file {path}: expected a JSON object with {', '.join(fields)}"
        )
    for name in fields:
        if name not in data:
            raise ValueError(f"{role} JSON file {path} has no {name!r} field")
    for i, ann in enumerate(data["annotations"]):
        for name in ("image_id", "file_name", "segments_info"):
            if name not in ann:
                raise ValueError(f"{role} JSON file {path}: annotations[{i}] has no {name!r} field")
    return data


def _check_segments(
    data: dict, path: str | os.PathLike, role: str, fields: tuple[str, ...]
) -> None:
    for ann in data["annotations"]:
        for s in ann["segments_info"]:
            for name in fields:
                if name not in s:
                    raise ValueError(
                        f"{role} JSON file {path}: image {ann['image_id']} has a segment without {name!r}"
                    )


def pq_compute(
    gt_json_file: str | os.PathLike,
    pred_json_file: str | os.PathLike,
    gt_folder: str | os.PathLike | None = None,
    pred_folder: str | os.PathLike | None = None,
    *,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """PQ, SQ and RQ of COCO-panoptic predictions, as ``panopticapi.evaluation.pq_compute``.

    Args:
        gt_json_file, pred_json_file: COCO panoptic JSON files (the ground truth's ``categories``,
            with ``isthing``, define the categories; predictions are matched by ``image_id``).
        gt_folder, pred_folder: folders holding the PNGs named by each annotation's ``file_name``;
            when None, the JSON path with ``.json`` removed (``panoptic_val2017.json`` ->
            ``panoptic_val2017``), as panopticapi does.
        num_workers: processes (default: the CPU count, at most one per image; 1 = in-process).

    Returns:
        ``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id:
        {"pq", "sq", "rq"}}}``, fractions in [0, 1] (not percent).
    """
    start = time.perf_counter()
    gt_json = _load_json(gt_json_file, "ground truth", ("annotations", "categories"))
    pred_json = _load_json(pred_json_file, "prediction", ("annotations",))
    _check_segments(gt_json, gt_json_file, "ground truth", ("id", "category_id", "iscrowd", "area"))
    _check_segments(pred_json, pred_json_file, "prediction", ("id", "category_id"))
    gt_folder = str(gt_json_file).replace(".json", "") if gt_folder is None else str(gt_folder)
    pred_folder = (
        str(pred_json_file).replace(".json", "") if pred_folder is None else str(pred_folder)
    )
    if not os.path.isdir(gt_folder):
        raise FileNotFoundError(f"Folder {gt_folder} with ground truth segmentations doesn't exist")
    if not os.path.isdir(pred_folder):
        raise FileNotFoundError(f"Folder {pred_folder} with predicted segmentations doesn't exist")

    categories = {c["id"]: c for c in gt_json["categories"]}
    for c in categories.values():
        if "isthing" not in c:
            raise ValueError(
                f"ground truth JSON file {gt_json_file}: category {c['id']} has no 'isthing'"
            )
    pred_by_image = {a["image_id"]: a for a in pred_json["annotations"]}
    pairs = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in pred_by_image:
            raise PanopticFormatError(f"no prediction for the image with id: {gt_ann['image_id']}")
        pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))

    workers = max(1, min(num_workers or os.cpu_count() or 1, len(pairs)))
    bounds = np.linspace(0, len(pairs), workers + 1).round().astype(int)  # contiguous chunks
    chunks = [pairs[a:b] for a, b in itertools.pairwise(bounds.tolist())]
    args = [(chunk, gt_folder, pred_folder, categories) for chunk in chunks]
    if workers > 1 and _spawn_would_rerun_this_call():
        logger.warning(
            "pq_compute: called from a script's top level without an "
            '`if __name__ == "__main__":` guard; spawned workers would re-run the script, '
            "so the %d images are evaluated in this process",
            len(pairs),
        )
        workers = 1
    per_chunk = None
    if workers > 1:
        # "spawn": forking a process whose torch already started threads can deadlock the child.
        # ProcessPoolExecutor, unlike multiprocessing.Pool, fails (BrokenProcessPool) when a worker
        # dies instead of replacing it: a worker that cannot start never means waiting forever.
        try:
            with ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                per_chunk = list(pool.map(_evaluate_chunk, *zip(*args)))
        except BrokenProcessPool as e:
            logger.warning("pq_compute: %s; evaluating the images in this process", e)
            workers = 1
    if per_chunk is None:
        per_chunk = [_evaluate_chunk(*a) for a in args]

    total = PQStat()
    for chunk_stats in per_chunk:  # image order: the sums do not depend on the worker count
        for image_stat in chunk_stats:
            total += image_stat

    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = total.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    logger.info(
        "pq_compute: %d images, %d workers, %.2f s",
        len(pairs),
        workers,
        time.perf_counter() - start,
    )
    return results


def pq_summary(
    results: dict[str, Any], category_names: dict[int, str] | None = None
) -> dict[str, float]:
    """detectron2's COCOPanopticEvaluator summary of :func:`pq_compute`'s dict, in percent:
    ``PQ, SQ, RQ`` and their ``_th`` (things) and ``_st`` (stuff) versions, plus ``PQ-<name>``
    per category when ``category_names`` ({category id: name}) is given."""
    out = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            out[f"{metric.upper()}{suffix}"] = 100 * results[group][metric]
    for category_id, per_class in results["per_class"].items() if category_names else ():
        out[f"PQ-{category_names.get(category_id, category_id)}"] = 100 * per_class["pq"]
    return out
