"""Mask2Former end to end: preprocessing (normalise, then zero-pad), outputs, build_model."""

import pytest
import torch

from m2f_lite.config import get_config
from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.mask2former import Mask2Former, build_model
from m2f_lite.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from m2f_lite.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


def tiny_model(num_layers=3, size_divisibility=32):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", layers=(1, 1, 1, 1))
    return Mask2Former(
        backbone=backbone,
        pixel_decoder=MSDeformAttnPixelDecoder(
            channels=backbone.channels,
            strides=backbone.strides,
            conv_dim=32,
            mask_dim=32,
            enc_layers=1,
            enc_nheads=4,
            enc_dim_feedforward=64,
            norm_groups=8,
        ),
        transformer_decoder=MultiScaleMaskedTransformerDecoder(
            in_channels=32,
            num_classes=4,
            hidden_dim=32,
            num_queries=5,
            nheads=4,
            dim_feedforward=64,
            num_layers=num_layers,
            mask_dim=32,
        ),
        pixel_mean=MEAN,
        pixel_std=STD,
        size_divisibility=size_divisibility,
    ).eval()


def test_preprocess_normalises_then_pads_with_zeros():
    model = tiny_model()
    a = torch.rand(3, 40, 50) * 255
    b = torch.rand(3, 70, 33) * 255
    batch, sizes = model.preprocess([a, b])
    assert sizes == [(40, 50), (70, 33)]
    assert batch.shape == (2, 3, 96, 64)  # max 70 x 50, rounded up to multiples of 32
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :40, :50], (a - mean) / std)
    torch.testing.assert_close(batch[1, :, :70, :33], (b - mean) / std)
    assert batch[0, :, 40:].abs().sum() == 0 and batch[0, :, :, 50:].abs().sum() == 0
    assert batch[1, :, 70:].abs().sum() == 0 and batch[1, :, :, 33:].abs().sum() == 0
    # no rounding without size divisibility
    assert tiny_model(size_divisibility=0).preprocess([a, b])[0].shape == (2, 3, 70, 50)


def test_tensor_and_list_inputs_agree_and_bad_inputs_are_named():
    model = tiny_model()
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        out_tensor = model(x)
        out_list = model([x[0], x[1]])
    torch.testing.assert_close(out_tensor["pred_masks"], out_list["pred_masks"])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        model.preprocess([x[0], x[1, :1]])
    with pytest.raises(ValueError, match="images"):
        model.preprocess(x[0])


def test_outputs_and_sizes():
    model = tiny_model(num_layers=3)
    with torch.no_grad():
        out = model([torch.rand(3, 60, 90) * 255, torch.rand(3, 64, 70) * 255])
    assert out["pred_logits"].shape == (2, 5, 5)  # K + 1 = 5 classes
    assert out["pred_masks"].shape == (2, 5, 16, 24)  # padded 64 x 96, stride 4
    assert len(out["aux_outputs"]) == 3
    assert out["image_sizes"] == [(60, 90), (64, 70)]
    assert out["padded_size"] == (64, 96)


def test_images_of_a_batch_do_not_mix():
    model = tiny_model()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        both = model(x)
        second = model(x[1:])
    torch.testing.assert_close(both["pred_logits"][1:], second["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both["pred_masks"][1:], second["pred_masks"], atol=1e-4, rtol=1e-4)


def test_build_model_reads_the_config():
    cfg = get_config("shapes_tiny", ["model.num_queries=7", "model.masked_attention=false"])
    model = build_model(cfg).eval()
    td, pd = model.transformer_decoder, model.pixel_decoder
    assert td.query_feat.num_embeddings == 7 and len(td.layers) == cfg.model.dec_layers
    assert td.class_embed.out_features == cfg.model.num_classes + 1 and not td.masked_attention
    assert (
        len(pd.encoder) == cfg.model.enc_layers
        and pd.encoder[0].linear1.out_features == cfg.model.enc_dim_feedforward
    )
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(cfg.model.pixel_mean))
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64) * 255])
    assert out["pred_logits"].shape == (1, 7, cfg.model.num_classes + 1)
    assert len(out["aux_outputs"]) == cfg.model.dec_layers


def test_official_recipe_has_nine_layers_and_ten_predictions():
    cfg = get_config("coco_panoptic_r50")
    td = build_model(cfg).transformer_decoder
    assert (
        len(td.layers) == 9
        and td.query_feat.num_embeddings == 100
        and td.class_embed.out_features == 134
    )
    # (the official DEC_LAYERS: 10 = these 9 layers + the prediction from the learnable queries)


def test_autocast_keeps_the_pixel_decoder_in_float32():
    model = tiny_model()
    seen = []
    model.pixel_decoder.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 64, 64) * 255)
    assert seen == [torch.float32]
    assert out["pred_logits"].dtype == torch.bfloat16  # the transformer decoder runs under autocast
