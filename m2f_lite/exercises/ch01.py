"""Checks for the exercises of chapter 1 (tasks and data).

Each ``check_exN`` returns ``None`` when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint::

    from m2f_lite.exercises import ch01
    ch01.check_ex1(decode_ids)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from m2f_lite.data import transforms as T
from m2f_lite.data.synthetic import shapes_meta

# --- exercise 1: decode a panoptic PNG ------------------------------------------------------------


def _reference_ids(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]  # [H, W]


def _ex1_input() -> np.ndarray:
    """A small RGB id map with random colours and a few pixels whose ids are easy to read."""
    rgb = np.random.default_rng(1).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)  # [H, W, 3]
    rgb[0, 0] = (0, 0, 0)  # void
    rgb[0, 1] = (136, 138, 1)  # 101000: the "sky" stuff segment of the shapes dataset
    rgb[0, 2] = (255, 255, 255)  # the largest id three bytes can hold: 256**3 - 1
    rgb[0, 3] = (1, 0, 0)
    rgb[0, 4] = (0, 1, 0)
    rgb[0, 5] = (0, 0, 1)
    return rgb


def check_ex1(decode_ids: Callable[[np.ndarray], np.ndarray]) -> None:
    """``decode_ids(rgb)``: uint8 ``[H, W, 3]`` → segment ids ``[H, W]`` (``R + 256 G + 256² B``)."""
    rgb = _ex1_input()
    original = rgb.copy()
    got = decode_ids(rgb)
    assert np.array_equal(rgb, original), "decode_ids modified its input array; work on a copy"
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = _reference_ids(rgb)
    assert got.shape == expected.shape, (
        f"expected one id per pixel, shape {expected.shape} ([H, W]), got {got.shape}. "
        "Combine the three channels of each pixel into one number."
    )
    if np.array_equal(got.astype(np.int64), expected):
        return
    rgb64 = rgb.astype(np.int64)
    reversed_order = rgb64[..., 2] + 256 * rgb64[..., 1] + 256**2 * rgb64[..., 0]
    assert not np.array_equal(got.astype(np.int64), reversed_order), (
        "the channel order is reversed: R is the lowest byte, id = R + 256 G + 256² B "
        "(panopticapi's rgb2id), not B + 256 G + 256² R."
    )
    if got.dtype.kind in "iu" and got.dtype.itemsize < 4:
        wrapped = expected % (2 ** (8 * got.dtype.itemsize))
        assert not np.array_equal(
            got.astype(np.int64) % (2 ** (8 * got.dtype.itemsize)), wrapped
        ), (
            f"your ids have dtype {got.dtype}, too narrow for ids up to 256³ - 1: the arithmetic "
            "overflowed. Cast to a wide integer type first, e.g. rgb.astype(np.int64)."
        )
    y, x = np.argwhere(got.astype(np.int64) != expected)[0]
    raise AssertionError(
        f"pixel ({y}, {x}) with RGB {tuple(int(v) for v in rgb[y, x])} should decode to "
        f"{expected[y, x]}, got {got[y, x]}. Remember: id = R + 256 G + 256² B."
    )


# --- exercise 2: a semantic map as (labels, masks) ------------------------------------------------


def _ex2_input(ignore_label: int) -> torch.Tensor:
    sem = torch.full((6, 8), 5, dtype=torch.long)  # [H, W]
    sem[:, :3] = 0
    sem[2:4, 4:7] = 2
    sem[5, :] = ignore_label  # an unlabelled row
    sem[0, 7] = ignore_label
    return sem


def check_ex2(semantic_to_targets: Callable[[torch.Tensor, int], tuple]) -> None:
    """``semantic_to_targets(sem_seg, ignore_label)`` → ``(labels [N], masks [N, H, W])``, one
    target per class present (a class is one segment), void pixels in no mask."""
    for ignore_label in (255, 7):
        sem = _ex2_input(ignore_label)
        out = semantic_to_targets(sem.clone(), ignore_label)
        assert isinstance(out, tuple | list) and len(out) == 2, (
            "return a pair (labels, masks): labels LongTensor [N], masks BoolTensor [N, H, W]"
        )
        labels, masks = (torch.as_tensor(v) for v in out)
        present = sorted(set(sem.unique().tolist()) - {ignore_label})
        assert labels.dim() == 1, f"labels must be 1-D [N], got shape {tuple(labels.shape)}"
        assert not labels.dtype.is_floating_point and labels.dtype != torch.bool, (
            f"labels must be integer class ids (torch.long), got {labels.dtype}"
        )
        assert masks.dtype == torch.bool, (
            f"masks must be boolean (torch.bool), got {masks.dtype}: compare, e.g. sem == c"
        )
        assert masks.dim() == 3 and masks.shape[1:] == sem.shape, (
            f"masks must be [N, H, W] = [N, {sem.shape[0]}, {sem.shape[1]}], got {tuple(masks.shape)}"
        )
        if ignore_label in labels.tolist():
            raise AssertionError(
                f"the ignore label {ignore_label} became a target: void pixels belong to no "
                "segment, drop that value from the labels"
            )
        assert sorted(labels.tolist()) == present, (
            f"this map holds the classes {present} (plus void = {ignore_label}); you returned "
            f"labels {labels.tolist()}. One target per class present: two regions of one class "
            "are one segment in semantic segmentation."
        )
        assert len(labels) == len(masks), f"{len(labels)} labels for {len(masks)} masks"
        for c, m in zip(labels.tolist(), masks):
            assert torch.equal(m, sem == c), (
                f"the mask of class {c} should be exactly sem_seg == {c}"
            )


# --- exercise 3: how many targets? ----------------------------------------------------------------

# One annotation of the shapes dataset (dataset category ids: 1 circle, 2 square, 3 triangle,
# 4 star, 101 sky, 102 grass, 103 water). The square is a crowd region.
EX3_SEGMENTS = [
    {"id": 101000, "category_id": 101, "iscrowd": 0},
    {"id": 102000, "category_id": 102, "iscrowd": 0},
    {"id": 1001, "category_id": 1, "iscrowd": 0},
    {"id": 1002, "category_id": 1, "iscrowd": 0},
    {"id": 2001, "category_id": 2, "iscrowd": 1},
    {"id": 4001, "category_id": 4, "iscrowd": 0},
    {"id": 4002, "category_id": 4, "iscrowd": 0},
]


def targets_per_task(segments: list[dict]) -> dict[str, int]:
    """The number of training targets each reader makes from one image's ``segments_info`` (every
    segment present in the PNG): panoptic, one per non-crowd segment; instance, one per non-crowd
    thing; semantic, one per class present (crowd pixels keep their class in the semantic map)."""
    meta = shapes_meta()
    thing = {d: t for d, t in zip(meta.dataset_ids, meta.is_thing)}
    return {
        "panoptic": sum(not s["iscrowd"] for s in segments),
        "instance": sum(not s["iscrowd"] and thing[s["category_id"]] for s in segments),
        "semantic": len({s["category_id"] for s in segments}),
    }


def check_ex3(*, panoptic: int, instance: int, semantic: int) -> None:
    """Predict how many targets (``len(labels)``) each reader makes from :data:`EX3_SEGMENTS`."""
    expected = targets_per_task(EX3_SEGMENTS)
    n_segments = len(EX3_SEGMENTS)
    n_things = sum(s["category_id"] < 100 for s in EX3_SEGMENTS)
    problems = []
    if panoptic != expected["panoptic"]:
        hint = (
            "crowd segments are never targets"
            if panoptic == n_segments
            else "one target per non-crowd segment, stuff included"
        )
        problems.append(f"panoptic: {panoptic} is not right ({hint})")
    if instance != expected["instance"]:
        if instance == n_things:
            hint = "the crowd square is not an instance target"
        elif instance >= expected["panoptic"]:
            hint = "stuff (sky, grass) has no instances"
        else:
            hint = "each non-crowd thing is its own target, even two of one class"
        problems.append(f"instance: {instance} is not right ({hint})")
    if semantic != expected["semantic"]:
        if semantic == expected["semantic"] - 1:
            hint = "crowd pixels keep their class in the semantic map, so the square counts"
        elif semantic > expected["semantic"]:
            hint = "one target per class present: the two circles are one semantic segment"
        else:
            hint = "count the distinct classes"
        problems.append(f"semantic: {semantic} is not right ({hint})")
    assert not problems, "; ".join(problems)


# --- exercise 4: LSJ shapes -----------------------------------------------------------------------

EX4_IMAGE = (96, 128)  # H, W of the input image
EX4_SIZE = 128  # data.image_size
EX4_SCALE = 0.5  # the scale LSJ happened to draw


def _ex4_expected() -> tuple[tuple[int, int], tuple[int, int], float]:
    """Run the package's ResizeScale (scale pinned) and FixedSizeCrop on a dummy sample."""
    h, w = EX4_IMAGE
    sample = {"image": torch.zeros(3, h, w), "sem_seg": torch.zeros(h, w, dtype=torch.long)}
    gen = torch.Generator().manual_seed(0)
    size = EX4_SIZE
    resized = T.ResizeScale(
        min_scale=EX4_SCALE, max_scale=EX4_SCALE, target_height=size, target_width=size
    )(sample, gen)
    final = T.FixedSizeCrop(crop_size=(size, size))(resized, gen)
    pad_fraction = (final["sem_seg"] == 255).float().mean().item()
    return T.size_of(resized), T.size_of(final), pad_fraction


def check_ex4(*, resized: tuple[int, int], final: tuple[int, int], pad_fraction: float) -> None:
    """Predict LSJ's output for a ``96 × 128`` image, ``image_size = 128``, drawn scale ``0.5``:
    the size after ``ResizeScale``, after ``FixedSizeCrop``, and the fraction of padded pixels."""
    exp_resized, exp_final, exp_pad = _ex4_expected()
    assert tuple(resized) == exp_resized, (
        f"after ResizeScale: {tuple(resized)} is not right. The image keeps its aspect ratio and "
        "fits inside scale × (128, 128): the factor is min(0.5·128/H, 0.5·128/W)."
    )
    assert tuple(final) == exp_final, (
        f"after FixedSizeCrop: {tuple(final)} is not right. The crop always returns crop_size: "
        "it crops larger images and pads smaller ones (bottom and right)."
    )
    assert abs(pad_fraction - exp_pad) < 1e-3, (
        f"pad_fraction={pad_fraction:.4f} is not right: the padding is everything in the "
        f"{exp_final[0]}×{exp_final[1]} output outside the resized image."
    )
