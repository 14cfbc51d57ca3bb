"""Checks for the exercises of chapter 10, "Reproducing the paper".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint. The expected answers: the bytes computed
here (Ex. 1), the key table of ``m2f_lite.weights.detectron2`` (Ex. 2: the exercise asks for
the names by hand, not by calling ``rename_key``), Python's ``statistics`` (Ex. 3).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from m2f_lite.weights.detectron2 import DETECTRON2_HEAD, rename_key

# --- Ex. 1: the memory of the mask loss ------------------------------------------------------


def _mask_loss_bytes(num_masks: int, height: int, width: int, num_points: int, point_loss: bool):
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
        want = _mask_loss_bytes(*case)
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


# --- Ex. 3: a difference of means against the seed noise -----------------------------------

EX3_CASES = [
    ([64.3, 63.1, 65.0], [60.2, 61.0, 59.8]),
    ([40.0, 42.0, 41.0, 39.0], [41.5, 40.5]),
    ([55.0, 55.0], [54.0, 56.0, 55.0]),
]


def _difference_and_error(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of the means and its standard error, with Python's ``statistics``."""
    error = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.mean(a) - statistics.mean(b), error


def check_ex3(fn: Callable) -> None:
    """``fn(a, b)`` -> ``(mean(a) - mean(b), sqrt(var(a)/n_a + var(b)/n_b))``, sample variances
    (n - 1), compared with Python's ``statistics`` (the package's ``ablations.summarise`` gives
    each variant's mean and standard deviation, not this)."""
    for a, b in EX3_CASES:
        try:
            out = fn(list(a), list(b))
        except Exception as error:  # the student's code: report, do not crash the check
            raise AssertionError(f"fn({a}, {b}) raised {type(error).__name__}: {error}") from error
        assert isinstance(out, tuple | list) and len(out) == 2, (
            f"fn(a, b) returned {out!r}: return a pair (difference, error)"
        )
        got_d, got_e = (float(v) for v in out)
        want_d, want_e = _difference_and_error(a, b)
        assert math.isclose(got_d, want_d, abs_tol=1e-9), (
            f"difference = {got_d:.4g}, expected {want_d:.4g}: the mean of a minus the mean of b"
            + (" (you computed b - a)" if math.isclose(got_d, -want_d) else "")
        )
        population = math.sqrt(statistics.pvariance(a) / len(a) + statistics.pvariance(b) / len(b))
        hints = {
            population: "that uses the population variance (divide by n); the sample variance "
            "divides by n - 1 (statistics.variance, np.var(ddof=1))",
            want_e**2: "that is the variance of the difference; take its square root",
            statistics.stdev(a) / math.sqrt(len(a)) + statistics.stdev(b) / math.sqrt(len(b)): (
                "that adds the two standard errors; add the variances, then take the root"
            ),
            math.sqrt(statistics.variance(a) + statistics.variance(b)): (
                "that is the spread of one run, not of a mean: divide each variance by its n"
            ),
        }
        for value, hint in hints.items():
            if not math.isclose(value, want_e) and math.isclose(got_e, value, rel_tol=1e-6):
                raise AssertionError(f"error = {got_e:.4g}, expected {want_e:.4g}: {hint}")
        assert math.isclose(got_e, want_e, rel_tol=1e-6), (
            f"error = {got_e:.4g}, expected {want_e:.4g} for a = {a}, b = {b}: "
            "sqrt(s_a² / n_a + s_b² / n_b), s² the sample variance"
        )
