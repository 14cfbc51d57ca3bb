"""Cityscapes metrics by the benchmark's own code (cityscapesscripts), on tiny Cityscapes-format data.

The ground truth is written in the real layout (``gtFine/val/<city>/*_gtFine_{labelIds,
instanceIds}.png``); predictions go through m2f_lite's evaluators and ``m2f-lite eval``'s choice
of them. Known answers: perfect predictions score 100, wrong classes 0, and the class IoU equals
this package's own mIoU on train ids (two independent implementations of the same definition).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2f_lite.config import get_config
from m2f_lite.data.build import build_dataset
from m2f_lite.data.cityscapes import cityscapes_instance_meta, cityscapes_meta
from m2f_lite.evaluation import build_dataset_evaluator
from m2f_lite.metrics.cityscapes import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from m2f_lite.metrics.evaluators import SemSegEvaluator

H, W = 64, 128
STEMS = ("aachen_000000_000019", "aachen_000001_000019")


def write_cityscapes(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two frames: road, sky, two cars, a person, a car group (crowd), unlabeled pixels."""
    frames = {}
    for k, stem in enumerate(STEMS):
        label = np.full((H, W), 7, dtype=np.uint8)  # road
        label[:16] = 23  # sky
        label[-4:] = 0  # unlabeled: ignored
        inst = label.astype(np.uint16)
        inst[20:40, 4 + k : 30 + k], label[20:40, 4 + k : 30 + k] = 26001, 26  # car, 520 px
        inst[20:36, 40:70], label[20:36, 40:70] = 26002, 26  # car, 480 px
        inst[40:58, 90:100], label[40:58, 90:100] = 24001, 24  # person, 180 px
        inst[44:50, 70:86], label[44:50, 70:86] = 26, 26  # a car group: crowd
        gt = root / "gtFine" / "val" / "aachen"
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(gt / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt / f"{stem}_gtFine_instanceIds.png")  # uint16: I;16
        img = root / "leftImg8bit" / "val" / "aachen"
        img.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(img / f"{stem}_leftImg8bit.png")
        frames[stem] = (label, inst)
    return frames


def sample(root, stem: str) -> dict:
    return {"file_name": str(root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png")}


def instances(inst: np.ndarray, meta, *, wrong_class: bool = False) -> dict:
    """The ground-truth instances as predictions (score 0.9), or with every class shifted."""
    ids = [v for v in np.unique(inst) if v >= 1000]
    labels = [meta.dataset_ids.index(v // 1000) for v in ids]
    if wrong_class:
        labels = [(c + 1) % len(meta.dataset_ids) for c in labels]
    return {
        "masks": torch.from_numpy(np.stack([inst == v for v in ids])),
        "scores": torch.full((len(ids),), 0.9),
        "labels": torch.tensor(labels),
    }


def scores_of(label: np.ndarray, meta) -> torch.Tensor:
    """One-hot class scores [K, H, W] whose argmax is the train id of every label id (road where
    the ground truth is ignored)."""
    train = np.zeros(label.shape, dtype=np.int64)  # road (train id 0)
    for k, lid in enumerate(meta.dataset_ids):
        train[label == lid] = k
    return (
        torch.nn.functional.one_hot(torch.from_numpy(train), len(meta.dataset_ids))
        .permute(2, 0, 1)
        .float()
    )


def test_instance_ap_by_cityscapesscripts(tmp_path):
    frames = write_cityscapes(tmp_path)
    meta = cityscapes_instance_meta()
    for wrong, expected in ((False, 100.0), (True, 0.0)):
        ev = CityscapesInstanceEvaluator(meta, tmp_path / "gtFine" / "val")
        ev.reset()
        for stem, (_, inst) in frames.items():
            ev.process(
                [sample(tmp_path, stem)], [{"instances": instances(inst, meta, wrong_class=wrong)}]
            )
        segm = ev.evaluate()["segm"]
        assert segm == {"AP": pytest.approx(expected), "AP50": pytest.approx(expected)}, wrong
    # one car of four missed: recall 3/4 for cars; the person stays perfect
    ev = CityscapesInstanceEvaluator(meta, tmp_path / "gtFine" / "val")
    ev.reset()
    for i, (stem, (_, inst)) in enumerate(frames.items()):
        pred = instances(inst, meta)
        if i == 0:
            pred = {k: v[1:] for k, v in pred.items()}  # drop car 26001 of the first frame
        ev.process([sample(tmp_path, stem)], [{"instances": pred}])
    segm = ev.evaluate()["segm"]
    assert 50.0 < segm["AP"] < 100.0 and segm["AP"] == pytest.approx(segm["AP50"])


def test_semantic_iou_by_cityscapesscripts_equals_our_miou(tmp_path):
    frames = write_cityscapes(tmp_path)
    meta = cityscapes_meta()
    ours, theirs = (
        SemSegEvaluator(meta),
        CityscapesSemSegEvaluator(meta, tmp_path / "gtFine" / "val"),
    )
    ours.reset(), theirs.reset()
    for stem, (label, _) in frames.items():
        pred = label.copy()
        pred[20:30, 40:70] = 7  # half a car predicted as road
        pred[:8] = 24  # part of the sky predicted as person
        s = sample(tmp_path, stem)
        train = scores_of(label, meta).argmax(0)
        train[torch.from_numpy(label == 0)] = 255  # unlabeled: ignored in both
        theirs.process([s], [{"sem_seg": scores_of(pred, meta)}])
        ours.process([{**s, "sem_seg": train}], [{"sem_seg": scores_of(pred, meta)}])
    got, expected = theirs.evaluate()["sem_seg"], ours.evaluate()["sem_seg"]
    assert 0 < got["mIoU"] < 100
    assert got["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    perfect = CityscapesSemSegEvaluator(meta, tmp_path / "gtFine" / "val")
    perfect.reset()
    for stem, (label, _) in frames.items():
        perfect.process([sample(tmp_path, stem)], [{"sem_seg": scores_of(label, meta)}])
    assert perfect.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_evaluation_uses_the_benchmark_code_for_cityscapes(tmp_path):
    write_cityscapes(tmp_path)
    for name, kinds in (
        ("cityscapes_instance_r50", [CityscapesInstanceEvaluator]),
        ("cityscapes_semantic_r50", [CityscapesSemSegEvaluator]),
    ):
        cfg = get_config(name, [f"data.root={tmp_path}", "data.num_workers=0"])
        dataset = build_dataset(cfg, "val", train=False)
        assert [type(e) for e in build_dataset_evaluator(cfg, dataset).evaluators] == kinds, name
