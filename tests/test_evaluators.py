"""Evaluators end to end on a tiny synthetic dataset written here, and the file-based evaluation."""

import json
import multiprocessing
import os
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from m2f_lite.data.meta import DatasetMeta
from m2f_lite.inference import postprocess
from m2f_lite.metrics.coco_ap import encode_mask
from m2f_lite.metrics.eval_files import (
    evaluate_instance_files,
    evaluate_panoptic_files,
    evaluate_semantic_files,
    format_results,
)
from m2f_lite.metrics.evaluators import (
    COCOInstanceEvaluator,
    COCOPanopticEvaluator,
    SemSegEvaluator,
    build_evaluator,
)
from m2f_lite.metrics.panoptic_format import write_panoptic_png

META = DatasetMeta(
    name="toy",
    classes=["person", "car", "sky", "grass"],
    is_thing=[True, True, False, False],
    dataset_ids=[1, 3, 10, 11],
)
PERSON, CAR, SKY, GRASS = range(4)
PADDED = (16, 24)

# Each image: (height, width, [(class, iscrowd, [(y0, y1, x0, x1) blocks on the 4-pixel grid])]).
# Segments are painted in order; pixels no segment covers are VOID.
IMAGES = {
    1: (
        16,
        24,
        [
            (SKY, 0, [(0, 8, 0, 24)]),
            (GRASS, 0, [(8, 16, 0, 24)]),
            (PERSON, 0, [(4, 12, 4, 12)]),
            (CAR, 0, [(8, 16, 16, 24)]),
        ],
    ),
    2: (
        12,
        24,
        [
            (GRASS, 0, [(0, 12, 8, 24)]),
            (PERSON, 1, [(4, 12, 0, 8)]),
            (CAR, 0, [(0, 4, 12, 20)]),
            (PERSON, 0, [(4, 8, 16, 24)]),
        ],
    ),
}  # image 2: 12 rows, padded to 16 in the batch; VOID at rows 0-4, cols 0-8; a person crowd


def segment_masks(image_id):
    h, w, segments = IMAGES[image_id]
    owner = np.full((h, w), -1)
    for i, (_, _, blocks) in enumerate(segments):
        for y0, y1, x0, x1 in blocks:
            owner[y0:y1, x0:x1] = i
    return [owner == i for i in range(len(segments))], owner


@pytest.fixture
def dataset(tmp_path):
    """COCO panoptic PNGs + json, a COCO instances json, semantic PNGs, and the samples a loader gives."""
    (tmp_path / "panoptic").mkdir()
    (tmp_path / "semantic").mkdir()
    images, pan_anns, inst_anns, samples = [], [], [], []
    for image_id, (h, w, segments) in IMAGES.items():
        masks, _ = segment_masks(image_id)
        ids = np.zeros((h, w), np.uint32)
        sem = np.full((h, w), 255, np.uint8)
        infos = []
        for i, ((cls, crowd, _), m) in enumerate(zip(segments, masks)):
            seg_id = 100 * image_id + i + 1
            ids[m], sem[m] = seg_id, cls
            infos.append(
                {
                    "id": seg_id,
                    "category_id": META.dataset_ids[cls],
                    "iscrowd": crowd,
                    "area": int(m.sum()),
                }
            )
            if META.is_thing[cls]:
                rle = encode_mask(m)
                inst_anns.append(
                    {
                        "id": len(inst_anns) + 1,
                        "image_id": image_id,
                        "category_id": META.dataset_ids[cls],
                        "segmentation": rle,
                        "area": int(m.sum()),
                        "bbox": mask_util.toBbox(rle).tolist(),
                        "iscrowd": crowd,
                    }
                )
        write_panoptic_png(tmp_path / "panoptic" / f"{image_id:04d}.png", ids)
        Image.fromarray(sem).save(tmp_path / "semantic" / f"{image_id:04d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:04d}.jpg", "height": h, "width": w})
        pan_anns.append(
            {"image_id": image_id, "file_name": f"{image_id:04d}.png", "segments_info": infos}
        )
        samples.append(
            {
                "image_id": image_id,
                "file_name": f"images/{image_id:04d}.jpg",
                "orig_size": (h, w),
                "sem_seg": torch.as_tensor(sem.astype(np.int64)),
            }
        )
    pan_cats = [
        {"id": d, "name": n, "isthing": int(t)}
        for d, n, t in zip(META.dataset_ids, META.classes, META.is_thing)
    ]
    inst_cats = [c for c in pan_cats if c["isthing"]]
    (tmp_path / "panoptic.json").write_text(
        json.dumps({"images": images, "annotations": pan_anns, "categories": pan_cats})
    )
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": images, "annotations": inst_anns, "categories": inst_cats})
    )
    return tmp_path, samples


def model_outputs(drop=()):
    """What a perfect model outputs: one query per segment (class logit 10, mask logits ±10), plus
    a no-object query. The masks are given at full resolution (``padded_size=PADDED`` below), so
    that no upsampling blurs them. ``drop``: (image id, segment index) pairs the model misses."""
    q = 1 + max(len(s) for _, _, s in IMAGES.values())
    logits = torch.zeros(len(IMAGES), q, META.num_classes + 1)
    logits[:, :, -1] = 10.0  # unused queries: no object
    masks = torch.full((len(IMAGES), q, *PADDED), -10.0)
    for b, image_id in enumerate(IMAGES):
        for i, (m, (cls, _, _)) in enumerate(zip(segment_masks(image_id)[0], IMAGES[image_id][2])):
            if (image_id, i) in drop:
                continue
            logits[b, i] = 0.0
            logits[b, i, cls] = 10.0
            masks[b, i, : m.shape[0], : m.shape[1]] = torch.where(torch.as_tensor(m), 10.0, -10.0)
    return {"pred_logits": logits, "pred_masks": masks}


def run(evaluator, samples, outputs, *, semantic=True, instance=True, panoptic=True):
    results = postprocess(
        outputs,
        [s["orig_size"] for s in samples],
        [s["orig_size"] for s in samples],
        semantic=semantic,
        instance=instance,
        panoptic=panoptic,
        is_thing=META.is_thing,
        padded_size=PADDED,
    )
    evaluator.reset()
    for sample, result in zip(samples, results):  # one image per batch, as a loader would
        evaluator.process([sample], [result])
    return evaluator.evaluate()


def test_perfect_predictions_score_100_on_every_metric(dataset):
    root, samples = dataset
    evaluator = build_evaluator(
        META,
        semantic=True,
        instance=True,
        panoptic=True,
        instances_json=root / "instances.json",
        panoptic_json=root / "panoptic.json",
        panoptic_folder=root / "panoptic",
    )
    res = run(evaluator, samples, model_outputs())
    assert res["sem_seg"]["mIoU"] == pytest.approx(100) and res["sem_seg"]["pACC"] == pytest.approx(
        100
    )
    assert res["segm"]["AP"] == pytest.approx(100) and res["segm"]["AP-car"] == pytest.approx(100)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100)
    assert res["panoptic_seg"]["PQ_th"] == pytest.approx(100) and res["panoptic_seg"][
        "PQ_st"
    ] == pytest.approx(100)
    table = format_results(res)
    assert "mIoU" in table and "PQ_th" in table and "per class AP:" in table


def test_a_missed_car_costs_what_the_definitions_say(dataset):
    root, samples = dataset
    outputs = model_outputs(drop={(1, 3)})  # image 1's car
    pan = run(
        COCOPanopticEvaluator(META, root / "panoptic.json", root / "panoptic"), samples, outputs
    )
    # car: 1 TP (image 2) and 1 FN -> PQ 1 / (1 + 0.5); the other three classes stay at 1
    assert pan["panoptic_seg"]["PQ-car"] == pytest.approx(100 * 2 / 3)
    assert pan["panoptic_seg"]["PQ"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    sem = run(SemSegEvaluator(META), samples, outputs)["sem_seg"]
    assert sem["IoU-car"] < 100 and sem["mIoU"] < 100
    ap = run(COCOInstanceEvaluator(META, root / "instances.json"), samples, outputs)["segm"]
    assert ap["AP-person"] == pytest.approx(100) and ap["AP-car"] == pytest.approx(50, abs=1)


def test_subset_evaluation_needs_processed_only(dataset):
    root, samples = dataset
    outputs = {k: v[:1] for k, v in model_outputs().items()}
    with pytest.raises(ValueError, match="no prediction for the image with id: 2"):
        run(
            COCOPanopticEvaluator(META, root / "panoptic.json", root / "panoptic"),
            samples[:1],
            outputs,
        )
    pan = COCOPanopticEvaluator(
        META, root / "panoptic.json", root / "panoptic", processed_only=True
    )
    assert run(pan, samples[:1], outputs)["panoptic_seg"]["PQ"] == pytest.approx(100)
    inst = COCOInstanceEvaluator(META, root / "instances.json", processed_only=True)
    assert run(inst, samples[:1], outputs)["segm"]["AP"] == pytest.approx(100)


def test_file_based_evaluation(dataset, tmp_path_factory):
    root, samples = dataset
    out = tmp_path_factory.mktemp("out")
    outputs = model_outputs()
    pan = COCOPanopticEvaluator(META, root / "panoptic.json", root / "panoptic", output_dir=out)
    run(pan, samples, outputs, semantic=False, instance=False)
    res = evaluate_panoptic_files(
        root / "panoptic.json",
        root / "panoptic",
        out / "predictions.json",
        out / "panoptic_predictions",
    )
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100)

    inst = COCOInstanceEvaluator(META, root / "instances.json")
    run(inst, samples, outputs, semantic=False, panoptic=False)
    (out / "results.json").write_text(json.dumps(inst.results))
    assert evaluate_instance_files(root / "instances.json", out / "results.json")["segm"][
        "AP"
    ] == pytest.approx(100)

    (out / "sem").mkdir()
    results = postprocess(
        outputs,
        [s["orig_size"] for s in samples],
        [s["orig_size"] for s in samples],
        semantic=True,
        instance=False,
        panoptic=False,
        is_thing=META.is_thing,
        padded_size=PADDED,
    )
    for s, r in zip(samples, results):
        Image.fromarray(r["sem_seg"].argmax(0).numpy().astype(np.uint8)).save(
            out / "sem" / f"{s['image_id']:04d}_pred.png"
        )
    res = evaluate_semantic_files(
        root / "semantic", out / "sem", num_classes=4, class_names=META.classes, pred_suffix="_pred"
    )
    assert res["sem_seg"]["mIoU"] == pytest.approx(100) and "IoU-grass" in res["sem_seg"]
    # ADE20K's raw format (0 = unlabelled, classes from 1) read with reduce_zero_label
    (out / "raw").mkdir()
    for f in sorted((root / "semantic").iterdir()):
        raw = np.asarray(Image.open(f)).astype(np.int64) + 1
        Image.fromarray(np.where(raw == 256, 0, raw).astype(np.uint8)).save(out / "raw" / f.name)
    res = evaluate_semantic_files(
        out / "raw", out / "sem", num_classes=4, pred_suffix="_pred", reduce_zero_label=True
    )
    assert res["sem_seg"]["mIoU"] == pytest.approx(100)


def test_file_based_evaluation_errors(dataset, tmp_path_factory):
    root, _ = dataset
    out = tmp_path_factory.mktemp("bad")
    with pytest.raises(FileNotFoundError, match=re.escape("no prediction 0001_pred.png")):
        evaluate_semantic_files(root / "semantic", out, num_classes=4, pred_suffix="_pred")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_semantic_files(root / "nowhere", out, num_classes=4)
    with pytest.raises(FileNotFoundError, match=re.escape("missing.json")):
        evaluate_panoptic_files(
            root / "panoptic.json", root / "panoptic", out / "missing.json", out
        )
    (out / "results.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected a COCO results list"):
        evaluate_instance_files(root / "instances.json", out / "results.json")
    (out / "results.json").write_text(
        json.dumps([{"image_id": 1, "category_id": 10, "segmentation": {}, "score": 1.0}])
    )
    with pytest.raises(
        ValueError, match="unknown category_id 10"
    ):  # sky is not an instance category
        evaluate_instance_files(root / "instances.json", out / "results.json")


def test_evaluator_input_errors(dataset):
    root, samples = dataset
    results = postprocess(
        model_outputs(),
        [(16, 24), (12, 24)],
        [(16, 24), (12, 24)],
        semantic=True,
        instance=False,
        panoptic=False,
        is_thing=META.is_thing,
        padded_size=PADDED,
    )
    with pytest.raises(KeyError, match="no 'sem_seg'"):
        SemSegEvaluator(META).process([{"image_id": 1}], results[:1])
    with pytest.raises(ValueError, match="differ in size"):
        SemSegEvaluator(META).process(samples[1:], results[:1])
    with pytest.raises(FileNotFoundError, match="ground truth folder"):
        COCOPanopticEvaluator(META, root / "panoptic.json", root / "nowhere")
    with pytest.raises(ValueError, match="needs instances_json"):
        build_evaluator(META, instance=True)


def _distributed_worker(rank, init_file, root, queue):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    samples = [s for s in DATASET_SAMPLES if s["image_id"] == rank + 1]
    outputs = {k: v[rank : rank + 1] for k, v in model_outputs(drop={(1, 3)}).items()}
    evaluator = build_evaluator(
        META,
        semantic=True,
        instance=True,
        panoptic=True,
        instances_json=os.path.join(root, "instances.json"),
        panoptic_json=os.path.join(root, "panoptic.json"),
        panoptic_folder=os.path.join(root, "panoptic"),
    )
    queue.put((rank, run(evaluator, samples, outputs)))
    torch.distributed.destroy_process_group()


DATASET_SAMPLES: list = []


def test_distributed_results_are_gathered_on_rank_0(dataset, tmp_path_factory):
    root, samples = dataset
    DATASET_SAMPLES[:] = samples  # inherited by the forked workers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    init_file = tmp_path_factory.mktemp("dist") / "init"
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, str(init_file), str(root), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = build_evaluator(
        META,
        semantic=True,
        instance=True,
        panoptic=True,
        instances_json=root / "instances.json",
        panoptic_json=root / "panoptic.json",
        panoptic_folder=root / "panoptic",
    )
    expected = run(single, samples, model_outputs(drop={(1, 3)}))
    assert got[1] == {}
    assert got[0].keys() == expected.keys()
    for task in expected:
        assert got[0][task] == pytest.approx(expected[task], nan_ok=True)
