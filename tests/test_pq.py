"""PQ on hand-computed cases: void, crowd, unmatched, stuff, and panopticapi's format errors."""

import json
import re

import numpy as np
import pytest

from m2f_lite.metrics.panoptic_format import id2rgb, read_panoptic_png, rgb2id, write_panoptic_png
from m2f_lite.metrics.pq import pq_compute, pq_summary

PERSON, CAR, SKY, GRASS = 1, 2, 10, 11
CATEGORIES = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": GRASS, "name": "grass", "isthing": 0},
]


def rows(spec: dict[int, tuple[int, int, int, int]], shape=(10, 10)) -> np.ndarray:
    """An id map: ``{id: (row0, row1, col0, col1)}`` painted in order (end-exclusive)."""
    m = np.zeros(shape, np.uint32)
    for seg_id, (r0, r1, c0, c1) in spec.items():
        m[r0:r1, c0:c1] = seg_id
    return m


def write_case(tmp_path, images, categories=CATEGORIES, gt_area_override=None):
    """images: list of (gt_map, gt_segments, pred_map, pred_segments); returns pq_compute's 4 paths."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt_anns, pred_anns = [], []
    for i, (gt, gt_segs, pred, pred_segs) in enumerate(images):
        ids, counts = np.unique(gt, return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        gt_segs = [{"iscrowd": 0, "area": area.get(s["id"], 0), **s} for s in gt_segs]
        for s in gt_segs:
            if gt_area_override and s["id"] in gt_area_override:
                s["area"] = gt_area_override[s["id"]]
        write_panoptic_png(tmp_path / "gt" / f"{i}.png", gt)
        write_panoptic_png(tmp_path / "pred" / f"{i}.png", pred)
        gt_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": pred_segs})
    (tmp_path / "gt.json").write_text(
        json.dumps({"annotations": gt_anns, "categories": categories})
    )
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return (
        str(tmp_path / "gt.json"),
        str(tmp_path / "pred.json"),
        str(tmp_path / "gt"),
        str(tmp_path / "pred"),
    )


def seg(seg_id, cat, **kw):
    return {"id": seg_id, "category_id": cat, **kw}


def test_rgb_id_round_trip(tmp_path):
    ids = np.array([[0, 1, 255], [256, 65536, 256**3 - 1]], np.uint32)
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)
    assert id2rgb(np.array([[1 + 2 * 256 + 3 * 65536]]))[0, 0].tolist() == [
        1,
        2,
        3,
    ]  # R + 256 G + 256² B
    write_panoptic_png(tmp_path / "a.png", ids)
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "a.png"), ids)
    with pytest.raises(ValueError, match=re.escape("0..16777215")):
        id2rgb(np.array([[256**3]]))


def test_pq_of_ground_truth_is_one(tmp_path):
    gt = rows(
        {1: (0, 3, 0, 10), 2: (3, 5, 0, 5), 3: (5, 10, 0, 10), 4: (3, 5, 5, 8)}
    )  # void at 3:5, 8:10
    segs = [seg(1, SKY), seg(2, PERSON), seg(3, GRASS), seg(4, PERSON, iscrowd=1)]
    res = pq_compute(
        *write_case(
            tmp_path,
            [
                (
                    gt,
                    segs,
                    gt,
                    [seg(i, c) for i, c in [(1, SKY), (2, PERSON), (3, GRASS), (4, PERSON)]],
                )
            ],
        )
    )
    for group, n in (("All", 3), ("Things", 1), ("Stuff", 2)):  # car never occurs: not counted
        assert res[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert res["per_class"][CAR] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert pq_summary(res)["PQ"] == 100.0


def test_void_unmatched_and_stuff(tmp_path):
    # gt: person rows 0-1, void row 2, grass row 3, car rows 4-5, sky rows 6-9
    gt = rows({1: (0, 2, 0, 10), 3: (3, 4, 0, 10), 4: (4, 6, 0, 10), 5: (6, 10, 0, 10)})
    gt_segs = [seg(1, PERSON), seg(3, GRASS), seg(4, CAR), seg(5, SKY)]
    # pred: person rows 0-2 (its void row leaves the union): IoU 20 / (30 + 20 - 20 - 10) = 1
    # grass half of row 3: IoU 5/10 = 0.5 is not > 0.5 (FN + FP); car 16 of 20 px: IoU 0.8
    # sky gets the rest: 49 px, 40 on the gt sky: IoU 40/49
    pred = rows({15: (3, 10, 0, 10), 11: (0, 3, 0, 10), 13: (3, 4, 0, 5), 14: (4, 6, 0, 8)})
    pred_segs = [seg(11, PERSON), seg(13, GRASS), seg(14, CAR), seg(15, SKY)]
    res = pq_compute(*write_case(tmp_path, [(gt, gt_segs, pred, pred_segs)]))
    sky = 40 / 49
    assert res["per_class"][PERSON]["pq"] == pytest.approx(1.0)
    assert res["per_class"][CAR] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0})
    assert res["per_class"][GRASS] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert res["per_class"][SKY]["pq"] == pytest.approx(sky)
    assert res["All"] == pytest.approx(
        {"pq": (1 + 0.8 + 0 + sky) / 4, "sq": (1 + 0.8 + sky) / 4, "rq": 0.75, "n": 4}
    )
    assert res["Things"]["pq"] == pytest.approx(0.9)
    assert res["Stuff"] == pytest.approx({"pq": sky / 2, "sq": sky / 2, "rq": 0.5, "n": 2})


def test_crowd_regions(tmp_path):
    # gt: person crowd rows 0-4, person rows 5-6, sky rows 7-9
    gt = rows({1: (0, 5, 0, 10), 2: (5, 7, 0, 10), 3: (7, 10, 0, 10)})
    gt_segs = [seg(1, PERSON, iscrowd=1), seg(2, PERSON), seg(3, SKY)]
    # person 11 lies on the crowd: not a FP. person 12 (rows 4-6) matches with IoU 20/30: crowd
    # pixels stay in the union. car 13 on sky: a FP (the crowd is a person crowd). sky 14: 20/30.
    pred = rows({11: (0, 4, 0, 10), 12: (4, 7, 0, 10), 13: (7, 8, 0, 10), 14: (8, 10, 0, 10)})
    pred_segs = [seg(11, PERSON), seg(12, PERSON), seg(13, CAR), seg(14, SKY)]
    res = pq_compute(*write_case(tmp_path, [(gt, gt_segs, pred, pred_segs)]))
    assert res["per_class"][PERSON] == pytest.approx({"pq": 2 / 3, "sq": 2 / 3, "rq": 1.0})
    assert res["per_class"][CAR] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert res["Things"]["n"] == 2  # the car FP makes car count
    assert res["All"]["pq"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)


def test_only_the_last_crowd_of_a_category_is_ignored(tmp_path):
    # panopticapi keeps one crowd region per category: the last one listed in the json
    gt = rows({1: (0, 3, 0, 10), 2: (3, 6, 0, 10), 3: (6, 10, 0, 10)})
    gt_segs = [seg(1, PERSON, iscrowd=1), seg(2, PERSON, iscrowd=1), seg(3, SKY)]
    pred = rows({11: (0, 3, 0, 10), 12: (3, 6, 0, 10), 13: (6, 10, 0, 10)})
    pred_segs = [seg(11, PERSON), seg(12, PERSON), seg(13, SKY)]
    res = pq_compute(*write_case(tmp_path, [(gt, gt_segs, pred, pred_segs)]))
    assert res["per_class"][PERSON]["rq"] == 0.0  # 11 on the first crowd counts as a FP
    assert res["All"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})


def test_ground_truth_area_comes_from_the_json(tmp_path):
    gt = rows({1: (0, 2, 0, 10), 2: (2, 10, 0, 10)})
    pred = rows({11: (0, 2, 0, 10), 12: (2, 10, 0, 10)})
    paths = write_case(
        tmp_path,
        [(gt, [seg(1, PERSON), seg(2, SKY)], pred, [seg(11, PERSON), seg(12, SKY)])],
        gt_area_override={1: 30},
    )
    res = pq_compute(*paths)
    assert res["per_class"][PERSON]["pq"] == pytest.approx(20 / 30)  # union = 20 + 30 - 20


def test_json_segment_absent_from_gt_png_is_a_false_negative(tmp_path):
    gt = rows({1: (0, 10, 0, 10)})
    paths = write_case(tmp_path, [(gt, [seg(1, SKY), seg(7, PERSON)], gt, [seg(1, SKY)])])
    res = pq_compute(*paths)
    assert res["per_class"][PERSON] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert res["Things"]["n"] == 1 and res["Stuff"]["pq"] == 1.0


def test_things_only_dataset_reports_empty_stuff(tmp_path):
    gt = rows({1: (0, 5, 0, 10)})
    res = pq_compute(
        *write_case(
            tmp_path, [(gt, [seg(1, PERSON)], gt, [seg(1, PERSON)])], categories=CATEGORIES[:2]
        )
    )
    assert res["Stuff"] == {
        "pq": 0.0,
        "sq": 0.0,
        "rq": 0.0,
        "n": 0,
    }  # panopticapi would divide by zero
    assert res["Things"]["pq"] == 1.0


def test_process_pool_equals_in_process(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        r0 = int(rng.integers(0, 8))
        gt = rows({1: (0, 4, 0, 10), 2: (4, 10, 0, 10), 3: (r0, r0 + 2, 2, 9)})
        pred = np.roll(gt, int(rng.integers(0, 3)), axis=0)
        segs = [seg(1, SKY), seg(2, GRASS), seg(3, PERSON)]
        present = [s for s in segs if (pred == s["id"]).any()]
        images.append((gt, [s for s in segs if (gt == s["id"]).any()], pred, present))
    paths = write_case(tmp_path, images)
    assert pq_compute(*paths, num_workers=2) == pq_compute(*paths, num_workers=1)


def test_default_folders_are_the_json_names(tmp_path):
    gt = rows({1: (0, 10, 0, 10)})
    gt_json, pred_json, _, _ = write_case(tmp_path, [(gt, [seg(1, SKY)], gt, [seg(1, SKY)])])
    assert pq_compute(gt_json, pred_json)["All"]["pq"] == 1.0  # gt.json -> gt/, pred.json -> pred/


@pytest.mark.parametrize(
    ("pred_segs", "message"),
    [
        ([seg(1, 99)], "segment with ID 1 has unknown category_id 99"),
        ([], "segment with ID 1 is presented in PNG and not presented in JSON"),
        (
            [seg(1, SKY), seg(5, SKY)],
            r"segment IDs \[5\] are presented in JSON and not presented in PNG",
        ),
    ],
)
def test_prediction_format_errors(tmp_path, pred_segs, message):
    gt = rows({1: (0, 10, 0, 10)})
    paths = write_case(tmp_path, [(gt, [seg(1, SKY)], gt, pred_segs)])
    with pytest.raises(KeyError, match=message) as info:  # a KeyError, as panopticapi raises
        pq_compute(*paths)
    assert isinstance(info.value, ValueError)


def test_missing_prediction_and_missing_files(tmp_path):
    gt = rows({1: (0, 10, 0, 10)})
    gt_json, pred_json, gt_dir, pred_dir = write_case(
        tmp_path, [(gt, [seg(1, SKY)], gt, [seg(1, SKY)])]
    )
    with pytest.raises(FileNotFoundError, match="with predicted segmentations doesn't exist"):
        pq_compute(gt_json, pred_json, gt_dir, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape("nope.json")):
        pq_compute(gt_json, str(tmp_path / "nope.json"), gt_dir, pred_dir)
    (tmp_path / "empty.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no prediction for the image with id: 0"):
        pq_compute(gt_json, str(tmp_path / "empty.json"), gt_dir, pred_dir)
    (tmp_path / "pred" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("0.png")):
        pq_compute(gt_json, pred_json, gt_dir, pred_dir)
    (tmp_path / "bad.json").write_text(
        json.dumps(
            {"annotations": [{"image_id": 0, "file_name": "0.png", "segments_info": [{"id": 1}]}]}
        )
    )
    with pytest.raises(ValueError, match="has a segment without 'category_id'"):
        pq_compute(gt_json, str(tmp_path / "bad.json"), gt_dir, pred_dir)
