"""Augmentations: shapes, label/image alignment, flips, crops, padding, colour, determinism."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from m2f_lite.config import get_config
from m2f_lite.data import transforms as T
from m2f_lite.data.build import build_transforms

PALETTE = torch.tensor(
    [[200.0, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [250, 250, 250]]
)  # [5, 3]


def blocky_sample(h: int = 48, w: int = 64, block: int = 8, seed: int = 0) -> dict:
    """Labels constant on ``block``-sized squares; image = PALETTE[label]; all four label forms."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(5, ((h + block - 1) // block, (w + block - 1) // block), generator=g)
    sem = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]  # [H, W]
    return {
        "image": PALETTE[sem].permute(2, 0, 1).contiguous(),  # [3, H, W]
        "sem_seg": sem,
        "pan_seg": sem * 1000 + 7,  # segment ids, never 0
        "masks": sem[None] == torch.arange(5)[:, None, None],  # [5, H, W]
    }


def assert_aligned(out: dict, n_classes: int = 5, *, image: bool = True) -> None:
    """Labels agree with each other everywhere, and with the image away from label edges."""
    sem, pan, masks = out["sem_seg"], out["pan_seg"], out["masks"]
    assert sem.shape == pan.shape == masks.shape[-2:] == out["image"].shape[-2:]
    valid = sem != 255
    assert torch.equal(pan == 0, ~valid)  # padding is void in both
    assert torch.equal(pan[valid], sem[valid] * 1000 + 7)
    assert torch.equal(masks, (sem[None] == torch.arange(n_classes)[:, None, None]))
    if not image:
        return
    # interior pixels (5x5 neighbourhood with one label; not at a border, where a crop may have cut
    # the pixels that bilinear resizing mixed in) carry exactly their label's colour
    s = torch.nn.functional.pad(sem[None, None].float(), (2, 2, 2, 2), value=-1.0)
    lo = -torch.nn.functional.max_pool2d(-s, 5, 1)[0, 0]
    hi = torch.nn.functional.max_pool2d(s, 5, 1)[0, 0]
    interior = (lo == hi) & valid
    assert interior.sum() > 0.2 * valid.sum()
    expected = PALETTE[sem[interior]]  # [P, 3]
    torch.testing.assert_close(out["image"].permute(1, 2, 0)[interior], expected, atol=1.0, rtol=0)


def test_nearest_resize_matches_pil():
    lab = np.random.default_rng(0).integers(0, 200, (37, 53)).astype(np.uint8)
    for h, w in [(74, 106), (20, 31), (37, 90), (11, 11)]:
        ref = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
        np.testing.assert_array_equal(T.nearest_resize(torch.from_numpy(lab), h, w).numpy(), ref)


def real_sized_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photograph-sized uint8 RGB image: smooth gradients, sharp edges and noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 60, (h, w, 3))
    smooth = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 37 + yy // 23) % 2) * 150], -1)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)  # [H, W, 3]


@pytest.mark.parametrize(
    "size, short, max_size",
    [
        ((480, 640), 800, 1333),  # a COCO image at the COCO test size: enlarged
        ((1024, 2048), 512, 1024),  # a Cityscapes frame halved
        ((512, 683), 512, 2048),  # ADE20K: the short side already 512, nothing to do
        ((375, 500), 640, 2560),  # ADE20K 640 recipe
    ],
)
def test_test_time_resize_is_pil_bilinear_on_uint8_as_detectron2(size, short, max_size):
    """detectron2's ResizeShortestEdge on a uint8 image = PIL bilinear: every value equal."""
    img = real_sized_image(*size)
    h, w = T.shortest_edge_shape(*size, short, max_size)
    ref = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    sample = {"image": torch.from_numpy(img).permute(2, 0, 1).float()}
    out = T.ResizeShortestEdge(short_edge_length=(short,), max_size=max_size)(
        sample, torch.Generator()
    )["image"]
    assert out.shape == (3, h, w) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), ref)
    if (h, w) != size:  # and a float resize (what this package did before) is not it
        old = torch.nn.functional.interpolate(
            sample["image"][None], (h, w), mode="bilinear", align_corners=False, antialias=True
        )[0]
        assert not torch.equal(old, out)


def test_a_resize_to_the_same_size_is_the_identity():
    """The shapes models are evaluated at their native size: nothing may change there."""
    image = torch.from_numpy(real_sized_image(128, 128)).permute(2, 0, 1).float()
    sample = {"image": image, "sem_seg": torch.zeros(128, 128, dtype=torch.long)}
    out = T.ResizeShortestEdge(short_edge_length=(128,), max_size=128)(sample, torch.Generator())
    assert out is sample
    assert T.resize(sample, 128, 128) is sample


def test_flip_is_exact():
    s = blocky_sample()
    out = T.RandomFlip(prob=1.0)(s, torch.Generator().manual_seed(0))
    for k in ("image", "sem_seg", "pan_seg", "masks"):
        assert torch.equal(out[k], s[k].flip(-1))
    assert T.RandomFlip(prob=0.0)(s, torch.Generator()) is s


def test_resize_scale_fits_the_scaled_target_keeping_aspect():
    s = blocky_sample(48, 96)
    for seed in range(5):
        scale = (
            torch.rand(
                (), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            ).item()
            * 1.9
            + 0.1
        )
        out = T.ResizeScale(min_scale=0.1, max_scale=2.0, target_height=64, target_width=64)(
            s, torch.Generator().manual_seed(seed)
        )
        h, w = out["image"].shape[-2:]
        assert w == round(64 * scale) and h == round(
            48 * (64 * scale / 96)
        )  # long side = 64 * scale
        assert out["masks"].shape[-2:] == (h, w)


def test_fixed_size_crop_pads_small_and_crops_large():
    small = blocky_sample(20, 30)
    out = T.FixedSizeCrop(crop_size=(32, 32))(small, torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 32, 32)
    assert torch.equal(out["image"][:, :20, :30], small["image"])  # content kept at the top-left
    assert (out["image"][:, 20:] == 128).all() and (out["image"][:, :, 30:] == 128).all()
    assert (out["sem_seg"][20:] == 255).all() and (out["pan_seg"][:, 30:] == 0).all()
    assert not out["masks"][:, 20:].any()
    big = blocky_sample(48, 64)
    out = T.FixedSizeCrop(crop_size=(32, 32))(big, torch.Generator().manual_seed(1))
    assert out["image"].shape == (3, 32, 32) and (out["sem_seg"] != 255).all()
    assert_aligned(out)


def test_lsj_keeps_labels_aligned_and_is_deterministic():
    cfg = get_config(
        "shapes_tiny", ["data.image_size=40", "data.min_scale=0.1", "data.max_scale=2.0"]
    )
    lsj = build_transforms(cfg.data, train=True)
    assert [type(t).__name__ for t in lsj.transforms] == [
        "RandomFlip",
        "ResizeScale",
        "FixedSizeCrop",
    ]
    s = blocky_sample()
    outs = [lsj(s, torch.Generator().manual_seed(seed)) for seed in range(6)]
    for out in outs:
        assert out["image"].shape == (3, 40, 40)
        assert_aligned(out, image=False)  # downscaled blocks are too small to have interiors
    up = build_transforms(
        get_config("shapes_tiny", ["data.image_size=40", "data.min_scale=1.5"]).data, train=True
    )
    for seed in range(4):  # upscaled x1.9..2.5: the image's colours sit on their labels
        assert_aligned(up(blocky_sample(24, 32), torch.Generator().manual_seed(seed)))
    again = lsj(s, torch.Generator().manual_seed(3))
    for k in s:
        assert torch.equal(again[k], outs[3][k])
    assert len({tuple(o["sem_seg"].flatten()[:200].tolist()) for o in outs}) > 3  # seeds differ


def test_shortest_edge_shape_as_detectron2():
    assert T.shortest_edge_shape(480, 640, 800, 1333) == (800, 1067)
    assert T.shortest_edge_shape(640, 480, 800, 1333) == (1067, 800)
    assert T.shortest_edge_shape(500, 3000, 800, 1333) == (222, 1333)  # long side capped
    assert T.shortest_edge_shape(1024, 2048, 1024, 2048) == (1024, 2048)
    out = T.ResizeShortestEdge(short_edge_length=(16, 24), max_size=1000)(
        blocky_sample(32, 48), torch.Generator()
    )
    assert min(out["image"].shape[-2:]) in (16, 24)
    out = T.ResizeShortestEdge(short_edge_length=(10, 12), max_size=1000, sample_style="range")(
        blocky_sample(32, 48), torch.Generator().manual_seed(0)
    )
    assert min(out["image"].shape[-2:]) in (10, 11, 12)


def test_category_area_crop_respects_the_constraint():
    sem = torch.zeros(100, 100, dtype=torch.long)
    sem[:, 50:] = 1
    sem[:5] = 255  # ignored pixels never count
    s = {"image": torch.zeros(3, 100, 100), "sem_seg": sem}
    crop = T.RandomCrop(crop_size=(50, 50), single_category_max_area=0.9)
    for seed in range(20):
        out = crop(s, torch.Generator().manual_seed(seed))
        counts = torch.bincount(out["sem_seg"][out["sem_seg"] != 255].flatten(), minlength=2)
        assert out["sem_seg"].shape == (50, 50)
        assert (counts > 0).sum() == 2 and counts.max() < 0.9 * counts.sum()
    plain = T.RandomCrop(crop_size=(50, 20))  # 1.0: the official configs' setting, no check
    single = {
        len(torch.unique(plain(s, torch.Generator().manual_seed(k))["sem_seg"][10:])) == 1
        for k in range(30)
    }
    assert single == {True, False}  # sometimes a single-class crop


def test_semantic_recipe_pads_images_smaller_than_the_crop():
    cfg = get_config(
        "ade20k_semantic_r50",
        [
            "data.min_size_train=[40]",
            "data.max_size_train=200",
            "data.crop_size=[64,64]",
            "data.mapper_size_divisibility=64",
        ],
    )
    tf = build_transforms(cfg.data, train=True)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["ResizeShortestEdge", "RandomCrop", "ColorAugSSD", "RandomFlip", "Pad"]
    out = tf(blocky_sample(32, 48), torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 64, 64) and out["sem_seg"].shape == (64, 64)
    assert (out["sem_seg"][40:] == 255).all() and (out["image"][:, 40:] == 128).all()


def test_official_recipes_and_test_sizes():
    ade = build_transforms(get_config("ade20k_semantic_r50").data, train=True).transforms
    assert ade[0].lengths == tuple(
        int(x * 0.1 * 512) for x in range(5, 21)
    )  # the official YAML's expression
    assert (
        ade[0].style == "choice" and ade[0].max_size == 2048 and isinstance(ade[2], T.ColorAugSSD)
    )
    assert ade[1].crop_size == (512, 512) and ade[-1].size == (512, 512)
    city = build_transforms(get_config("cityscapes_semantic_r50").data, train=True).transforms
    assert city[1].crop_size == (512, 1024) and not isinstance(city[-1], T.Pad)
    for preset, size in [
        ("coco_panoptic_r50", (800, 1333)),
        ("ade20k_semantic_r50", (512, 2048)),
        ("ade20k_semantic_swin_l", (640, 2560)),
        ("cityscapes_panoptic_r50", (1024, 2048)),
    ]:
        (t,) = build_transforms(get_config(preset).data, train=False).transforms
        assert (t.lengths[0], t.max_size) == size
    coco = build_transforms(get_config("coco_panoptic_r50").data, train=True).transforms
    assert (coco[1].min_scale, coco[1].max_scale, coco[1].target, coco[2].crop_size) == (
        0.1,
        2.0,
        (1024, 1024),
        (1024, 1024),
    )


def test_hsv_round_trip_and_colorsys():
    rgb = torch.rand(3, 8, 8, dtype=torch.float64)
    hsv = T.rgb_to_hsv(rgb)
    torch.testing.assert_close(T.hsv_to_rgb(hsv), rgb)
    for y, x in [(0, 0), (3, 5), (7, 7)]:
        ref = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        torch.testing.assert_close(hsv[:, y, x], torch.tensor(ref, dtype=torch.float64))


def test_color_aug_changes_only_the_image():
    s = blocky_sample()
    aug = T.ColorAugSSD()
    outs = [aug(s, torch.Generator().manual_seed(k)) for k in range(8)]
    assert any(not torch.equal(o["image"], s["image"]) for o in outs)
    for o in outs:
        assert (
            o["image"].min() >= 0
            and o["image"].max() <= 255
            and torch.equal(o["image"], o["image"].floor())
        )
        assert o["sem_seg"] is s["sem_seg"] and o["masks"] is s["masks"]
    torch.testing.assert_close(aug(s, torch.Generator().manual_seed(5))["image"], outs[5]["image"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sample_style"):
        T.ResizeShortestEdge(short_edge_length=(8,), max_size=10, sample_style="uniform")
    cfg = get_config("shapes_tiny", ["data.mapper=fancy"])
    with pytest.raises(ValueError, match=r"data\.mapper"):
        build_transforms(cfg.data, train=True)
