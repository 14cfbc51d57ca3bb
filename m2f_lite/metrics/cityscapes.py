"""Cityscapes metrics as the paper reports them: the benchmark's own code, ``cityscapesscripts``.

The paper's Cityscapes instance AP (37.4 for R50) and mIoU are the benchmark's evaluation, which
the official Mask2Former ``train_net.py`` runs through detectron2's ``CityscapesInstanceEvaluator``
and ``CityscapesSemSegEvaluator`` (``detectron2/evaluation/cityscapes_evaluation.py``). These two
classes write the predictions as those do and call the same functions of ``cityscapesscripts``:

- instance (:class:`CityscapesInstanceEvaluator`): per image a ``<stem>_pred.txt`` listing one
  binary PNG per predicted instance with its Cityscapes label id and score, then
  ``evalInstanceLevelSemanticLabeling.evaluateImgLists``: AP over IoU 0.5:0.05:0.95 and AP50,
  matched against ``*_gtFine_instanceIds.png`` (its own matching and averaging, not COCO's);
- semantic (:class:`CityscapesSemSegEvaluator`): per image a ``<stem>_pred.png`` of label ids,
  then ``evalPixelLevelSemanticLabeling.evaluateImgLists``: the class IoU (``mIoU``, the paper's),
  the instance-weighted ``iIoU`` and both over the 7 categories.

PQ on Cityscapes is panopticapi's on ``cityscapes_panoptic_val.json`` in the official code too
(``COCOPanopticEvaluator``, :mod:`m2f_lite.metrics.pq`). Under ``torch.distributed`` every
process keeps its images' predictions (PNG bytes) and process 0 writes and scores them all.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2f_lite.data.meta import DatasetMeta
from m2f_lite.metrics.evaluators import _gather, _require

IMAGE_SUFFIX = "_leftImg8bit"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _stem(file_name: str) -> tuple[str, str]:
    """``.../aachen/aachen_000000_000019_leftImg8bit.png`` -> (``aachen``, ``aachen_000000_000019``)."""
    path = Path(file_name)
    return path.parent.name, path.stem.removesuffix(IMAGE_SUFFIX)


class _Numpy1:
    """numpy as cityscapesscripts 2.3.0 (the latest release) was written for: ``np.in1d``, removed
    in numpy 2.4, is ``np.isin`` of the flattened input (its definition), and ``count_nonzero``
    of a whole array is a Python int (numpy 2 returns a numpy integer, which the script's JSON
    writer cannot serialise). Everything else is numpy itself; the arithmetic is unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def in1d(a: Any, b: Any, invert: bool = False) -> np.ndarray:
        return np.isin(np.ravel(a), b, invert=invert)

    @staticmethod
    def count_nonzero(a: Any, axis: Any = None, **kwargs: Any) -> Any:
        n = np.count_nonzero(a, axis=axis, **kwargs)
        return int(n) if axis is None else n


def _benchmark(name: str) -> Any:
    """``cityscapesscripts.evaluation.<name>``, or an error that says how to install it."""
    import importlib

    try:
        return importlib.import_module(f"cityscapesscripts.evaluation.{name}")
    except ImportError as e:
        raise ImportError(
            "Cityscapes evaluation runs the benchmark's own code: pip install cityscapesscripts "
            "(in m2f_lite's dev extra)"
        ) from e


def _run(module: Any, tmp: str, gt_files: list[str], **settings: Any) -> dict:
    """Point ``module``'s global ``args`` at the predictions in ``tmp``, then evaluate them all."""
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # that module's numpy, not everyone's
        module.np = _Numpy1()
    args = module.args
    args.predictionPath, args.predictionWalk = os.path.abspath(tmp), None
    args.JSONOutput, args.colorized, args.quiet = False, False, True
    for key, value in settings.items():
        setattr(args, key, value)
    cwd = os.getcwd()
    os.chdir(tmp)  # the instance evaluation writes matches.json into the working directory
    try:
        if module.__name__.endswith("evalPixelLevelSemanticLabeling"):
            predictions = [module.getPrediction(args, gt) for gt in gt_files]
        else:
            predictions = [module.getPrediction(gt, args) for gt in gt_files]
        return module.evaluateImgLists(predictions, gt_files, args)
    except SystemExit as e:  # cityscapesscripts prints its error and calls sys.exit
        raise ValueError(f"cityscapesscripts refused the predictions in {tmp} (see above)") from e
    finally:
        os.chdir(cwd)
        args.predictionPath, args.predictionWalk = None, None


class CityscapesInstanceEvaluator:
    """Cityscapes instance AP / AP50 of ``outputs[i]["instances"]`` (the benchmark's evaluation).

    ``gt_dir``: ``cityscapes/gtFine/<split>`` (``<city>/<stem>_gtFine_instanceIds.png``); the
    labels of ``outputs`` index ``meta``, whose ``dataset_ids`` are Cityscapes label ids (the
    8-class instance meta, or the 19-class one whose things are these 8).
    """

    def __init__(self, meta: DatasetMeta, gt_dir: str | os.PathLike) -> None:
        self.meta, self.gt_dir = meta, Path(gt_dir)
        self._predictions: dict[tuple[str, str], list[tuple[bytes, int, float]]] = {}

    def reset(self) -> None:
        self._predictions = {}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            key = _stem(str(_require(sample, "file_name", "CityscapesInstanceEvaluator")))
            inst = _require(output, "instances", "CityscapesInstanceEvaluator")
            masks = inst["masks"].cpu().numpy().astype(np.uint8)  # [k, H, W]
            labels, scores = inst["labels"].tolist(), inst["scores"].tolist()
            self._predictions[key] = [
                (_png(m * 255), int(self.meta.dataset_ids[c]), float(s))
                for m, c, s in zip(masks, labels, scores)
            ]

    def evaluate(self) -> dict[str, dict[str, float]]:
        cs_eval = _benchmark("evalInstanceLevelSemanticLabeling")
        parts, main = _gather(self._predictions)
        if not main:
            return {}
        predictions = {k: v for part in parts for k, v in part.items()}
        with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as tmp:
            gt_files = []
            for (city, stem), instances in sorted(predictions.items()):
                lines = []
                for i, (png, label_id, score) in enumerate(instances):
                    Path(tmp, f"{stem}_{i}.png").write_bytes(png)
                    lines.append(f"{stem}_{i}.png {label_id} {score}\n")
                Path(tmp, f"{stem}_pred.txt").write_text(
                    "".join(lines)
                )  # one per image, even empty
                gt_files.append(str(self.gt_dir / city / f"{stem}_gtFine_instanceIds.png"))
            gt_json = os.path.join(tmp, "gtInstances.json")
            averages = _run(cs_eval, tmp, gt_files, gtInstancesFile=gt_json)["averages"]
        return {"segm": {"AP": 100 * averages["allAp"], "AP50": 100 * averages["allAp50%"]}}


class CityscapesSemSegEvaluator:
    """Cityscapes class IoU (the paper's mIoU) and iIoU of ``outputs[i]["sem_seg"].argmax(0)``.

    ``gt_dir``: ``cityscapes/gtFine/<split>`` (``<stem>_gtFine_labelIds.png`` and, for iIoU,
    ``_instanceIds.png``); ``meta.dataset_ids`` map the 19 train ids to label ids.
    """

    def __init__(self, meta: DatasetMeta, gt_dir: str | os.PathLike) -> None:
        self.meta, self.gt_dir = meta, Path(gt_dir)
        self._label_ids = np.asarray(meta.dataset_ids, dtype=np.uint8)  # [K] train id -> label id
        self._predictions: dict[tuple[str, str], bytes] = {}

    def reset(self) -> None:
        self._predictions = {}

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            key = _stem(str(_require(sample, "file_name", "CityscapesSemSegEvaluator")))
            sem = _require(output, "sem_seg", "CityscapesSemSegEvaluator")
            train_ids = sem.argmax(0).cpu().numpy() if isinstance(sem, torch.Tensor) else sem
            self._predictions[key] = _png(self._label_ids[train_ids])  # [H, W] label ids

    def evaluate(self) -> dict[str, dict[str, float]]:
        cs_eval = _benchmark("evalPixelLevelSemanticLabeling")
        parts, main = _gather(self._predictions)
        if not main:
            return {}
        predictions = {k: v for part in parts for k, v in part.items()}
        with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as tmp:
            gt_files = []
            for (city, stem), png in sorted(predictions.items()):
                Path(tmp, f"{stem}_pred.png").write_bytes(png)
                gt_files.append(str(self.gt_dir / city / f"{stem}_gtFine_labelIds.png"))
            results = _run(cs_eval, tmp, gt_files)
        return {
            "sem_seg": {
                "mIoU": 100 * results["averageScoreClasses"],
                "iIoU": 100 * results["averageScoreInstClasses"],
                "IoU_sup": 100 * results["averageScoreCategories"],
                "iIoU_sup": 100 * results["averageScoreInstCategories"],
            }
        }
