"""Parity with HF transformers: from_transformers(hf) computes HF's predictions, every stage.

Random-init HF models (no download). HF takes normalised pixels; m2f_lite takes the raw 0..255
image and normalises it with the same ImageNet statistics. In float32 and eval mode HF and the
official code compute the same function (where they differ, under autocast and in training, is
listed in m2f_lite/weights/transformers.py; our code follows the official there), so the outputs
must agree to 1e-4. HF's ``decoder_layers`` (10 in the R50 config) counts like the official
DEC_LAYERS: 9 layers, 10 predictions.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    SwinConfig,
)

from m2f_lite.config import IMAGENET_MEAN, IMAGENET_STD
from m2f_lite.weights.transformers import from_transformers

STAGES = ["stage1", "stage2", "stage3", "stage4"]
TINY_HEAD = dict(
    num_labels=7,
    num_queries=12,
    feature_size=64,
    mask_feature_size=64,
    hidden_dim=64,
    encoder_feedforward_dim=128,
    dim_feedforward=128,
    encoder_layers=2,
    decoder_layers=5,
    num_attention_heads=4,
)


def r50_config():
    """The official R50 shape: ResNet-50, 6 encoder layers, DEC_LAYERS 10, 100 queries, 133 classes."""
    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=STAGES,
    )
    return Mask2FormerConfig(backbone_config=backbone, num_labels=133, decoder_layers=10)


def tiny_resnet_config():
    backbone = ResNetConfig(
        embedding_size=64,
        depths=[1, 2, 1, 1],
        hidden_sizes=[32, 64, 96, 128],
        layer_type="bottleneck",
        out_features=STAGES,
    )
    return Mask2FormerConfig(backbone_config=backbone, **TINY_HEAD)


def tiny_swin_config():
    # window 3 on token grids of 24x40, 12x20, 6x10, 3x5: padding and shifted windows on every stage
    backbone = SwinConfig(
        embed_dim=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        window_size=3,
        out_features=STAGES,
    )
    return Mask2FormerConfig(backbone_config=backbone, **TINY_HEAD)


def assert_same_predictions(hf_config, size, seed=0):
    torch.manual_seed(seed)
    hf = Mask2FormerForUniversalSegmentation(hf_config).eval()
    ours = from_transformers(hf)
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, *size, generator=g) * 255  # batch 2, raw 0..255
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        expected = hf(pixel_values=(image - mean) / std, output_auxiliary_logits=True)
        got = ours(image)
    stages_hf = [
        *expected.auxiliary_logits,
        {
            "class_queries_logits": expected.class_queries_logits,
            "masks_queries_logits": expected.masks_queries_logits,
        },
    ]
    stages_ours = [*got["aux_outputs"], got]
    assert len(stages_ours) == len(stages_hf) == hf_config.decoder_layers
    for i, (a, b) in enumerate(zip(stages_ours, stages_hf)):
        torch.testing.assert_close(
            a["pred_logits"], b["class_queries_logits"], atol=1e-4, rtol=0, msg=f"logits, stage {i}"
        )
        torch.testing.assert_close(
            a["pred_masks"], b["masks_queries_logits"], atol=1e-4, rtol=0, msg=f"masks, stage {i}"
        )


def test_r50_matches_hf():
    assert_same_predictions(r50_config(), (96, 128))


@pytest.mark.parametrize(
    "make_config", [tiny_resnet_config, tiny_swin_config], ids=["resnet", "swin"]
)
def test_tiny_matches_hf(make_config):
    assert_same_predictions(make_config(), (96, 160))


def test_from_transformers_copies_the_config():
    hf = Mask2FormerForUniversalSegmentation(tiny_swin_config())
    ours = from_transformers(hf)
    td, pd = ours.transformer_decoder, ours.pixel_decoder
    assert (
        len(td.layers) == 4
    )  # HF decoder_layers=5 counts the query prediction, like the official DEC_LAYERS
    assert td.query_feat.num_embeddings == 12 and td.class_embed.out_features == 8
    assert len(pd.encoder) == 2 and pd.encoder[0].linear1.out_features == 128
    assert ours.backbone.family == "swin"
