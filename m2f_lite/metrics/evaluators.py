"""Dataset-level evaluators: model outputs in, mIoU / mask AP / PQ out (detectron2's evaluator protocol).

Each evaluator has ``reset()``, ``process(inputs, outputs)`` once per batch and ``evaluate()``
at the end. ``inputs`` are dataset samples (dicts with at least ``image_id``, ``file_name``,
``orig_size`` (H, W), and for semantic segmentation ``sem_seg``: the ``[H, W]`` ground truth at
the original size, 255 = ignore); ``outputs`` are :func:`m2f_lite.inference.postprocess` results.
Under ``torch.distributed`` every process calls ``evaluate()``; the results are gathered on
process 0, which returns the metrics; the others return ``{}``.

Which evaluator for which benchmark (what the official Mask2Former configs use):

* COCO panoptic: :class:`COCOPanopticEvaluator` (PQ), plus :class:`COCOInstanceEvaluator` on the
  thing classes (AP) and :class:`SemSegEvaluator` when the semantic ground truth is available.
* COCO instance: :class:`COCOInstanceEvaluator`.
* ADE20K semantic: :class:`SemSegEvaluator` (150 classes, 255 = ignore).
* Cityscapes: instance AP and mIoU by the benchmark's own ``cityscapesscripts``, as the
  official ``train_net.py`` (:mod:`m2f_lite.metrics.cityscapes`, chosen by
  ``m2f_lite.evaluation``); panoptic is :class:`COCOPanopticEvaluator` on
  ``cityscapes_panoptic_val.json`` (the same file format), as the official code too.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from m2f_lite.data.files import DatasetError
from m2f_lite.data.meta import DatasetMeta
from m2f_lite.metrics.coco_ap import evaluate_coco_instances, instances_to_coco_results, load_coco
from m2f_lite.metrics.miou import SemSegMetric
from m2f_lite.metrics.panoptic_format import panoptic_png_bytes
from m2f_lite.metrics.pq import pq_compute, pq_summary


def _gather(obj: Any) -> tuple[list[Any], bool]:
    """``obj`` of every process, collected on process 0 (``torch.distributed.gather_object``), and
    whether this is process 0; outside ``torch.distributed``, ``([obj], True)``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj], True
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return [obj], True
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0)  # only process 0 holds everything
    return (gathered if rank == 0 else []), rank == 0


def _require(sample: dict, key: str, evaluator: str) -> Any:
    if key not in sample:
        raise KeyError(f"{evaluator}.process: input sample has no {key!r} (keys: {sorted(sample)})")
    return sample[key]


class SemSegEvaluator:
    """mIoU, fwIoU, mACC, pACC and per-class IoU/ACC of ``outputs[i]["sem_seg"].argmax(0)``."""

    def __init__(self, meta: DatasetMeta) -> None:
        self.meta = meta
        self.metric = SemSegMetric(
            num_classes=meta.num_classes, ignore_label=meta.ignore_label, class_names=meta.classes
        )

    def reset(self) -> None:
        self.metric.reset()

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            gt = _require(sample, "sem_seg", "SemSegEvaluator")
            gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            pred = _require(output, "sem_seg", "SemSegEvaluator").argmax(0).cpu().numpy()  # [H, W]
            if pred.shape != gt.shape:
                raise ValueError(
                    f"SemSegEvaluator: image {sample.get('image_id')}: prediction {pred.shape} and "
                    f"ground truth {gt.shape} differ in size (predict at orig_size)"
                )
            self.metric.update(pred, gt)

    def evaluate(self) -> dict[str, dict[str, float]]:
        matrices, main = _gather(self.metric.conf_matrix)
        if not main:
            return {}
        total = SemSegMetric(
            num_classes=self.meta.num_classes,
            ignore_label=self.meta.ignore_label,
            class_names=self.meta.classes,
        )
        total.conf_matrix = sum(matrices[1:], matrices[0].copy())
        return {"sem_seg": total.compute()}


class COCOInstanceEvaluator:
    """COCO mask AP of ``outputs[i]["instances"]`` against a COCO instances json.

    Predictions of classes that are not categories of ``gt_json`` (stuff classes of a panoptic
    model run without its thing filter) are left out, as the official ``panoptic_on`` filter does.

    Args:
        gt_json: the COCO instances ground truth (e.g. ``instances_val2017.json``).
        processed_only: evaluate on the processed images only (a quick evaluation on a subset);
            by default every image of ``gt_json`` counts, as detectron2 does.
    """

    def __init__(
        self, meta: DatasetMeta, gt_json: str | os.PathLike, *, processed_only: bool = False
    ) -> None:
        self.meta = meta
        self.coco_gt = load_coco(gt_json)
        self.categories = set(self.coco_gt.getCatIds())
        self.processed_only = processed_only
        self.source = (
            gt_json if isinstance(gt_json, (str, os.PathLike)) else "instances ground truth"
        )
        # pycocotools silently ignores an annotation of an unknown category: refuse it instead
        known = self.categories & set(meta.dataset_ids)
        for i, ann in enumerate(self.coco_gt.dataset.get("annotations", [])):
            if ann.get("category_id") not in known:
                raise DatasetError(
                    f"unknown category id {ann.get('category_id')} (known: {sorted(known)})",
                    file=self.source,
                    field=f"annotations[{i}].category_id",
                )
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[Any] = []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            image_id = _require(sample, "image_id", "COCOInstanceEvaluator")
            instances = _require(output, "instances", "COCOInstanceEvaluator")
            self._check_image(image_id, sample)
            results = instances_to_coco_results(instances, image_id, self.meta.dataset_ids)
            self.results.extend(r for r in results if r["category_id"] in self.categories)
            self.image_ids.append(image_id)

    def _check_image(self, image_id: Any, sample: dict) -> None:
        """The ground truth has this image, at the size the image file has (``orig_size``)."""
        im = self.coco_gt.imgs.get(image_id)
        if im is None:
            raise DatasetError(f"image_id {image_id!r} is not in images", file=self.source)
        size = sample.get("orig_size")
        if size is not None and (im.get("height"), im.get("width")) != tuple(size):
            raise DatasetError(
                f"image {sample.get('file_name', image_id)} is {size[0]}x{size[1]} but the "
                f"JSON says {im.get('height')}x{im.get('width')}",
                file=self.source,
                field=f"images[id={image_id}].height/width",
            )

    def evaluate(self) -> dict[str, dict[str, float]]:
        gathered, main = _gather((self.results, self.image_ids))
        if not main:
            return {}
        results = list(itertools.chain.from_iterable(r for r, _ in gathered))
        image_ids = list(itertools.chain.from_iterable(i for _, i in gathered))
        img_ids = sorted(set(image_ids)) if self.processed_only else None
        return {"segm": evaluate_coco_instances(self.coco_gt, results, img_ids=img_ids)}


class COCOPanopticEvaluator:
    """PQ of ``outputs[i]["panoptic_seg"]``: writes COCO-panoptic PNGs + json and runs :func:`pq_compute`.

    Args:
        gt_json, gt_folder: the COCO-panoptic ground truth (e.g. ``panoptic_val2017.json`` and
            the folder of its PNGs).
        output_dir: keep the predicted PNGs and ``predictions.json`` there (default: a
            temporary folder, deleted after evaluation).
        processed_only: evaluate on the processed images only (default: every ground-truth
            image must have a prediction, as detectron2 and panopticapi require).
    """

    def __init__(
        self,
        meta: DatasetMeta,
        gt_json: str | os.PathLike,
        gt_folder: str | os.PathLike,
        *,
        output_dir: str | os.PathLike | None = None,
        processed_only: bool = False,
        num_workers: int | None = None,
    ) -> None:
        for path, what in ((gt_json, "file"), (gt_folder, "folder")):
            if not (os.path.isfile(path) if what == "file" else os.path.isdir(path)):
                raise FileNotFoundError(
                    f"COCOPanopticEvaluator: ground truth {what} {path} does not exist"
                )
        self.meta = meta
        self.gt_json, self.gt_folder = str(gt_json), str(gt_folder)
        self.output_dir = output_dir
        self.processed_only = processed_only
        self.num_workers = num_workers
        self.pq_results: dict[str, Any] | None = None  # pq_compute's dict, after evaluate()
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict[str, Any]] = []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            ids, segments_info = _require(output, "panoptic_seg", "COCOPanopticEvaluator")
            file_name = os.path.basename(_require(sample, "file_name", "COCOPanopticEvaluator"))
            segments = [
                {"id": int(s["id"]), "category_id": int(self.meta.dataset_ids[s["category_id"]])}
                for s in segments_info
            ]
            png = panoptic_png_bytes(ids.cpu().numpy())  # encoded now: far smaller than the map
            self.predictions.append(
                {
                    "image_id": _require(sample, "image_id", "COCOPanopticEvaluator"),
                    "file_name": os.path.splitext(file_name)[0] + ".png",
                    "png": png,
                    "segments_info": segments,
                }
            )

    def evaluate(self) -> dict[str, dict[str, float]]:
        gathered, main = _gather(self.predictions)
        if not main:
            return {}
        predictions = list(itertools.chain.from_iterable(gathered))
        with open(self.gt_json) as f:
            gt = json.load(f)
        with tempfile.TemporaryDirectory(prefix="panoptic_eval") as tmp:
            out_dir = str(self.output_dir) if self.output_dir else tmp
            pred_dir = os.path.join(out_dir, "panoptic_predictions")
            os.makedirs(pred_dir, exist_ok=True)
            taken: set[str] = set()
            annotations = []
            for p in predictions:
                name = p["file_name"]
                if name in taken:  # two images with one file stem: keep both PNGs
                    name = f"{os.path.splitext(name)[0]}_{p['image_id']}.png"
                taken.add(name)
                with open(os.path.join(pred_dir, name), "wb") as f:
                    f.write(p["png"])
                annotations.append(
                    {
                        "image_id": p["image_id"],
                        "file_name": name,
                        "segments_info": p["segments_info"],
                    }
                )
            gt_json = self.gt_json
            if self.processed_only:
                done = {a["image_id"] for a in annotations}
                gt = {**gt, "annotations": [a for a in gt["annotations"] if a["image_id"] in done]}
                gt_json = os.path.join(tmp, "ground_truth_subset.json")
                with open(gt_json, "w") as f:
                    json.dump(gt, f)
            pred_json = os.path.join(out_dir, "predictions.json")
            with open(pred_json, "w") as f:
                json.dump({**gt, "annotations": annotations}, f)
            self.pq_results = pq_compute(
                gt_json, pred_json, self.gt_folder, pred_dir, num_workers=self.num_workers
            )
        return {"panoptic_seg": pq_summary(self.pq_results, _category_names(gt))}


def _category_names(gt: dict) -> dict[int, str]:
    return {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}


class DatasetEvaluators:
    """Several evaluators as one; ``evaluate()`` merges their result dicts."""

    def __init__(self, evaluators: Sequence[Any]) -> None:
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for e in self.evaluators:
            e.reset()

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for e in self.evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for e in self.evaluators:
            for task, metrics in e.evaluate().items():
                if task in results:
                    raise ValueError(f"two evaluators report the task {task!r}")
                results[task] = metrics
        return results


def build_evaluator(
    meta: DatasetMeta,
    *,
    semantic: bool = False,
    instance: bool = False,
    panoptic: bool = False,
    instances_json: str | os.PathLike | None = None,
    panoptic_json: str | os.PathLike | None = None,
    panoptic_folder: str | os.PathLike | None = None,
    processed_only: bool = False,
    num_workers: int | None = None,
) -> DatasetEvaluators:
    """The evaluators of the enabled tasks; a task whose ground truth file is not given is an error.
    ``num_workers``: processes for PQ (default: the CPU count)."""
    evaluators: list[Any] = []
    if semantic:
        evaluators.append(SemSegEvaluator(meta))
    if instance:
        if instances_json is None:
            raise ValueError(
                "instance evaluation needs instances_json (a COCO instances ground truth)"
            )
        evaluators.append(
            COCOInstanceEvaluator(meta, instances_json, processed_only=processed_only)
        )
    if panoptic:
        if panoptic_json is None or panoptic_folder is None:
            raise ValueError("panoptic evaluation needs panoptic_json and panoptic_folder")
        evaluators.append(
            COCOPanopticEvaluator(
                meta,
                panoptic_json,
                panoptic_folder,
                processed_only=processed_only,
                num_workers=num_workers,
            )
        )
    return DatasetEvaluators(evaluators)
