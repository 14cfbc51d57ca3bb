"""Mask AP through pycocotools: ground truth as predictions gives 100, ids are mapped, errors are clear."""

import json
import math
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from m2f_lite.metrics.coco_ap import encode_mask, evaluate_coco_instances, instances_to_coco_results

DATASET_IDS = [1, 3]  # contiguous class 0 -> category 1 ("cat"), 1 -> 3 ("dog")


def box_mask(y0, y1, x0, x1, shape=(20, 24)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


OBJECTS = {  # image id -> [(contiguous label, mask)]
    7: [(0, box_mask(0, 8, 0, 10)), (1, box_mask(10, 20, 5, 20))],
    9: [(1, box_mask(2, 12, 2, 12)), (0, box_mask(14, 18, 0, 24))],
}


def write_gt(path):
    images, anns = [], []
    for image_id, objects in OBJECTS.items():
        images.append({"id": image_id, "height": 20, "width": 24, "file_name": f"{image_id}.jpg"})
        for label, mask in objects:
            rle = encode_mask(mask)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": DATASET_IDS[label],
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def predictions(label_map=lambda label: label):
    results = []
    for image_id, objects in OBJECTS.items():
        instances = {
            "masks": torch.as_tensor(np.stack([m for _, m in objects])),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([label_map(label) for label, _ in objects]),
        }
        results += instances_to_coco_results(instances, image_id, DATASET_IDS)
    return results


def test_rle_round_trip_and_category_mapping():
    mask = box_mask(3, 9, 4, 11)
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str)  # json-serialisable
    assert rle["size"] == [20, 24] and mask_util.area(rle) == mask.sum()
    assert mask_util.toBbox(rle).tolist() == [4, 3, 7, 6]  # x, y, w, h
    results = predictions()
    assert [r["category_id"] for r in results] == [1, 3, 3, 1]
    assert results[0]["score"] == pytest.approx(0.9) and results[0]["image_id"] == 7


def test_ground_truth_as_predictions_gives_100(tmp_path):
    res = evaluate_coco_instances(write_gt(tmp_path / "gt.json"), predictions())
    for key in ("AP", "AP50", "AP75", "APs", "AP-cat", "AP-dog"):
        assert res[key] == pytest.approx(100.0), key
    assert math.isnan(res["APl"])  # no large ground truth: COCOeval says -1, detectron2 NaN


def test_wrong_classes_and_empty_results(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    swapped = evaluate_coco_instances(gt, predictions(lambda label: 1 - label))
    assert swapped["AP"] == 0.0 and swapped["AP-cat"] == 0.0
    empty = evaluate_coco_instances(gt, [])
    assert empty["AP"] == 0.0 and empty["AP-dog"] == 0.0
    only_image_7 = evaluate_coco_instances(
        gt, [r for r in predictions() if r["image_id"] == 7], img_ids=[7]
    )
    assert only_image_7["AP"] == pytest.approx(100.0)
    assert evaluate_coco_instances(gt, predictions(), per_class=False).keys() == {
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
    }


def test_per_class_ap_is_nan_without_ground_truth(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    data = json.loads((tmp_path / "gt.json").read_text())
    data["categories"].append({"id": 5, "name": "owl"})
    (tmp_path / "gt.json").write_text(json.dumps(data))
    res = evaluate_coco_instances(gt, predictions())
    assert math.isnan(res["AP-owl"]) and res["AP"] == pytest.approx(100.0)


def test_bad_results_raise_clear_errors(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    good = predictions()
    with pytest.raises(ValueError, match="unknown category_id 2"):
        evaluate_coco_instances(gt, [{**good[0], "category_id": 2}])
    with pytest.raises(ValueError, match="image_id 123 is not in the ground truth"):
        evaluate_coco_instances(gt, [{**good[0], "image_id": 123}])
    with pytest.raises(ValueError, match="has no 'score'"):
        evaluate_coco_instances(gt, [{k: v for k, v in good[0].items() if k != "score"}])
    with pytest.raises(FileNotFoundError, match=re.escape("missing.json")):
        evaluate_coco_instances(tmp_path / "missing.json", good)
