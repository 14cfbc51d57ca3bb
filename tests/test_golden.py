"""m2f_lite against the official Mask2Former code itself, on every run: the golden fixtures.

``tests/golden/make_golden.py`` ran the official R50 and Swin-T models (detectron2 and
Mask2Former from source, tiny widths, random fp16-exact weights saved under the official names),
their three post-processings and the official ``SetCriterion``, and stored inputs, weights and
outputs under ``tests/golden/``. Here the same weights go through ``m2f-lite convert``'s
converter into m2f_lite's model, and: raw outputs agree to 1e-4, the semantic, panoptic and
instance results are identical (scores to 1e-4), and the loss terms agree to 1e-6 with the
criterion drawing the official run's random points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from m2f_lite.config import get_config
from m2f_lite.criterion import build_criterion
from m2f_lite.inference import postprocess
from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.weights.detectron2 import convert_detectron2
from m2f_lite.weights.keys import check_state_dict

GOLDEN = Path(__file__).parent / "golden"
INFO = json.loads((GOLDEN / "golden.json").read_text())
NUM_CLASSES = INFO["tiny"]["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]
# the official keys of golden.json's "tiny" in m2f_lite's names
TINY = [
    f"model.num_classes={NUM_CLASSES}",
    "model.conv_dim=32",
    "model.mask_dim=32",
    "model.enc_layers=2",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.enc_nheads=4",  # the official pixel decoder reads MASK_FORMER.NHEADS
    "model.dim_feedforward=64",
    "model.dec_layers=3",  # DEC_LAYERS 4 = 3 layers + the queries' own prediction
    "model.num_queries=12",
    "loss.num_points=64",
    "inference.topk_per_image=10",
]
BACKBONES = {  # detectron2 R50 at RES2_OUT_CHANNELS 32 / WIDTH_PER_GROUP 8; Swin-T at EMBED_DIM 16
    "r50": ("resnet50", {"layers": (3, 4, 6, 3), "channels": (8, 16, 32, 64)}),
    "swin_t": ("swin_tiny", {"embed_dim": 16, "num_heads": (1, 2, 2, 4)}),
}


def test_the_fixtures_are_official_and_small():
    assert INFO["models"]["r50"]["yaml"].endswith("maskformer2_R50_bs16_50ep.yaml")
    size = sum(p.stat().st_size for p in GOLDEN.iterdir() if p.is_file())
    assert size < 6e6, f"tests/golden holds {size / 1e6:.1f} MB"


def golden_model(name: str):
    preset = "coco_panoptic_swin_t" if name == "swin_t" else "coco_panoptic_r50"
    cfg = get_config(preset, TINY)
    backbone_name, arch = BACKBONES[name]
    model = build_model(cfg, backbone=build_backbone(backbone_name, **arch)).eval()
    sd, report = convert_detectron2(GOLDEN / f"{name}_weights.pkl", backbone=backbone_name)
    report = check_state_dict(model, sd, report)
    assert report.ok, str(report)
    model.load_state_dict(sd)
    return cfg, model


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def run(request):
    name = request.param
    cfg, model = golden_model(name)
    data = dict(np.load(GOLDEN / f"{name}_outputs.npz"))
    images = [torch.from_numpy(data[f"image{i}"]).float() for i in range(len(INFO["image_sizes"]))]
    with torch.no_grad():
        outputs = model(images)
    return name, cfg, data, outputs


def test_raw_outputs_equal_the_official_models(run):
    _, _, data, outputs = run
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(outputs[key], torch.from_numpy(data[key]), atol=1e-4, rtol=0)
    assert len(outputs["aux_outputs"]) == len(data["aux_logits"]) == 3
    for aux, logits, masks in zip(outputs["aux_outputs"], data["aux_logits"], data["aux_masks"]):
        torch.testing.assert_close(aux["pred_logits"], torch.from_numpy(logits), atol=1e-4, rtol=0)
        torch.testing.assert_close(aux["pred_masks"], torch.from_numpy(masks), atol=1e-4, rtol=0)


def test_the_three_post_processings_equal_the_official(run):
    name, cfg, data, outputs = run
    results = postprocess(
        outputs,
        [tuple(s) for s in INFO["image_sizes"]],
        [tuple(s) for s in INFO["orig_sizes"]],
        semantic=True,
        instance=True,
        panoptic=True,
        is_thing=[k in INFO["thing_ids"] for k in range(NUM_CLASSES)],
        object_mask_threshold=cfg.inference.object_mask_threshold,
        overlap_threshold=cfg.inference.overlap_threshold,
        topk=cfg.inference.topk_per_image,
    )
    found_instances = 0
    for i, r in enumerate(results):
        torch.testing.assert_close(
            r["sem_seg"], torch.from_numpy(data[f"sem_seg{i}"]), atol=1e-4, rtol=0
        )
        ids, segments = r["panoptic_seg"]
        assert np.array_equal(ids.numpy(), data[f"panoptic{i}"]), (name, i)
        assert [{k: s[k] for k in ("id", "category_id", "isthing")} for s in segments] == [
            {k: s[k] for k in ("id", "category_id", "isthing")} for s in INFO["segments"][name][i]
        ]
        # the official top-k is unsorted (topk(sorted=False)): compare in order of score
        inst, ours = r["instances"], np.argsort(-r["instances"]["scores"].numpy(), kind="stable")
        theirs = np.argsort(-data[f"inst_scores{i}"], kind="stable")
        assert np.array_equal(inst["labels"].numpy()[ours], data[f"inst_labels{i}"][theirs]), (
            name,
            i,
        )
        assert np.array_equal(inst["masks"].numpy()[ours], data[f"inst_masks{i}"][theirs] > 0.5)
        np.testing.assert_allclose(
            inst["scores"].numpy()[ours], data[f"inst_scores{i}"][theirs], atol=1e-4, rtol=0
        )
        found_instances += len(inst["labels"])
    assert found_instances > 0  # the fixtures are not trivially empty


def test_the_criterion_equals_the_official_set_criterion(monkeypatch):
    """The official SetCriterion on the R50's raw outputs, with its own random points replayed."""
    cfg = get_config("coco_panoptic_r50", TINY)
    data = dict(np.load(GOLDEN / "r50_outputs.npz"))
    crit = dict(np.load(GOLDEN / "criterion.npz"))
    outputs = {
        "pred_logits": torch.from_numpy(data["pred_logits"]),
        "pred_masks": torch.from_numpy(data["pred_masks"]),
        "aux_outputs": [
            {"pred_logits": torch.from_numpy(lg), "pred_masks": torch.from_numpy(mk)}
            for lg, mk in zip(data["aux_logits"], data["aux_masks"])
        ],
    }
    targets = [
        {
            "labels": torch.from_numpy(crit[f"labels{i}"]),
            "masks": torch.from_numpy(crit[f"masks{i}"]),
        }
        for i in range(len(INFO["image_sizes"]))
    ]
    draws = [
        torch.from_numpy(crit[f"draw{i}"]) for i in range(sum(k.startswith("draw") for k in crit))
    ]
    replay = iter(draws)

    def official_rand(*size, **kwargs):
        value = next(replay)
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list) else size
        assert tuple(value.shape) == tuple(shape), (
            f"draw of shape {shape}, official {tuple(value.shape)}"
        )
        return value.to(kwargs.get("device") or "cpu")

    monkeypatch.setattr(torch, "rand", official_rand)
    with torch.no_grad():
        losses = build_criterion(cfg)(outputs, targets)
    assert next(replay, None) is None  # every official draw used, in the official order
    assert set(losses) == set(INFO["losses"])
    for key, value in INFO["losses"].items():
        assert float(losses[key]) == pytest.approx(value, abs=1e-6, rel=1e-6), key
