"""Bad data (issue #11): each case is handled, or stopped with an error naming the file and field;
``m2f-lite data check`` reports all of them in one run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_datasets import write_json, write_png

from m2f_lite.cli import main as cli_main
from m2f_lite.config import get_config
from m2f_lite.data import synthetic
from m2f_lite.data.build import build_dataset
from m2f_lite.data.check import check
from m2f_lite.data.coco_panoptic import COCOPanopticDataset
from m2f_lite.data.custom import coco_custom
from m2f_lite.data.files import DatasetError, id2rgb, read_image
from m2f_lite.data.semantic import SemanticDataset

# pycocotools calls np.array(..., copy=False) on an object without the copy keyword (numpy 2)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
)


@pytest.fixture
def shapes(tmp_path_factory, tmp_path):
    """A fresh copy of a tiny shapes dataset that a test may damage."""
    base = tmp_path_factory.getbasetemp() / "shapes_clean"
    if not base.exists():
        synthetic.generate(base, n_train=3, n_val=2, size=48, seed=2)
    shutil.copytree(base, tmp_path / "shapes")
    return tmp_path / "shapes"


def panoptic(root, split="val"):
    return coco_custom(
        image_root=root / "images" / split,
        panoptic_json=root / f"panoptic_{split}.json",
        panoptic_root=root / f"panoptic_{split}",
        meta=synthetic.shapes_meta(),
    )


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def problems(root, severity):
    return [p for p in check(root).problems if p.severity == severity]


def test_clean_dataset_passes_the_check(shapes, capsys):
    assert problems(shapes, "error") == []
    assert cli_main(["data", "check", str(shapes)]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def test_missing_image_and_annotation_files(shapes):
    (shapes / "images" / "val" / "000001.png").unlink()
    with pytest.raises(DatasetError, match=r"000001\.png: missing image"):
        panoptic(shapes)[1]
    (shapes / "panoptic_val.json").unlink()
    with pytest.raises(DatasetError, match=r"panoptic_val\.json: missing annotation file"):
        panoptic(shapes)
    found = {(p.file.split("/")[-1], p.message.split(" (")[0]) for p in problems(shapes, "error")}
    assert ("000001.png", "missing image") in found


def test_corrupt_and_truncated_images(shapes):
    img = shapes / "images" / "val" / "000000.png"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])  # truncated
    (shapes / "images" / "val" / "000001.png").write_bytes(b"not an image at all")
    for i in (0, 1):
        with pytest.raises(DatasetError, match="corrupt or truncated image"):
            panoptic(shapes)[i]
    assert sum("corrupt or truncated" in p.message for p in problems(shapes, "error")) == 2


def test_grayscale_rgba_and_16_bit_images_are_converted(tmp_path, shapes):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    gray16 = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000).astype(np.uint16)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert np.array_equal(read_image(tmp_path / "gray.png"), np.repeat(rgb[..., :1], 3, axis=2))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    g = read_image(tmp_path / "g16.png")
    assert (
        g.shape == (6, 5, 3) and g.dtype == np.uint8 and g[-1, -1, 0] == round(58000 * 255 / 65535)
    )
    # in a dataset: read as RGB, reported as notes (not errors)
    val = shapes / "images" / "val"
    Image.open(val / "000000.png").convert("L").save(val / "000000.png")
    Image.open(val / "000001.png").convert("RGBA").save(val / "000001.png")
    assert panoptic(shapes)[0]["image"].shape == (3, 48, 48) and panoptic(shapes)[1][
        "image"
    ].shape == (3, 48, 48)
    notes = " ".join(p.message for p in problems(shapes, "info"))
    assert "L image: converted to RGB" in notes and "RGBA image" in notes
    assert problems(shapes, "error") == []


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # a white top-left corner, as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    shown = read_image(tmp_path / "photo.jpg")
    assert shown.shape == (6, 4, 3)  # upright: width and height swapped
    assert shown[0, -1].min() > 200 and shown[0, 0].max() < 50  # the corner moved to the top right
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "photo.jpg").rename(tmp_path / "images" / "val" / "photo.jpg")
    write_png(
        tmp_path / "semantic_val" / "photo.png", np.zeros((6, 4), np.uint8)
    )  # labels of the upright image
    report = check(tmp_path, fmt="semantic", num_classes=3)
    assert [p.severity for p in report.problems] == ["info"] and "orientation 6" in report.problems[
        0
    ].message


def test_malformed_json_names_line_and_column(shapes):
    (shapes / "panoptic_val.json").write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(
        DatasetError, match=r"panoptic_val\.json: malformed JSON at line 2, column 12"
    ):
        panoptic(shapes)
    assert any("line 2, column 12" in p.message for p in problems(shapes, "error"))


def test_unknown_category_id(shapes):
    edit_json(
        shapes / "panoptic_val.json",
        lambda d: d["annotations"][0]["segments_info"][1].update(category_id=55),
    )
    with pytest.raises(
        DatasetError,
        match=r"annotations\[0\]\.segments_info\[1\]\.category_id: unknown category id 55",
    ):
        panoptic(shapes)
    assert any(
        p.field == "annotations[0].segments_info[1].category_id" for p in problems(shapes, "error")
    )


def test_segment_ids_missing_from_the_png_or_from_the_json(shapes):
    data = json.loads((shapes / "panoptic_val.json").read_text())
    segs = data["annotations"][0]["segments_info"]
    dropped = segs.pop(0)  # now in the PNG only
    (shapes / "panoptic_val.json").write_text(json.dumps(data))
    png = shapes / "panoptic_val" / "000000.png"
    # the readers refuse both, as `data check` does (before: void pixels, or an empty target)
    with pytest.raises(
        DatasetError, match=rf"000000\.png: segment ids \[{dropped['id']}\] are in the PNG but not"
    ) as e:
        panoptic(shapes)[0]
    assert e.value.file == str(png)
    segs.insert(0, dropped)
    segs.append({"id": 999, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]})
    (shapes / "panoptic_val.json").write_text(json.dumps(data))  # 999: in the JSON only
    with pytest.raises(
        DatasetError,
        match=r"segment ids \[999\] are in the JSON's segments_info but not in the PNG",
    ):
        panoptic(shapes)[0]
    cfg = get_config("shapes_tiny", [f"data.root={shapes}"])
    with pytest.raises(DatasetError, match="999"):  # the training reader too
        build_dataset(cfg, "val", train=True)[0, 0]
    errs = " | ".join(f"{p.field}: {p.message}" for p in problems(shapes, "error"))
    assert "segment 999: in the JSON" in errs
    segs.pop(-1)
    segs.pop(0)
    (shapes / "panoptic_val.json").write_text(json.dumps(data))
    errs = " | ".join(f"{p.field}: {p.message}" for p in problems(shapes, "error"))
    assert f"segment {dropped['id']}: in the PNG" in errs


def test_json_height_and_width_must_agree_with_the_image(shapes):
    edit_json(shapes / "panoptic_val.json", lambda d: d["images"][1].update(height=50))
    with pytest.raises(
        DatasetError,
        match=r"000001\.png: height/width: image is 48x48 but .*panoptic_val\.json says 50x48",
    ):
        panoptic(shapes)[1]
    assert panoptic(shapes)[0]["masks"].shape[-2:] == (48, 48)  # the other images still read
    assert any(p.field == "height/width" for p in problems(shapes, "error"))


def test_image_with_no_segments(shapes):
    edit_json(shapes / "panoptic_val.json", lambda d: d["annotations"][1].update(segments_info=[]))
    write_png(shapes / "panoptic_val" / "000001.png", id2rgb(np.zeros((48, 48), dtype=np.int64)))
    s = panoptic(shapes)[1]
    assert s["labels"].shape == (0,) and s["masks"].shape == (0, 48, 48)
    cfg = get_config("shapes_tiny", [f"data.root={shapes}"])
    n_val = len(build_dataset(cfg, "val", train=False))
    assert len(build_dataset(cfg, "val", train=True)) == n_val  # panoptic: kept, as detectron2
    assert any("no (non-crowd) segments" in p.message for p in problems(shapes, "warning"))


def test_class_ids_at_or_above_num_classes(shapes, tmp_path):
    sem = shapes / "semantic_val" / "000000.png"
    arr = np.asarray(Image.open(sem)).copy()
    arr[0, :3] = 7  # 7 classes: 0..6
    Image.fromarray(arr).save(sem)
    ds = SemanticDataset(
        pairs=[(shapes / "images" / "val" / "000000.png", sem)], meta=synthetic.shapes_meta()
    )
    with pytest.raises(
        DatasetError, match=r"000000\.png: pixel values: class ids \[7\] are outside 0\.\.6"
    ):
        ds[0]
    assert any(p.field == "pixel values" for p in problems(shapes, "error"))
    rgb_label = tmp_path / "rgb_label.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(rgb_label)
    with pytest.raises(DatasetError, match="single-channel"):
        SemanticDataset(
            pairs=[(shapes / "images" / "val" / "000000.png", rgb_label)],
            meta=synthetic.shapes_meta(),
        )[0]


def test_image_and_annotation_sizes_must_agree(shapes):
    Image.open(shapes / "images" / "val" / "000000.png").resize((40, 48)).save(
        shapes / "images" / "val" / "000000.png"
    )
    edit_json(shapes / "panoptic_val.json", lambda d: d["images"][0].update(width=40))
    with pytest.raises(
        DatasetError, match=r"000000\.png: image is 48x40 but its annotation has another size"
    ):
        panoptic(shapes)[0]  # the JSON agrees with the image, the PNG does not
    assert any(p.field == "height/width" for p in problems(shapes, "error"))


def test_masks_emptied_by_augmentation_are_kept_except_by_coco_instance_lsj(tmp_path):
    pan = np.full((64, 64), 100, dtype=np.int64)
    pan[10, 10] = 5  # a 1-pixel segment: gone once the image is shrunk
    pan[30:50, 30:50] = 6
    write_png(tmp_path / "img" / "a.png", np.zeros((64, 64, 3), np.uint8))
    write_png(tmp_path / "pan" / "a.png", id2rgb(pan))
    write_json(
        tmp_path / "pan.json",
        {
            "images": [{"id": 0, "file_name": "a.png", "height": 64, "width": 64}],
            "annotations": [
                {
                    "image_id": 0,
                    "file_name": "a.png",
                    "segments_info": [
                        {"id": 100, "category_id": 101, "iscrowd": 0},
                        {"id": 5, "category_id": 1, "iscrowd": 0},
                        {"id": 6, "category_id": 2, "iscrowd": 0},
                    ],
                }
            ],
            "categories": [],
        },
    )
    from m2f_lite.data.build import build_transforms

    tf = build_transforms(
        get_config(
            "shapes_tiny", ["data.image_size=32", "data.min_scale=0.1", "data.max_scale=0.4"]
        ).data,
        train=True,
    )
    ds = COCOPanopticDataset(
        image_root=tmp_path / "img",
        panoptic_json=tmp_path / "pan.json",
        panoptic_root=tmp_path / "pan",
        meta=synthetic.shapes_meta(),
        transforms=tf,
    )
    assert ds.get(0, transform=False)["labels"].tolist() == [4, 0, 1]
    emptied = 0
    for seed in range(5):
        s = ds[0, seed]
        assert s["image"].shape == (3, 32, 32)  # smaller than the crop: padded
        assert s["labels"].tolist() == [4, 0, 1]  # the official panoptic mappers keep them all
        emptied += int(not s["masks"][1].any())
        ds.drop_empty_masks = True  # what build_dataset sets for instance data under LSJ
        d = ds[0, seed]
        ds.drop_empty_masks = False
        assert d["masks"].flatten(1).any(1).all() and len(d["labels"]) == 3 - int(
            not s["masks"].flatten(1).any(1).all()
        )
    assert emptied > 0  # the 1-pixel segment did vanish in some draws


def test_check_reports_every_problem_at_once(shapes, capsys):
    (shapes / "images" / "train" / "000002.png").unlink()
    edit_json(
        shapes / "panoptic_train.json",
        lambda d: d["annotations"][0]["segments_info"][0].update(category_id=77),
    )
    edit_json(shapes / "instances_val.json", lambda d: d["annotations"][0].update(category_id=88))
    (shapes / "semantic_val" / "000001.png").unlink()
    assert cli_main.__module__ == "m2f_lite.cli"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "check", str(shapes)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    for needle in (
        "000002.png: missing image",
        "unknown category id 77",
        "unknown category id 88",
        "missing label PNG",
    ):
        assert needle in out
