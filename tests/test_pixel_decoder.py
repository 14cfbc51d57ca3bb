"""The MSDeformAttn pixel decoder: shapes, fp32 under autocast, reference points, construction."""

import pytest
import torch

from m2f_lite.modeling.pixel_decoder import MSDeformAttnPixelDecoder, encoder_reference_points

CHANNELS = [8, 16, 24, 32]


def features(B=2, H=64, W=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"res{i + 2}": torch.randn(B, c, H // s, W // s, generator=g).to(dtype)
        for i, (c, s) in enumerate(zip(CHANNELS, [4, 8, 16, 32]))
    }


def tiny_decoder(**kw):
    torch.manual_seed(0)
    args = dict(
        channels=CHANNELS,
        strides=[4, 8, 16, 32],
        conv_dim=32,
        mask_dim=16,
        enc_layers=2,
        enc_nheads=4,
        enc_n_points=2,
        enc_dim_feedforward=64,
        norm_groups=8,
    )
    return MSDeformAttnPixelDecoder(**{**args, **kw}).eval()


def test_output_shapes():
    mask_features, memory = tiny_decoder()(features())
    assert mask_features.shape == (2, 16, 16, 24)
    assert [tuple(m.shape) for m in memory] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]


def test_structure_as_official():
    pd = tiny_decoder()
    assert (
        len(pd.encoder) == 2 and len(pd.lateral_convs) == 1 and len(pd.output_convs) == 1
    )  # one FPN step, at res2
    assert [p[0].in_channels for p in pd.input_proj] == [32, 24, 16]  # res5, res4, res3
    assert pd.lateral_convs[0].conv.bias is None and pd.lateral_convs[0].conv.in_channels == 8
    assert pd.output_convs[0].conv.kernel_size == (3, 3)
    assert pd.encoder[0].linear1.out_features == 64
    assert (
        MSDeformAttnPixelDecoder(channels=CHANNELS, strides=[4, 8, 16, 32])
        .encoder[0]
        .linear1.out_features
        == 1024
    )


def test_runs_in_float32_under_autocast():
    pd = tiny_decoder()
    feats = features()
    with torch.no_grad():
        expected_masks, expected_memory = pd(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masks, memory = pd({k: v.bfloat16() for k, v in feats.items()})
            masks32, memory32 = pd(feats)
    assert masks.dtype == torch.float32 and all(m.dtype == torch.float32 for m in memory)
    # float32 inputs under autocast: exactly the float32 result
    torch.testing.assert_close(masks32, expected_masks, atol=0, rtol=0)
    torch.testing.assert_close(memory32[2], expected_memory[2], atol=0, rtol=0)
    # bfloat16 inputs are only rounded, the computation is float32
    torch.testing.assert_close(masks, expected_masks, atol=0.1, rtol=0.05)


def test_images_of_a_batch_do_not_mix():
    pd = tiny_decoder()
    feats = features(B=2)
    with torch.no_grad():
        masks, memory = pd(feats)
        masks1, memory1 = pd({k: v[1:] for k, v in feats.items()})
    torch.testing.assert_close(masks[1:], masks1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory[0][1:], memory1[0], atol=1e-5, rtol=1e-5)


def test_reference_points_are_pixel_centres():
    ref = encoder_reference_points([(2, 4), (1, 2)], batch=3, device=torch.device("cpu"))
    assert ref.shape == (3, 10, 2, 2)
    torch.testing.assert_close(
        ref[0, 1, 0], torch.tensor([0.375, 0.25])
    )  # (x, y) of pixel (0, 1) of 2x4
    torch.testing.assert_close(ref[2, 9, 1], torch.tensor([0.75, 0.5]))  # pixel (0, 1) of 1x2
    assert torch.equal(ref[:, :, 0], ref[:, :, 1])


def test_gradients_reach_every_parameter():
    pd = tiny_decoder().train()
    masks, memory = pd(features(B=1))
    (masks.sum() + sum(m.sum() for m in memory)).backward()
    assert all(p.grad is not None for p in pd.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="norm_groups"):
        tiny_decoder(conv_dim=36)
    with pytest.raises(ValueError, match="strides"):
        tiny_decoder(strides=[4, 8, 16])
