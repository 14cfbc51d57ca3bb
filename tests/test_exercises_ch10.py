"""Chapter 10's exercise checks: the right answers pass, typical wrong ones fail with a hint."""

import numpy as np
import pytest

from m2f_lite.exercises import ch10
from m2f_lite.weights.detectron2 import DETECTRON2_HEAD, rename_key


def test_ex1_right_and_wrong():
    def right(n, h, w, k, point_loss):
        return n * (k if point_loss else h * w) * 4

    ch10.check_ex1(right)
    with pytest.raises(AssertionError, match="4 bytes"):
        ch10.check_ex1(lambda n, h, w, k, p: n * (k if p else h * w))
    with pytest.raises(AssertionError, match="upsampled"):
        ch10.check_ex1(lambda n, h, w, k, p: n * (k if p else (h // 4) * (w // 4)) * 4)
    with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
        ch10.check_ex1(lambda n, h, w, k, p: 1 / 0)


def test_ex2_right_and_wrong():
    right = {
        "sem_seg_head.predictor.transformer_cross_attention_layers.3.multihead_attn.in_proj_weight": "transformer_decoder.layers.3.cross_attn.attn.in_proj_weight",
        "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.lateral_convs.0.conv.weight",
        "sem_seg_head.pixel_decoder.layer_1.norm.bias": "pixel_decoder.output_convs.0.norm.bias",
        "sem_seg_head.predictor.transformer_ffn_layers.8.linear2.weight": "transformer_decoder.layers.8.ffn.linear2.weight",
    }
    assert right == {k: rename_key(k, DETECTRON2_HEAD, reverse=True) for k in ch10.EX2_KEYS}
    ch10.check_ex2(right)
    off_by_one = {
        **right,
        "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.lateral_convs.1.conv.weight",
    }
    with pytest.raises(AssertionError, match="count from 1"):
        ch10.check_ex2(off_by_one)
    with pytest.raises(AssertionError, match="no entry"):
        ch10.check_ex2({})


def test_ex3_right_and_wrong():
    def right(a, b):  # independent of the check's statistics-based reference
        def mean(x):
            return sum(x) / len(x)

        def var(x):
            return sum((v - mean(x)) ** 2 for v in x) / (len(x) - 1)

        return mean(a) - mean(b), (var(a) / len(a) + var(b) / len(b)) ** 0.5

    ch10.check_ex3(right)
    ch10.check_ex3(lambda a, b: list(right(a, b)))
    with pytest.raises(AssertionError, match="b - a"):
        ch10.check_ex3(lambda a, b: right(b, a))
    with pytest.raises(AssertionError, match="population variance"):
        ch10.check_ex3(
            lambda a, b: (
                right(a, b)[0],
                (np.var(a) / len(a) + np.var(b) / len(b)) ** 0.5,
            )
        )
    with pytest.raises(AssertionError, match="square root"):
        ch10.check_ex3(lambda a, b: (right(a, b)[0], right(a, b)[1] ** 2))
    with pytest.raises(AssertionError, match="adds the two standard errors"):
        ch10.check_ex3(
            lambda a, b: (
                right(a, b)[0],
                np.std(a, ddof=1) / len(a) ** 0.5 + np.std(b, ddof=1) / len(b) ** 0.5,
            )
        )
    with pytest.raises(AssertionError, match="a pair"):
        ch10.check_ex3(lambda a, b: None)
    with pytest.raises(AssertionError, match="raised NotImplementedError"):
        ch10.check_ex3(lambda a, b: (_ for _ in ()).throw(NotImplementedError))
