"""The predictor: real-world images of any size and format give results at their original size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite.data.synthetic import shapes_meta
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.predictor import Predictor, load_rgb


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = tiny_config(
        Path("unused"), Path("unused"), "data.min_size_test=48", "data.max_size_test=80"
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    return ckpt.save_checkpoint(
        path, model=build_model(cfg), config=cfg, extra={"meta": dataclasses.asdict(shapes_meta())}
    )


@pytest.fixture(scope="module")
def predictor(weights) -> Predictor:
    return Predictor.from_checkpoint(weights, device="cpu")


def _check(result: dict, height: int, width: int, num_classes: int = 7) -> None:
    assert result["image"].shape == (height, width, 3) and result["image"].dtype == np.uint8
    assert result["sem_seg"].shape == (num_classes, height, width)
    ids, segments = result["panoptic_seg"]
    assert ids.shape == (height, width)
    assert {s["id"] for s in segments} >= set(torch.unique(ids).tolist()) - {0}
    inst = result["instances"]
    assert inst["masks"].shape[1:] == (height, width) and len(inst["scores"]) == len(
        inst["labels"]
    ) == len(inst["masks"])


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_jpeg_with_exif_rotation_is_predicted_upright(tmp_path, predictor):
    stored = np.zeros((24, 40, 3), dtype=np.uint8)  # as the camera stored it: 40 wide, 24 high
    stored[:, 20:] = 255  # the right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90° clockwise to view
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    result = predictor(tmp_path / "phone.jpg")
    _check(result, 40, 24)  # upright: 24 wide, 40 high
    image = result["image"].astype(float)
    assert image[20:].mean() > 200 and image[:20].mean() < 50  # the white half is now at the bottom


@pytest.mark.parametrize(
    ("mode", "size"), [("L", (17, 33)), ("RGBA", (31, 50)), ("I;16", (9, 65)), ("P", (64, 64))]
)
def test_grayscale_rgba_16bit_and_palette_pngs(tmp_path, predictor, mode, size):
    h, w = size
    rgb = Image.fromarray(_photo(h, w))
    image = (
        rgb.convert("I").point(lambda v: v * 250).convert("I;16")
        if mode == "I;16"
        else rgb.convert(mode)
    )
    image.save(tmp_path / "x.png")
    result = predictor(str(tmp_path / "x.png"))
    _check(result, h, w)
    if mode == "L":
        assert (result["image"][..., 0] == result["image"][..., 2]).all()  # gray in all channels


def test_arrays_tensors_and_pil_images(predictor):
    photo = _photo(45, 29)
    from_array = predictor(photo)
    _check(from_array, 45, 29)
    from_tensor = predictor(torch.from_numpy(photo).permute(2, 0, 1).float())
    from_pil = predictor(Image.fromarray(photo))
    torch.testing.assert_close(from_tensor["sem_seg"], from_array["sem_seg"])
    torch.testing.assert_close(from_pil["sem_seg"], from_array["sem_seg"])
    _check(predictor(photo[..., 0]), 45, 29)  # [H, W] grayscale array


def test_read_only_inputs_give_writable_arrays():
    # np.asarray(PIL image) is read-only; torch.from_numpy would warn (a failed strict book build)
    frozen = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    frozen.flags.writeable = False
    for image in (
        frozen,
        Image.fromarray(frozen.copy()),
        np.asarray(Image.fromarray(frozen[..., 0])),
    ):
        rgb = load_rgb(image)
        assert rgb.flags.writeable and rgb.flags.c_contiguous and rgb.shape == (5, 6, 3)
    assert np.array_equal(load_rgb(frozen), frozen)


def test_the_result_is_the_evaluation_result(predictor):
    """Test-time resize to the config's sizes, then post-processing back to the original size."""
    photo = _photo(30, 60)
    resized = predictor.resize(
        {"image": torch.from_numpy(photo).permute(2, 0, 1).float()}, torch.Generator()
    )["image"]
    assert tuple(resized.shape[-2:]) == (40, 80)  # short side 48, long side capped at 80
    _check(predictor(photo), 30, 60)


def test_bad_inputs_are_named(tmp_path, predictor):
    with pytest.raises(ValueError, match="missing image"):
        predictor(tmp_path / "nope.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"broken\.png.*corrupt or truncated"):
        predictor(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="expected"):
        load_rgb(np.zeros((2, 3, 4, 5)))


def test_overlays_for_each_task(predictor):
    result = predictor(_photo(20, 36))
    for task in ("panoptic", "instance", "semantic"):
        overlay = predictor.draw(result, task)
        assert overlay.shape == (20, 36, 3) and overlay.dtype == np.uint8
    with pytest.raises(ValueError, match="task='depth'"):
        predictor.draw(result, "depth")


def test_the_predictor_gives_the_evaluation_results(tmp_path, predictor):
    """Image by image, what `m2f-lite predict` writes is what `m2f-lite eval` scores."""
    from tiny_run import make_shapes

    from m2f_lite.config import apply_overrides
    from m2f_lite.data.build import build_dataset
    from m2f_lite.inference import postprocess_from_config

    root = make_shapes(tmp_path / "shapes", n_train=1, n_val=2)
    cfg = apply_overrides(predictor.cfg, {"data.root": str(root)})
    dataset = build_dataset(cfg, "val", train=False)
    for i in range(len(dataset)):
        sample = dataset[i]
        with torch.no_grad():
            outputs = predictor.model([sample["image"]])
        (expected,) = postprocess_from_config(
            outputs, [sample["image_size"]], [sample["orig_size"]], cfg.inference, dataset.meta
        )
        result = predictor(sample["file_name"])
        torch.testing.assert_close(result["sem_seg"], expected["sem_seg"])
        assert torch.equal(result["panoptic_seg"][0], expected["panoptic_seg"][0])
        assert result["panoptic_seg"][1] == expected["panoptic_seg"][1]
        for k in ("masks", "scores", "labels"):
            torch.testing.assert_close(result["instances"][k], expected["instances"][k])


def test_a_semantic_only_checkpoint_takes_the_official_semantic_path(tmp_path, weights, capsys):
    """inference.{instance,panoptic}_on=false (the ADE20K/Cityscapes semantic configs): class scores
    at the padded size, then cropped and resized (not the masks resized first), and nothing else."""
    from m2f_lite.cli import main
    from m2f_lite.inference import sem_seg_postprocess, semantic_inference

    off = ["inference.instance_on=false", "inference.panoptic_on=false"]
    predictor = Predictor.from_checkpoint(weights, device="cpu", overrides=off)
    assert predictor.tasks == ("semantic",)
    photo = _photo(30, 60)
    result = predictor(photo)
    assert set(result) == {"sem_seg", "image"}
    x = predictor.resize(
        {"image": torch.from_numpy(photo).permute(2, 0, 1).float()}, torch.Generator()
    )["image"]
    with torch.no_grad():
        out = predictor.model([x])
    masks = torch.nn.functional.interpolate(
        out["pred_masks"], scale_factor=4, mode="bilinear", align_corners=False
    )[0]  # [Q, Hp, Wp]
    official = sem_seg_postprocess(
        semantic_inference(out["pred_logits"][0], masks), tuple(x.shape[-2:]), 30, 60
    )
    torch.testing.assert_close(result["sem_seg"], official)
    resized_first = semantic_inference(
        out["pred_logits"][0], sem_seg_postprocess(masks, tuple(x.shape[-2:]), 30, 60)
    )
    assert not torch.allclose(result["sem_seg"], resized_first)  # the two paths differ
    with pytest.raises(ValueError, match="predicts semantic"):
        predictor.draw(result, "panoptic")
    # `m2f-lite predict` picks the checkpoint's task, and names a task it does not have
    image = tmp_path / "photo.png"
    Image.fromarray(photo).save(image)
    common = [str(image), "--weights", str(weights), "--out", str(tmp_path / "out"), *off]
    assert main(["predict", *common]) == 0
    assert (tmp_path / "out" / "photo_semantic.png").is_file()
    assert main(["predict", *common, "--task", "instance"]) == 2
    assert "--task instance" in capsys.readouterr().err
    # with instance inference on, instances come too (and panoptic only when asked)
    both = Predictor.from_checkpoint(weights, device="cpu", overrides=off[1:])
    assert both.tasks == ("instance", "semantic") and "instances" in both(photo)
