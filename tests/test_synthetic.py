"""The synthetic shapes dataset: valid COCO panoptic / instances / semantic files, deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from m2f_lite.cli import main as cli_main
from m2f_lite.data import synthetic
from m2f_lite.data.files import id2rgb, rgb2id

# pycocotools calls np.array(..., copy=False) on an object without the copy keyword (numpy 2)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, size=64, seed=3
    )


def _pan(root, split, name):
    return rgb2id(np.asarray(Image.open(root / f"panoptic_{split}" / name)))


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 65536], [101_000, 4_003, 256**3 - 1]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3, 3)
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    assert tuple(rgb[2, 0]) == (101_000 % 256, 101_000 // 256 % 256, 101_000 // 65536)
    with pytest.raises(ValueError, match="must lie in"):
        id2rgb(np.array([[256**3]]))


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_files_are_consistent(shapes, split):
    data = json.loads((shapes / f"panoptic_{split}.json").read_text())
    cats = {c["id"]: c for c in data["categories"]}
    assert len(data["images"]) == len(data["annotations"]) == (12 if split == "train" else 4)
    assert {im["id"] for im in data["images"]} == {a["image_id"] for a in data["annotations"]}
    for ann in data["annotations"]:
        pan = _pan(shapes, split, ann["file_name"])
        image = np.asarray(Image.open(shapes / "images" / split / ann["file_name"]))
        assert image.shape == (64, 64, 3) and pan.shape == (64, 64)
        segs = ann["segments_info"]
        ids = [s["id"] for s in segs]
        assert len(set(ids)) == len(ids) and 0 not in ids
        # every pixel belongs to exactly one listed segment or to void (0), and vice versa
        assert set(np.unique(pan).tolist()) - {0} == set(ids)
        assert sum(s["area"] for s in segs) + int((pan == 0).sum()) == pan.size
        for s in segs:
            mask = pan == s["id"]
            assert s["area"] == int(mask.sum()) > 0
            ys, xs = np.nonzero(mask)
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert s["category_id"] in cats and s["iscrowd"] in (0, 1)
            assert not (
                s["iscrowd"] and not cats[s["category_id"]]["isthing"]
            )  # only things are crowds
        stuff_ids = [s["category_id"] for s in segs if not cats[s["category_id"]]["isthing"]]
        assert len(stuff_ids) == len(set(stuff_ids))  # one segment per stuff class


def test_semantic_png_matches_panoptic(shapes):
    data = json.loads((shapes / "panoptic_train.json").read_text())
    meta = synthetic.shapes_meta()
    for ann in data["annotations"]:
        pan = _pan(shapes, "train", ann["file_name"])
        sem = np.asarray(Image.open(shapes / "semantic_train" / ann["file_name"]))
        assert sem.dtype == np.uint8
        expected = np.full(pan.shape, 255)
        for s in ann["segments_info"]:
            expected[pan == s["id"]] = meta.contiguous_id(s["category_id"])
        np.testing.assert_array_equal(sem, expected)


def test_instances_json_loads_in_pycocotools(shapes):
    coco = COCO(str(shapes / "instances_train.json"))
    pan_data = json.loads((shapes / "panoptic_train.json").read_text())
    assert sorted(coco.getCatIds()) == list(synthetic.THING_IDS)
    n_things = 0
    for ann in pan_data["annotations"]:
        pan = _pan(shapes, "train", ann["file_name"])
        things = [s for s in ann["segments_info"] if s["category_id"] in synthetic.THING_IDS]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]]))
        assert len(inst) == len(things)
        for s, a in zip(things, inst):
            np.testing.assert_array_equal(coco.annToMask(a).astype(bool), pan == s["id"])
            assert (a["category_id"], a["iscrowd"], a["area"]) == (
                s["category_id"],
                s["iscrowd"],
                s["area"],
            )
            assert a["bbox"] == [float(v) for v in s["bbox"]]
            n_things += 1
    assert n_things > 0


def test_deterministic_given_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", n_train=3, n_val=1, size=48, seed=7)
    b = synthetic.generate(tmp_path / "b", n_train=3, n_val=1, size=48, seed=7)
    c = synthetic.generate(tmp_path / "c", n_train=3, n_val=1, size=48, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 3 + 2 * 2 + 1  # 4 images x 3 PNGs + 2 splits x 2 JSONs + the marker
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    img = "images/train/000000.png"
    assert not np.array_equal(np.asarray(Image.open(a / img)), np.asarray(Image.open(c / img)))
    # an image depends on (seed, split, index) only: rendering it alone gives the same pixels
    image, pan, _ = synthetic.render(2, size=48, seed=7, split="train")
    np.testing.assert_array_equal(image, np.asarray(Image.open(a / "images/train/000002.png")))
    np.testing.assert_array_equal(pan, _pan(a, "train", "000002.png"))


def test_category_metadata(shapes):
    meta = synthetic.shapes_meta()
    assert meta.num_classes == 7
    assert meta.classes == ["circle", "square", "triangle", "star", "sky", "grass", "water"]
    assert meta.is_thing == [True] * 4 + [False] * 3 and meta.thing_ids == [0, 1, 2, 3]
    assert meta.dataset_ids == [1, 2, 3, 4, 101, 102, 103]
    assert len(set(meta.colors)) == 7
    pan = json.loads((shapes / "panoptic_val.json").read_text())["categories"]
    assert [(c["id"], c["name"], bool(c["isthing"]), tuple(c["color"])) for c in pan] == list(
        zip(meta.dataset_ids, meta.classes, meta.is_thing, meta.colors)
    )
    ins = json.loads((shapes / "instances_val.json").read_text())["categories"]
    assert [c["id"] for c in ins] == [1, 2, 3, 4]


def test_500_images_quickly_with_realistic_statistics(tmp_path):
    """The book's size (500 images of 128²) runs in seconds; void and crowd are present but rare."""
    out = synthetic.generate(tmp_path, n_train=500, n_val=0, size=128, seed=0)
    assert len(list((out / "images" / "train").iterdir())) == 500
    data = json.loads((out / "panoptic_train.json").read_text())
    segs = [s for a in data["annotations"] for s in a["segments_info"]]
    void = 1 - sum(s["area"] for s in segs) / (500 * 128 * 128)
    assert 0 < void < 0.02
    crowd_images = sum(any(s["iscrowd"] for s in a["segments_info"]) for a in data["annotations"])
    assert 5 <= crowd_images <= 60
    n_things = [
        sum(s["category_id"] < 100 for s in a["segments_info"]) for a in data["annotations"]
    ]
    assert min(n_things) >= 0 and max(n_things) >= 5 and np.mean(n_things) > 2
    assert {s["category_id"] for s in segs} == set(synthetic.THING_IDS) | set(synthetic.STUFF_IDS)


def test_cli_writes_the_dataset(tmp_path, capsys):
    rc = cli_main(
        [
            "data",
            "synthetic",
            "--out",
            str(tmp_path / "s"),
            "--n-train",
            "2",
            "--n-val",
            "1",
            "--size",
            "32",
        ]
    )
    assert rc == 0
    assert (tmp_path / "s" / "panoptic_val.json").is_file()
    assert "2 train + 1 val" in capsys.readouterr().out
