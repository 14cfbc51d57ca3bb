"""Evaluation: a model over a dataset, post-processed as the official, scored by the evaluators.

``evaluate(cfg, model)`` runs the model on ``cfg.data.val_split`` at the test size (short side
``data.min_size_test``, long side at most ``data.max_size_test``), one image at a time as the
official test loader, turns the outputs into per-image results at the original resolution
(``m2f_lite.inference``) for the tasks ``cfg.inference`` enables, and scores them with
``m2f_lite.metrics.evaluators``: PQ (panoptic), mask AP (instance), mIoU (semantic). It runs
in fp32 unless ``cfg.inference.amp`` asks for bf16 or fp16 (``solver.amp`` is for training only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from m2f_lite.checkpoint import unwrap
from m2f_lite.config import Config
from m2f_lite.data.build import build_dataset, collate
from m2f_lite.data.files import DatasetError
from m2f_lite.metrics.evaluators import DatasetEvaluators, build_evaluator


def autocast_dtype(
    amp: str, device: torch.device, *, key: str = "solver.amp"
) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (the value of config field ``key``: ``solver.amp`` for
    training, ``inference.amp`` for evaluation) on ``device``; ``None``: fp32. CPUs always run fp32."""
    if amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"{key}={amp!r}: expected 'bf16', 'fp16' or 'off'")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        print(f"{key}=bf16: this GPU has no bf16; using fp16", file=sys.stderr)
        return torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class EvalSamples(torch.utils.data.Dataset):
    """The test-time samples ``indices`` of ``dataset``, with ``sem_seg`` at the original size (the
    evaluators compare at ``orig_size``; the test-time resize has resized the stored map)."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[self.indices[i]]
        if "sem_seg" in sample and tuple(sample["sem_seg"].shape) != tuple(sample["orig_size"]):
            sample["sem_seg"] = self.dataset.get(self.indices[i], transform=False)["sem_seg"]
        return sample


def build_dataset_evaluator(cfg: Config, dataset: Any) -> DatasetEvaluators:
    """The evaluators of ``cfg.inference``'s tasks that ``dataset``'s ground truth allows.

    Panoptic needs the dataset's COCO-panoptic json and PNG folder; instance AP a COCO instances
    json (for a panoptic dataset, the ``instances_*`` file beside its ``panoptic_*`` json, as COCO
    and the shapes have); semantic the ``sem_seg`` maps of panoptic and semantic datasets. PQ runs
    in ``data.num_workers`` processes (0: in this process).
    """
    inf, meta = cfg.inference, dataset.meta
    if (gt_dir := getattr(dataset, "cityscapes_gt_dir", None)) is not None:
        return _cityscapes_evaluator(cfg, dataset, gt_dir)
    panoptic_json = getattr(dataset, "panoptic_json", None)
    instances_json = getattr(dataset, "instances_json", None)
    if instances_json is None and panoptic_json is not None:
        beside = Path(panoptic_json).with_name(
            Path(panoptic_json).name.replace("panoptic_", "instances_", 1)
        )
        instances_json = beside if beside.is_file() else None
    tasks = {
        "semantic": inf.semantic_on and getattr(dataset, "task", "") in ("semantic", "panoptic"),
        "instance": inf.instance_on and instances_json is not None,
        "panoptic": inf.panoptic_on and panoptic_json is not None,
    }
    if not any(tasks.values()):
        raise ValueError(
            f"nothing to evaluate: dataset {cfg.data.dataset!r} has no ground truth for the tasks in cfg.inference"
        )
    return build_evaluator(
        meta,
        **tasks,
        instances_json=instances_json,
        panoptic_json=panoptic_json,
        panoptic_folder=getattr(dataset, "panoptic_root", None),
        num_workers=max(1, cfg.data.num_workers),
    )


def _cityscapes_evaluator(cfg: Config, dataset: Any, gt_dir: Path) -> DatasetEvaluators:
    """Cityscapes as the official ``train_net.py``: instance AP and mIoU by the benchmark's own
    ``cityscapesscripts`` (``m2f_lite.metrics.cityscapes``), PQ by panopticapi's arithmetic."""
    from m2f_lite.metrics.cityscapes import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

    inf, task = cfg.inference, dataset.task
    evaluators: list[Any] = []
    if inf.semantic_on and task in ("semantic", "panoptic"):
        evaluators.append(CityscapesSemSegEvaluator(dataset.meta, gt_dir))
    if inf.instance_on and task in ("instance", "panoptic"):
        evaluators.append(CityscapesInstanceEvaluator(dataset.meta, gt_dir))
    if inf.panoptic_on and task == "panoptic":
        evaluators += build_evaluator(
            dataset.meta,
            panoptic=True,
            panoptic_json=dataset.panoptic_json,
            panoptic_folder=dataset.panoptic_root,
            num_workers=max(1, cfg.data.num_workers),
        ).evaluators
    if not evaluators:
        raise ValueError(f"nothing to evaluate: dataset {cfg.data.dataset!r}, tasks {inf}")
    return DatasetEvaluators(evaluators)


class EvaluationStopped(Exception):
    """``evaluate``'s ``stop()`` said to stop (a Ctrl-C or SIGTERM during a training run)."""


@torch.no_grad()
def evaluate(
    cfg: Config,
    model: nn.Module,
    dataset: Any = None,
    *,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``model`` over ``dataset`` (default: ``cfg.data.val_split`` at the test size), one image
    at a time as the official, post-process (``cfg.inference``) and return the evaluators' metrics
    ``{"panoptic_seg": {"PQ", ...}, "segm": {"AP", ...}, "sem_seg": {"mIoU", ...}}`` in percent.

    Under torch.distributed every process evaluates its share and process 0 gets the metrics
    (the others ``{}``). ``stop()``, asked before each image, ends the evaluation early with
    :class:`EvaluationStopped`; every process asks it at the same images (the first
    ``len(dataset) // world_size`` of its share), so ``stop`` may be a collective.
    """
    from m2f_lite.inference import postprocess_from_config

    if dataset is None:
        dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    if len(dataset) == 0:  # the evaluators would report NaN metrics as if they were results
        raise DatasetError(
            f"no images in data.val_split={cfg.data.val_split!r}: nothing to evaluate",
            file=getattr(dataset, "panoptic_json", None)
            or getattr(dataset, "instances_json", None)
            or cfg.data.root,
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = unwrap(model)
    device = next(model.parameters()).device
    # fp32 unless inference.amp asks (detectron2 evaluates in fp32, whatever SOLVER.AMP says)
    dtype = autocast_dtype(cfg.inference.amp, device, key="inference.amp")
    samples = EvalSamples(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        samples, batch_size=1, collate_fn=collate, num_workers=cfg.data.num_workers
    )
    evaluator = build_dataset_evaluator(cfg, dataset)
    evaluator.reset()
    was_training = model.training
    model.eval()
    common = len(dataset) // world  # every process has at least this many images
    for i, (images, targets) in enumerate(
        tqdm(loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True)
    ):
        if stop is not None and i < common and stop():
            model.train(was_training)
            raise EvaluationStopped(f"evaluation stopped after {i} of {len(samples)} images")
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model([x.to(device) for x in images])
        outputs = {
            "pred_logits": outputs["pred_logits"].float(),
            "pred_masks": outputs["pred_masks"].float(),
        }
        results = postprocess_from_config(
            outputs,
            [t["image_size"] for t in targets],
            [t["orig_size"] for t in targets],
            cfg.inference,
            dataset.meta,
        )
        evaluator.process(targets, results)
    model.train(was_training)
    return evaluator.evaluate()
