"""Checks for the exercises of chapter 10, "Reproducing the paper".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint. The expected answers come from the package:
the key table of ``m2f_lite.weights.detectron2``, the presets and the model zoo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from m2f_lite.config import get_config
from m2f_lite.weights.detectron2 import DETECTRON2_HEAD, rename_key

COCO_TRAIN_IMAGES = 118287  # train2017 (instances and panoptic alike)


# --- Ex. 1: the memory of the mask loss ------------------------------------------------------


def mask_loss_bytes(num_masks: int, height: int, width: int, num_points: int, point_loss: bool):
    """Bytes of the float32 ``[N, ·]`` logits one mask-loss evaluation reads: N × H × W for the
    full-mask loss, N × K for the point loss."""
    per_mask = num_points if point_loss else height * width
    return num_masks * per_mask * 4


def check_ex1(fn: Callable) -> None:
    """``fn(num_masks, height, width, num_points, point_loss)`` -> bytes of the mask logits."""
    cases = [(50, 1024, 1024, 12544, False), (50, 1024, 1024, 12544, True), (3, 64, 48, 100, False)]
    cases += [(7, 128, 128, 1024, True)]
    for case in cases:
        try:
            got = fn(*case)
        except Exception as error:  # the student's code: report, do not crash the check
            raise AssertionError(f"fn{case} raised {type(error).__name__}: {error}") from error
        want = mask_loss_bytes(*case)
        n, h, w, _, point = case
        assert got is not None, "fn returned None: return a number of bytes"
        if got == want // 4:
            raise AssertionError(
                f"fn{case} = {got}: that is the number of values; each float32 takes 4 bytes"
            )
        if not point and got == n * (h // 4) * (w // 4) * 4:
            raise AssertionError(
                f"fn{case} = {got}: the full-mask loss compares at the target's resolution "
                f"{h}x{w} (the predictions are upsampled to it), not at H/4 x W/4"
            )
        assert got == want, (
            f"fn{case} = {got}, expected {want}: N x {'K points' if point else 'H x W pixels'} "
            "float32 values of 4 bytes (point_loss decides which)"
        )


# --- Ex. 2: official key -> m2f_lite key -----------------------------------------------------

EX2_KEYS = [
    "sem_seg_head.predictor.transformer_cross_attention_layers.3.multihead_attn.in_proj_weight",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias",
    "sem_seg_head.predictor.transformer_ffn_layers.8.linear2.weight",
]


def check_ex2(answer: dict[str, str]) -> None:
    """``answer``: each key of ``EX2_KEYS`` -> its name in an m2f_lite state dict."""
    assert isinstance(answer, dict), "answer: a dict {official key: m2f_lite key}"
    missing = [k for k in EX2_KEYS if k not in answer]
    assert not missing, f"answer has no entry for {missing[0]!r}"
    for key in EX2_KEYS:
        want = rename_key(key, DETECTRON2_HEAD, reverse=True)
        got = answer[key]
        if got == want:
            continue
        hint = "look it up in m2f_lite.weights.detectron2.DETECTRON2_HEAD (ours, theirs)"
        if "adapter_" in key or "layer_" in key:
            hint = (
                "the official adapter_{i+1}/layer_{i+1} count from 1 and from the finest level "
                "up; ours are lateral_convs.{i}/output_convs.{i}, counted from 0"
            )
        raise AssertionError(f"{key!r} -> {got!r}, expected {want!r}: {hint}")


# --- Ex. 3: batch and epochs of a recipe -----------------------------------------------------


def check_ex3(answer: dict[str, float]) -> None:
    """``answer``: {"per_gpu": images per GPU per step, "epochs": passes over COCO train2017}
    for ``coco_panoptic_r50`` trained on 8 GPUs."""
    solver = get_config("coco_panoptic_r50").solver
    assert isinstance(answer, dict) and {"per_gpu", "epochs"} <= set(answer), (
        'answer: {"per_gpu": ..., "epochs": ...}'
    )
    per_gpu = solver.ims_per_batch / 8
    assert answer["per_gpu"] == per_gpu, (
        f"per_gpu = {answer['per_gpu']}, expected {per_gpu:g}: solver.ims_per_batch "
        f"({solver.ims_per_batch}) is the global batch, shared by the 8 processes"
    )
    epochs = solver.max_iter * solver.ims_per_batch / COCO_TRAIN_IMAGES
    got = answer["epochs"]
    if math.isclose(got, solver.max_iter * per_gpu / COCO_TRAIN_IMAGES, rel_tol=0.01):
        raise AssertionError(
            f"epochs = {got:.2f}: every step consumes the global batch "
            f"({solver.ims_per_batch} images), not one GPU's share"
        )
    assert math.isclose(got, epochs, rel_tol=0.01), (
        f"epochs = {got}, expected {epochs:.1f}: max_iter ({solver.max_iter}) x batch / "
        f"{COCO_TRAIN_IMAGES} training images"
    )
