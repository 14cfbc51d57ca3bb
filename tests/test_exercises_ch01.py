"""The chapter 1 exercise checks accept right answers and reject typical wrong ones with a hint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2f_lite.data.files import rgb2id
from m2f_lite.exercises import ch01


def test_ex1_accepts_a_correct_decoder_and_the_package_one():
    ch01.check_ex1(lambda rgb: rgb2id(rgb))
    ch01.check_ex1(
        lambda rgb: torch.from_numpy(rgb.astype(np.int64)) @ torch.tensor([1, 256, 65536])
    )


def _uint16_decode(rgb):
    rgb = rgb.astype(np.uint16)  # too narrow: 256 * G and 256² * B wrap around
    return (
        rgb[..., 0] + rgb[..., 1] * np.uint16(256) + rgb[..., 2] * np.uint16(256) * np.uint16(256)
    )


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda rgb: rgb.astype(np.int64) @ np.array([65536, 256, 1]), "channel order is reversed"),
        (_uint16_decode, "overflowed"),
        (lambda rgb: rgb.astype(np.int64), r"one id per pixel, shape \(6, 7\)"),
        (lambda rgb: rgb.astype(np.int64) @ np.array([1, 255, 255**2]), "should decode to"),
    ],
)
def test_ex1_rejects_typical_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch01.check_ex1(wrong)


def test_ex1_rejects_a_decoder_that_modifies_its_input():
    def in_place(rgb):
        rgb[0, 0] = 7
        return rgb2id(rgb)

    with pytest.raises(AssertionError, match="modified its input"):
        ch01.check_ex1(in_place)


def _targets(sem, ignore_label):
    labels = torch.unique(sem)
    labels = labels[labels != ignore_label]
    return labels, sem[None] == labels[:, None, None]


def test_ex2_accepts_correct_targets_in_any_order():
    ch01.check_ex2(_targets)
    ch01.check_ex2(lambda sem, ig: tuple(t.flip(0) for t in _targets(sem, ig)))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (
            lambda sem, ig: (torch.unique(sem), sem[None] == torch.unique(sem)[:, None, None]),
            "ignore label",
        ),
        (lambda sem, ig: (_targets(sem, ig)[0], _targets(sem, ig)[1].long()), "boolean"),
        (lambda sem, ig: (_targets(sem, ig)[0].float(), _targets(sem, ig)[1]), "integer class ids"),
        (lambda sem, ig: (_targets(sem, 255)[0], _targets(sem, 255)[1]), "ignore label 7"),
        (lambda sem, ig: _targets(sem, ig)[1], "pair"),
    ],
)
def test_ex2_rejects_typical_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch01.check_ex2(wrong)


def test_ex2_rejects_masks_of_the_wrong_class():
    def shuffled(sem, ig):
        labels, masks = _targets(sem, ig)
        return labels, masks.roll(1, dims=0)

    with pytest.raises(AssertionError, match="mask of class"):
        ch01.check_ex2(shuffled)


def test_ex3_counts_follow_the_reader_rules():
    # the rules, spelled out independently of targets_per_task: 7 segments, 1 crowd (a thing),
    # 2 stuff, classes {sky, grass, circle, square, star}
    assert ch01.targets_per_task(ch01.EX3_SEGMENTS) == {"panoptic": 6, "instance": 4, "semantic": 5}
    ch01.check_ex3(panoptic=6, instance=4, semantic=5)


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ({"panoptic": 7, "instance": 4, "semantic": 5}, "crowd segments are never targets"),
        ({"panoptic": 6, "instance": 5, "semantic": 5}, "crowd square is not an instance"),
        ({"panoptic": 6, "instance": 6, "semantic": 5}, "stuff .* has no instances"),
        ({"panoptic": 6, "instance": 4, "semantic": 4}, "crowd pixels keep their class"),
        ({"panoptic": 6, "instance": 4, "semantic": 7}, "two circles are one semantic segment"),
    ],
)
def test_ex3_rejects_typical_mistakes(answer, hint):
    with pytest.raises(AssertionError, match=hint):
        ch01.check_ex3(**answer)


def test_ex4_accepts_the_lsj_shapes():
    ch01.check_ex4(resized=(48, 64), final=(128, 128), pad_fraction=1 - 48 * 64 / 128**2)


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ({"resized": (64, 64), "final": (128, 128), "pad_fraction": 0.75}, "aspect ratio"),
        ({"resized": (48, 64), "final": (48, 64), "pad_fraction": 0.0}, "always returns crop_size"),
        (
            {"resized": (48, 64), "final": (128, 128), "pad_fraction": 48 * 64 / 128**2},
            "pad_fraction",
        ),
    ],
)
def test_ex4_rejects_typical_mistakes(answer, hint):
    with pytest.raises(AssertionError, match=hint):
        ch01.check_ex4(**answer)
