"""Evaluation of prediction files already on disk (``m2f-lite eval-files``), and a results table.

* panoptic: COCO-panoptic PNG folder + json, against a ground truth in the same format (PQ);
* instance: a COCO results json (``[{image_id, category_id, segmentation (RLE), score}]``),
  against a COCO instances json (mask AP);
* semantic: PNG folders of class indices, matched by file name (mIoU).

Each returns the same ``{task: {metric: value}}`` dict as the dataset evaluators, in percent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from m2f_lite.metrics.coco_ap import evaluate_coco_instances
from m2f_lite.metrics.miou import SemSegMetric
from m2f_lite.metrics.pq import pq_compute, pq_summary, read_json


def evaluate_panoptic_files(
    gt_json: str | os.PathLike,
    gt_dir: str | os.PathLike,
    pred_json: str | os.PathLike,
    pred_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{"panoptic_seg": {PQ, SQ, RQ, PQ_th, ..., PQ-<name>}}`` of COCO-panoptic prediction files."""
    for path in (gt_json, pred_json):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"panoptic JSON file {path} does not exist")
    for path in (gt_dir, pred_dir):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"panoptic PNG folder {path} does not exist")
    results = pq_compute(gt_json, pred_json, gt_dir, pred_dir, num_workers=num_workers)
    names = {
        c["id"]: c.get("name", str(c["id"]))
        for c in _read_json(gt_json, "panoptic JSON file")["categories"]
    }
    return {"panoptic_seg": pq_summary(results, names)}


def evaluate_instance_files(
    gt_json: str | os.PathLike, results_json: str | os.PathLike
) -> dict[str, dict[str, float]]:
    """``{"segm": {AP, AP50, AP75, APs, APm, APl, AP-<name>}}`` of a COCO results json."""
    if not os.path.isfile(results_json):
        raise FileNotFoundError(f"instance results json {results_json} does not exist")
    results = _read_json(results_json, "instance results json")
    if not isinstance(results, list):
        raise ValueError(
            f"{results_json}: expected a COCO results list [{{image_id, category_id, segmentation, "
            f"score}}, ...], got a {type(results).__name__}"
        )
    return {"segm": evaluate_coco_instances(gt_json, results)}


def _read_json(path: str | os.PathLike, role: str) -> object:
    """A JSON file; a syntax error names the file, its line and column."""
    return read_json(path, f"{role} {path}")


def _png_files(folder: str | os.PathLike, suffix: str, role: str) -> dict[str, Path]:
    """``{name without suffix: path}`` of the ``*<suffix>.png`` files under ``folder`` (recursive)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{role} folder {folder} does not exist")
    files: dict[str, Path] = {}
    ending = f"{suffix}.png"
    for path in sorted(Path(folder).rglob(f"*{ending}")):
        key = path.name[: -len(ending)]
        if key in files:
            raise ValueError(
                f"{role} folder {folder}: two files named {key}{ending} ({files[key]}, {path})"
            )
        files[key] = path
    return files


def _read_label_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        labels = np.asarray(img)
    if labels.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel PNG of class indices, got shape {labels.shape}"
        )
    return labels.astype(np.int64)


def evaluate_semantic_files(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    *,
    num_classes: int,
    ignore_label: int = 255,
    class_names: Sequence[str] | None = None,
    gt_suffix: str = "",
    pred_suffix: str = "",
    reduce_zero_label: bool = False,
) -> dict[str, dict[str, float]]:
    """``{"sem_seg": {mIoU, fwIoU, mACC, pACC, IoU-<name>, ACC-<name>}}`` of PNG label maps.

    Every ``<name><gt_suffix>.png`` under ``gt_dir`` (searched recursively) is compared with
    ``<name><pred_suffix>.png`` under ``pred_dir``; a missing prediction is an error. Cityscapes,
    for instance: ``gt_suffix="_gtFine_labelTrainIds"``, ``pred_suffix="_leftImg8bit"``.

    Args:
        num_classes: K; predictions hold 0..K-1, ground truth 0..K-1 or ``ignore_label``.
        reduce_zero_label: the ground truth is ADE20K's raw format (0 = unlabelled, classes
            1..K): read 0 as ignore and subtract 1 from the rest.
    """
    gts = _png_files(gt_dir, gt_suffix, "ground truth")
    if not gts:
        raise FileNotFoundError(f"no ground truth files *{gt_suffix}.png under {gt_dir}")
    preds = _png_files(pred_dir, pred_suffix, "prediction")
    metric = SemSegMetric(
        num_classes=num_classes, ignore_label=ignore_label, class_names=class_names
    )
    for key, gt_path in gts.items():
        if key not in preds:
            raise FileNotFoundError(
                f"no prediction {key}{pred_suffix}.png under {pred_dir} for {gt_path}"
            )
        gt = _read_label_png(gt_path)
        if reduce_zero_label:
            gt = gt - 1
            gt[gt == -1] = ignore_label
        pred = _read_label_png(preds[key])
        if pred.shape != gt.shape:
            raise ValueError(
                f"{preds[key]} is {pred.shape} but its ground truth {gt_path} is {gt.shape}"
            )
        try:
            metric.update(pred, gt)
        except ValueError as e:
            raise ValueError(f"{preds[key]} / {gt_path}: {e}") from e
    return {"sem_seg": metric.compute()}


def format_results(results: dict[str, dict[str, float]], *, columns: int = 3) -> str:
    """A readable table per task: the headline metrics on one row, per-class values below."""
    lines = []
    for task, metrics in results.items():
        lines.append(f"== {task} ==")
        main = {k: v for k, v in metrics.items() if "-" not in k}
        per_class = {k: v for k, v in metrics.items() if "-" in k}
        if main:
            widths = [max(len(k), 7) for k in main]
            lines.append("  ".join(k.rjust(w) for k, w in zip(main, widths)))
            lines.append("  ".join(_fmt(v).rjust(w) for v, w in zip(main.values(), widths)))
        groups: dict[str, list[tuple[str, float]]] = {}
        for key, value in per_class.items():
            metric, name = key.split("-", 1)
            groups.setdefault(metric, []).append((name, value))
        for metric, items in groups.items():
            lines.append(f"per class {metric}:")
            width = max(len(name) for name, _ in items)
            cells = [f"{name.ljust(width)} {_fmt(v).rjust(7)}" for name, v in items]
            for i in range(0, len(cells), columns):
                lines.append("  " + "   ".join(cells[i : i + columns]))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def add_eval_files_command(sub) -> None:
    """``m2f-lite eval-files {panoptic,instance,semantic}``: its parser, on ``m2f-lite``'s
    sub-command list (``m2f_lite.cli``)."""
    f = sub.add_parser(
        "eval-files", help="score prediction files on disk against ground truth files"
    )
    fsub = f.add_subparsers(dest="eval_task", required=True)
    fp = fsub.add_parser("panoptic", help="COCO panoptic PNG folder + json (PQ)")
    fp.add_argument("--gt-json", required=True)
    fp.add_argument("--gt-dir", required=True)
    fp.add_argument("--pred-json", required=True)
    fp.add_argument("--pred-dir", required=True)
    fi = fsub.add_parser("instance", help="COCO results json (mask AP)")
    fi.add_argument("--gt-json", required=True, help="COCO instances ground truth")
    fi.add_argument("--results", required=True, help="COCO results json (RLE segmentation, score)")
    fs = fsub.add_parser("semantic", help="label PNG folders matched by file name (mIoU)")
    fs.add_argument("--gt-dir", required=True)
    fs.add_argument("--pred-dir", required=True)
    fs.add_argument("--num-classes", type=int, required=True)
    fs.add_argument("--ignore-label", type=int, default=255)
    fs.add_argument("--gt-suffix", default="", help="e.g. _gtFine_labelTrainIds for Cityscapes")
    fs.add_argument("--pred-suffix", default="")
    fs.add_argument(
        "--reduce-zero-label", action="store_true", help="ADE20K raw labels (0 = ignore)"
    )
    f.set_defaults(func=_eval_files_main)


def _eval_files_main(args) -> None:
    if args.eval_task == "panoptic":
        metrics = evaluate_panoptic_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    elif args.eval_task == "instance":
        metrics = evaluate_instance_files(args.gt_json, args.results)
    else:
        metrics = evaluate_semantic_files(
            args.gt_dir,
            args.pred_dir,
            num_classes=args.num_classes,
            ignore_label=args.ignore_label,
            gt_suffix=args.gt_suffix,
            pred_suffix=args.pred_suffix,
            reduce_zero_label=args.reduce_zero_label,
        )
    print(format_results(metrics))
