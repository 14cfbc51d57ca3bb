"""Dataset readers on tiny folders in the real layouts (written here), the sample contract, loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from m2f_lite.config import get_config
from m2f_lite.data import synthetic
from m2f_lite.data.ade20k import ade20k_meta, ade20k_panoptic, ade20k_semantic
from m2f_lite.data.build import build_dataset, collate
from m2f_lite.data.cityscapes import (
    CityscapesInstanceDataset,
    cityscapes_instance_meta,
    cityscapes_meta,
    cityscapes_semantic,
)
from m2f_lite.data.coco_instance import coco_instance_meta
from m2f_lite.data.coco_panoptic import coco_panoptic_meta
from m2f_lite.data.custom import coco_custom
from m2f_lite.data.files import id2rgb, rgb2id
from m2f_lite.data.loader import InferenceSampler, TrainingSampler, build_train_loader

# ------------------------------------------------------------------ fake datasets in the real layouts

# pycocotools calls np.array(..., copy=False) on an object without the copy keyword (numpy 2)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
)


def write_png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def fake_coco(root, h: int = 40, w: int = 50):
    """coco/ with val2017: two images, panoptic (person, crowd person, banner, rug-merged) + instances."""
    pan = np.zeros((h, w), dtype=np.int64)
    pan[:, :25] = 92 * 1000  # banner (stuff)
    pan[:, 25:] = 200 * 1000  # rug-merged (stuff)
    pan[5:15, 5:15] = 11  # person
    pan[20:30, 30:40] = 12  # person crowd
    pan[0, :] = 0  # void row
    segs = [
        {"id": 11, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [5, 5, 10, 10]},
        {"id": 12, "category_id": 1, "iscrowd": 1, "area": 100, "bbox": [30, 20, 10, 10]},
        {
            "id": 92000,
            "category_id": 92,
            "iscrowd": 0,
            "area": int((pan == 92000).sum()),
            "bbox": [0, 1, 25, 39],
        },
        {
            "id": 200000,
            "category_id": 200,
            "iscrowd": 0,
            "area": int((pan == 200000).sum()),
            "bbox": [25, 1, 25, 39],
        },
    ]
    images = []
    only_crowd = np.where(pan == 12, pan, 0)  # image 2 holds the crowd segment alone
    for i, (name, ids) in enumerate(zip(["000000000001", "000000000002"], [pan, only_crowd])):
        write_png(root / "val2017" / f"{name}.png", random_image(h, w, i))
        write_png(root / "panoptic_val2017" / f"{name}.png", id2rgb(ids))
        images.append({"id": i + 1, "file_name": f"{name}.png", "height": h, "width": w})
    cats = [{"id": c[0], "name": c[1], "isthing": c[2], "color": list(c[3])} for c in _coco_cats()]
    write_json(
        root / "annotations" / "panoptic_val2017.json",
        {
            "images": images,
            "categories": cats,
            "annotations": [
                {"image_id": 1, "file_name": "000000000001.png", "segments_info": segs},
                {"image_id": 2, "file_name": "000000000002.png", "segments_info": segs[1:2]},
            ],
        },
    )
    poly = [[5.0, 5.0, 14.0, 5.0, 14.0, 14.0, 5.0, 14.0]]
    crowd = mask_util.frPyObjects(  # uncompressed RLE, as COCO's crowd annotations
        {"size": [h, w], "counts": _uncompressed_counts(pan == 12)}, h, w
    )
    rle = mask_util.encode(np.asfortranarray((pan == 11).astype(np.uint8)))
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": poly,
            "iscrowd": 0,
            "area": 81.0,
            "bbox": [5, 5, 9, 9],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": [h, w], "counts": _uncompressed_counts(pan == 12)},
            "iscrowd": 1,
            "area": 100.0,
            "bbox": [30, 20, 10, 10],
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 3,
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            "iscrowd": 0,
            "area": 100.0,
            "bbox": [5, 5, 10, 10],
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 1,
            "segmentation": {"size": [h, w], "counts": _uncompressed_counts(pan == 12)},
            "iscrowd": 1,
            "area": 100.0,
            "bbox": [30, 20, 10, 10],
        },
    ]
    assert mask_util.area(crowd) == 100
    write_json(
        root / "annotations" / "instances_val2017.json",
        {"images": images, "annotations": anns, "categories": [c for c in cats if c["isthing"]]},
    )
    return pan


def _coco_cats():
    from m2f_lite.data.categories import COCO_PANOPTIC_CATEGORIES

    return COCO_PANOPTIC_CATEGORIES


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major flattened mask, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
    return np.diff(np.concatenate([[0], change])).tolist()[: len(change)]


def fake_ade(root, h: int = 12, w: int = 100) -> np.ndarray:
    stored = np.zeros((h, w), dtype=np.uint8)
    stored[:, 10:20], stored[:, 20:], stored[:4] = 1, 150, 0
    for d, i in (("training", 1), ("validation", 2)):
        write_png(root / "images" / d / f"ADE_{d}_0000000{i}.png", random_image(h, w, i))
        write_png(root / "annotations" / d / f"ADE_{d}_0000000{i}.png", stored)
    return stored


def fake_cityscapes(root, split: str = "val", h: int = 16, w: int = 32):
    stem = "aachen_000000_000019"
    label = np.full((h, w), 7, dtype=np.uint8)  # road
    label[:4] = 23  # sky
    label[-2:] = 0  # unlabeled
    inst = label.astype(np.uint16).copy()
    inst[6:10, 2:8], label[6:10, 2:8] = 26001, 26  # car 1
    inst[6:10, 10:16], label[6:10, 10:16] = 26002, 26  # car 2
    inst[10:13, 20:30], label[10:13, 20:30] = 26, 26  # car group (crowd)
    inst[4:6, 20:24], label[4:6, 20:24] = 29001, 29  # caravan: ignored in evaluation
    inst[4:6, 2:5], label[4:6, 2:5] = 24001, 24  # person
    write_png(
        root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", random_image(h, w)
    )
    write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", label)
    write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_instanceIds.png", inst)
    return label, inst


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.generate(
        tmp_path_factory.mktemp("shapes"), n_train=8, n_val=3, size=64, seed=1
    )


def shapes_cfg(root, *extra):
    return get_config(
        "shapes_tiny", [f"data.root={root}", "data.image_size=48", "data.min_size_test=64", *extra]
    )


# ------------------------------------------------------------------------------------------ tests


def test_metadata_tables():
    coco = coco_panoptic_meta()
    assert (
        coco.num_classes == 133 and sum(coco.is_thing) == 80 and coco.is_thing[:80] == [True] * 80
    )
    assert (
        coco.dataset_ids == sorted(coco.dataset_ids)
        and coco.contiguous_id(200) == 132
        and coco.contiguous_id(92) == 80
    )
    assert coco.classes[0] == "person" and coco.colors[0] == (220, 20, 60)
    ins = coco_instance_meta()
    assert ins.num_classes == 80 and ins.dataset_ids[-1] == 90 and ins.classes == coco.classes[:80]
    ade = ade20k_meta()
    assert (
        ade.num_classes == 150
        and sum(ade.is_thing) == 100
        and ade.classes[:3] == ["wall", "building", "sky"]
    )
    city = cityscapes_meta()
    assert city.num_classes == 19 and city.classes[0] == "road" and city.classes[-1] == "bicycle"
    assert sum(city.is_thing) == 8 and city.dataset_ids[:2] == [7, 8]
    assert cityscapes_instance_meta().classes == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]


def test_sample_contract_and_targets_match_the_files(shapes):
    ds = build_dataset(shapes_cfg(shapes), "train", train=True)
    data = json.loads((shapes / "panoptic_train.json").read_text())
    meta = synthetic.shapes_meta()
    for i in range(len(ds)):
        s = ds.get(i, transform=False)
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 64, 64)
        assert 0 <= s["image"].min() and s["image"].max() <= 255
        assert (
            s["labels"].dtype == torch.long
            and s["masks"].dtype == torch.bool
            and s["sem_seg"].dtype == torch.long
        )
        assert s["orig_size"] == s["image_size"] == (64, 64)
        ann = data["annotations"][i]
        pan = rgb2id(np.asarray(Image.open(shapes / "panoptic_train" / ann["file_name"])))
        segs = [g for g in ann["segments_info"] if not g["iscrowd"]]
        assert s["labels"].tolist() == [meta.contiguous_id(g["category_id"]) for g in segs]
        for m, g in zip(s["masks"], segs):
            assert torch.equal(m, torch.from_numpy(pan == g["id"]))
        assert (s["masks"].sum(0) <= 1).all()  # segments never overlap
        sem = np.asarray(Image.open(shapes / "semantic_train" / ann["file_name"]))
        assert torch.equal(
            s["sem_seg"], torch.from_numpy(sem.astype(np.int64))
        )  # crowd included, as the PNG
    t = ds[0]
    assert (
        t["image"].shape == (3, 48, 48)
        and t["masks"].shape[1:] == (48, 48)
        and t["orig_size"] == (64, 64)
    )
    # every non-crowd segment stays a target after augmentation, emptied or not (official mappers)
    segs = [g for g in data["annotations"][0]["segments_info"] if not g["iscrowd"]]
    assert t["labels"].tolist() == [meta.contiguous_id(g["category_id"]) for g in segs]


def test_the_three_views_of_shapes_agree(shapes):
    pan = build_dataset(shapes_cfg(shapes), "val", train=False)
    ins = build_dataset(
        shapes_cfg(shapes, "data.dataset=shapes_instance", "model.num_classes=4"),
        "val",
        train=False,
    )
    sem = build_dataset(shapes_cfg(shapes, "data.dataset=shapes_semantic"), "val", train=False)
    assert ins.meta.classes == ["circle", "square", "triangle", "star"]
    for i in range(len(pan)):
        p, n, s = pan[i], ins[i], sem[i]
        things = p["labels"] < 4
        assert torch.equal(n["labels"], p["labels"][things]) and torch.equal(
            n["masks"], p["masks"][things]
        )
        assert torch.equal(s["sem_seg"], p["sem_seg"])
        for k, m in zip(s["labels"], s["masks"]):
            assert torch.equal(m, p["sem_seg"] == k)


def test_coco_panoptic_reader(tmp_path):
    pan = fake_coco(tmp_path / "coco")
    cfg = get_config(
        "coco_panoptic_r50", [f"data.root={tmp_path / 'coco'}", "data.min_size_test=0"]
    )
    ds = build_dataset(cfg, "val", train=False)
    s = ds[0]
    assert s["labels"].tolist() == [
        0,
        80,
        132,
    ]  # person, banner, rug-merged; the crowd person left out
    assert torch.equal(s["masks"][0], torch.from_numpy(pan == 11))
    assert (
        s["sem_seg"][25, 35] == 0 and s["sem_seg"][0, 0] == 255
    )  # crowd keeps its class; void ignored
    assert s["image_id"] == 1 and s["file_name"].endswith("000000000001.png")
    assert len(ds[1]["labels"]) == 0 and ds[1]["masks"].shape == (
        0,
        40,
        50,
    )  # only a crowd: no targets
    # panoptic training keeps it, as detectron2 (its filter only sees records with "annotations")
    assert len(build_dataset(cfg, "val", train=True)) == 2
    resized = build_dataset(
        get_config(
            "coco_panoptic_r50",
            [f"data.root={tmp_path / 'coco'}", "data.min_size_test=80", "data.max_size_test=1333"],
        ),
        "val",
        train=False,
    )[0]
    assert (
        resized["image_size"] == (80, 100)
        and resized["orig_size"] == (40, 50)
        and resized["masks"].shape[1:] == (80, 100)
    )


def test_coco_instance_reader_polygons_rle_and_crowd(tmp_path):
    fake_coco(tmp_path / "coco")
    cfg = get_config(
        "coco_instance_r50", [f"data.root={tmp_path / 'coco'}", "data.min_size_test=0"]
    )
    ds = build_dataset(cfg, "val", train=False)
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_val2017.json"))
    s = ds[0]
    assert s["labels"].tolist() == [
        0,
        2,
    ]  # person (polygon), car (compressed RLE); the crowd is left out
    for m, ann_id in zip(s["masks"], [1, 3]):
        assert torch.equal(
            m, torch.from_numpy(coco.annToMask(coco.loadAnns([ann_id])[0]).astype(bool))
        )
    assert "sem_seg" not in s and len(ds[1]["labels"]) == 0
    assert len(build_dataset(cfg, "val", train=True)) == 1


def test_ade20k_semantic_and_panoptic(tmp_path):
    stored = fake_ade(tmp_path / "ADEChallengeData2016")
    cfg = get_config("ade20k_semantic_r50", [f"data.root={tmp_path / 'ADEChallengeData2016'}"])
    ds = build_dataset(cfg, "val", train=False)
    s = ds.get(0, transform=False)
    expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)
    assert torch.equal(s["sem_seg"], torch.from_numpy(expected))
    assert s["labels"].tolist() == [0, 149]
    train = build_dataset(cfg, "train", train=True)[
        0
    ]  # the ADE recipe: long side <= 2048, crop and pad to 512
    assert train["image"].shape == (3, 512, 512) and train["orig_size"] == (12, 100)
    assert (train["sem_seg"][300:] == 255).all() and (train["image"][:, 300:] == 128).all()
    assert set(train["labels"].tolist()) <= {0, 149}
    # ADE20K panoptic: the COCO panoptic reader with ADE's classes (category id = class index)
    root = tmp_path / "ADEChallengeData2016"
    pan = np.where(stored == 150, 7, 0)  # a "bed" (class 7, a thing) segment with id 7
    write_png(root / "ade20k_panoptic_val" / "ADE_validation_00000002.png", id2rgb(pan))
    write_json(
        root / "ade20k_panoptic_val.json",
        {
            "images": [
                {"id": "ADE_validation_00000002", "file_name": "ADE_validation_00000002.png"}
            ],
            "annotations": [
                {
                    "image_id": "ADE_validation_00000002",
                    "file_name": "ADE_validation_00000002.png",
                    "segments_info": [{"id": 7, "category_id": 7, "iscrowd": 0}],
                }
            ],
            "categories": [
                {"id": k, "name": n, "isthing": 1} for k, n in enumerate(ade20k_meta().classes)
            ],
        },
    )
    p = ade20k_panoptic(root, "val")[0]
    assert p["labels"].tolist() == [7] and torch.equal(
        p["masks"][0], torch.from_numpy(stored == 150)
    )
    assert ade20k_semantic(root, "validation").pairs == ds.pairs


def test_cityscapes_semantic_and_instances(tmp_path):
    _, inst = fake_cityscapes(tmp_path / "cityscapes")
    sem = cityscapes_semantic(tmp_path / "cityscapes", "val").get(0, transform=False)
    assert (
        sem["sem_seg"][0, 0] == 10 and sem["sem_seg"][-1, 0] == 255 and sem["sem_seg"][8, 4] == 13
    )  # sky, void, car
    assert sem["sem_seg"][5, 21] == 255  # caravan: ignored
    assert sem["image_id"] == "aachen_000000_000019"
    ins = CityscapesInstanceDataset(root=tmp_path / "cityscapes", split="val").get(
        0, transform=False
    )
    assert ins["labels"].tolist() == [
        0,
        2,
        2,
    ]  # person, car, car (crowd group and caravan left out)
    assert torch.equal(ins["masks"][1], torch.from_numpy(inst == 26001))
    cfg = get_config(
        "cityscapes_instance_r50", [f"data.root={tmp_path / 'cityscapes'}", "data.min_size_test=32"]
    )
    assert build_dataset(cfg, "val", train=False)[0]["image_size"] == (32, 64)


def test_coco_custom_with_explicit_files(shapes):
    ds = coco_custom(
        image_root=shapes / "images" / "val",
        panoptic_json=shapes / "panoptic_val.json",
        panoptic_root=shapes / "panoptic_val",
    )
    assert ds.meta.classes == synthetic.shapes_meta().classes and ds.meta.dataset_ids == [
        1,
        2,
        3,
        4,
        101,
        102,
        103,
    ]
    ref = build_dataset(shapes_cfg(shapes), "val", train=False)
    assert torch.equal(ds[1]["masks"], ref[1]["masks"]) and torch.equal(
        ds[1]["labels"], ref[1]["labels"]
    )
    ins = coco_custom(
        image_root=shapes / "images" / "val", instances_json=shapes / "instances_val.json"
    )
    assert ins.meta.num_classes == 4 and ins.meta.is_thing == [True] * 4
    with pytest.raises(ValueError, match="either panoptic_json"):
        coco_custom(image_root=shapes)
    with pytest.raises(ValueError, match=r"model\.num_classes=5"):
        build_dataset(shapes_cfg(shapes, "model.num_classes=5"), "val", train=False)


def test_augmentation_is_seeded_by_the_key(shapes):
    ds = build_dataset(shapes_cfg(shapes), "train", train=True)
    a, b, c = ds[2, 123], ds[2, 123], ds[2, 124]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["image"], c["image"])


def test_collate_and_samplers(shapes):
    ds = build_dataset(shapes_cfg(shapes), "val", train=False)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and images[0].shape == (3, 64, 64)
    assert "image" not in targets[0] and targets[1]["image_id"] == 1
    one = list(zip(range(40), TrainingSampler(10, seed=5, rank=0, world_size=1)))
    stream = [k for _, k in one]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # each epoch is a permutation
    r0 = [k for _, k in zip(range(20), TrainingSampler(10, seed=5, rank=0, world_size=2))]
    r1 = [k for _, k in zip(range(20), TrainingSampler(10, seed=5, rank=1, world_size=2))]
    assert r0 == stream[0::2] and r1 == stream[1::2]  # two processes split the one-process stream
    resumed = [
        k for _, k in zip(range(10), TrainingSampler(10, seed=5, rank=0, world_size=1, start=30))
    ]
    assert resumed == stream[30:40]
    assert stream != [
        k for _, k in zip(range(40), TrainingSampler(10, seed=6, rank=0, world_size=1))
    ]
    parts = [list(InferenceSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert [i for part in parts for i in part] == list(range(7))


def test_train_loader_repeats_exactly(shapes):
    ds = build_dataset(shapes_cfg(shapes), "train", train=True)
    first = [next(iter(build_train_loader(ds, batch_size=3, seed=9))) for _ in range(2)]
    for a, b in zip(first[0][0], first[1][0]):
        assert torch.equal(a, b)
    assert [t["image_id"] for t in first[0][1]] == [t["image_id"] for t in first[1][1]]
    later = next(
        iter(build_train_loader(ds, batch_size=3, seed=9, start=1))
    )  # resume after one batch
    second = next(x for i, x in enumerate(build_train_loader(ds, batch_size=3, seed=9)) if i == 1)
    assert all(torch.equal(a, b) for a, b in zip(later[0], second[0]))


def test_only_instance_lsj_training_drops_emptied_masks_and_only_instance_data_filters(shapes):
    """detectron2: filter_empty_instances only in the COCO instance LSJ mapper; the image filter
    (FILTER_EMPTY_ANNOTATIONS) only on records with "annotations" (instance data)."""
    instance = ["data.dataset=shapes_instance", "model.num_classes=4"]
    cases = {
        (): (False, False),  # panoptic, LSJ, training
        tuple(instance): (True, False),
        (*instance, "data.mapper=semantic", "data.min_size_train=[48]"): (False, False),
    }
    for extra, (train_drops, eval_drops) in cases.items():
        cfg = shapes_cfg(shapes, *extra)
        assert build_dataset(cfg, "train", train=True).drop_empty_masks is train_drops, extra
        assert build_dataset(cfg, "val", train=False).drop_empty_masks is eval_drops, extra
