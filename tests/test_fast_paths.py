"""The model's speed paths against their references: frozen BatchNorm, the cached positional code,
channels-last ResNets, map resizing, the transformer decoder's attention masks at each scale and
its sparse mask-product backward, ``aux=False``, and the MSDA gather path in bfloat16."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from m2f_lite.modeling.backbone import FrozenBatchNorm2d, build_backbone, freeze_batch_norm
from m2f_lite.modeling.mask2former import Mask2Former
from m2f_lite.modeling.mask_head import mask_logits, resize
from m2f_lite.modeling.ms_deform_attn import ms_deform_attn_gather, ms_deform_attn_reference
from m2f_lite.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from m2f_lite.modeling.position import PositionEmbeddingSine
from m2f_lite.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

SIZES = [(2, 3), (4, 6), (8, 12)]  # memory scales of a 64x96 image


def test_frozen_batch_norm_equals_torchvision_and_keeps_the_state_keys():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    ours = freeze_batch_norm(nn.Sequential(bn))[0]
    reference = torchvision.ops.FrozenBatchNorm2d(6, eps=1e-3)
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours, FrozenBatchNorm2d) and ours.eps == 1e-3
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert not any(p.requires_grad for p in ours.parameters())
    x = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    out = ours(x)
    torch.testing.assert_close(out, reference(x), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)


def test_channels_last_resnet_by_default_with_contiguous_weights():
    torch.manual_seed(0)
    fast = build_backbone("resnet18", layers=(1, 1, 1, 1))
    plain = build_backbone("resnet18", layers=(1, 1, 1, 1), channels_last=False)
    plain.load_state_dict(fast.state_dict())
    assert fast.channels_last and not plain.channels_last
    assert all(t.is_contiguous() for t in fast.state_dict().values())  # safetensors can save it
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = fast(x), plain(x)
    assert a["res2"].is_contiguous(memory_format=torch.channels_last)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)
    assert not build_backbone(
        "swin_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    ).channels_last


def test_position_code_is_cached_per_size_and_usable_after_inference_mode():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    with torch.inference_mode():
        first = pe(torch.zeros(2, 3, 5, 7))
    weight = nn.Parameter(torch.ones(()))
    second = pe(torch.zeros(3, 1, 5, 7))  # from the cache, in a graph that needs gradients
    (second * weight).sum().backward()
    assert weight.grad is not None and second.shape == (3, 16, 5, 7)
    torch.testing.assert_close(second[0], first[0], atol=0, rtol=0)
    torch.testing.assert_close(second, pe.code(5, 7, torch.device("cpu")).expand(3, -1, -1, -1))
    for h in range(1, 12):
        pe(torch.zeros(1, 1, h, 4))
    assert len(pe._cache) == pe.cache_size


@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_equals_interpolate(channels_last):
    x = torch.randn(2, 40, 16, 24, generator=torch.Generator().manual_seed(0)) * 10
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for size in [(4, 6), (8, 12), (5, 7)]:
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resize(x, size), expected, atol=1e-5, rtol=0)
    assert resize(x, (16, 24)) is x


def test_mask_product_backward_skips_zero_rows_and_equals_einsum():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 6, 5, generator=g)
    embeds = [torch.randn(2, 7, 8, generator=g) for _ in range(3)]
    grads = [torch.zeros(2, 7, 6, 5) for _ in range(3)]
    grads[0][0, [1, 4]] = torch.randn(2, 6, 5, generator=g)  # a few matched queries per image
    grads[0][1, 6] = torch.randn(6, 5, generator=g)
    grads[2][1, [0, 2, 3]] = torch.randn(3, 6, 5, generator=g)  # prediction 1 gets no gradient
    results = []
    for fast in (True, False):
        f = features.clone().requires_grad_(True)
        e = [t.clone().requires_grad_(True) for t in embeds]
        with torch.enable_grad():
            if fast:
                masks = mask_logits(e, f)
            else:
                masks = [torch.einsum("bqc,bchw->bqhw", t, f) for t in e]
        loss = sum((m * gr).sum() for m, gr in zip(masks[::2], grads[::2]))
        results.append((masks, torch.autograd.grad(loss, [f, *e], allow_unused=True)))
    (masks, grad), (masks_ref, grad_ref) = results
    for a, b in zip(masks, masks_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(grad[0], grad_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[1], grad_ref[1], atol=1e-5, rtol=1e-5)
    assert grad[2] is None and grad_ref[2] is None
    torch.testing.assert_close(grad[3], grad_ref[3], atol=1e-5, rtol=1e-5)


def decoder(**kw) -> MultiScaleMaskedTransformerDecoder:
    torch.manual_seed(0)
    args = dict(in_channels=32, num_classes=5, hidden_dim=32, num_queries=6, nheads=4)
    return MultiScaleMaskedTransformerDecoder(
        **args, dim_feedforward=64, num_layers=4, mask_dim=16, **kw
    )


def test_decoder_matches_the_official_attention_masks_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    memory = [torch.randn(2, 32, h, w, generator=g) for h, w in SIZES]
    features = torch.randn(2, 16, 16, 24, generator=g)
    dec = decoder().train()
    runs = []
    for reference in (True, False):
        dec.reference = reference
        dec.zero_grad()
        f = features.clone().requires_grad_(True)
        out = dec(memory, f)
        predictions = [*out["aux_outputs"], out]
        # a training-like loss: classes of every query, masks of a few "matched" queries only
        loss = sum(p["pred_logits"].square().mean() for p in predictions)
        loss = loss + sum(p["pred_masks"][0, [1, 4]].sigmoid().sum() for p in predictions)
        loss.backward()
        grads = [p.grad.clone() for p in dec.parameters()] + [f.grad]
        runs.append((predictions, grads))
    (ref, ref_grads), (fast, fast_grads) = runs
    assert len(fast) == len(ref) == 5
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    dec.eval()
    with torch.no_grad():
        final = dec(memory, features, aux=False)
        assert final["aux_outputs"] == []
        torch.testing.assert_close(
            final["pred_masks"], fast[-1]["pred_masks"], atol=1e-5, rtol=1e-5
        )


def test_model_without_aux_outputs_gives_the_same_final_prediction():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", layers=(1, 1, 1, 1))
    pixel_decoder = MSDeformAttnPixelDecoder(
        channels=backbone.channels,
        strides=backbone.strides,
        conv_dim=32,
        mask_dim=16,
        enc_layers=1,
        enc_nheads=4,
        enc_dim_feedforward=64,
        norm_groups=8,
    )
    model = Mask2Former(
        backbone=backbone, pixel_decoder=pixel_decoder, transformer_decoder=decoder()
    ).eval()
    images = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        full, final = model(images), model(images, aux=False)
    assert len(full["aux_outputs"]) == 4 and final["aux_outputs"] == []
    torch.testing.assert_close(final["pred_logits"], full["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(final["pred_masks"], full["pred_masks"], atol=1e-5, rtol=0)


def test_gather_path_in_bfloat16_follows_the_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 3)]
    value = torch.randn(2, 18, 2, 4, generator=g)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(2, 5, 2, 6, generator=g).softmax(-1).view(2, 5, 2, 2, 3)
    expected = ms_deform_attn_reference(value, shapes, locations, weights)
    args = [t.bfloat16().requires_grad_(True) for t in (value, locations, weights)]
    got = ms_deform_attn_gather(args[0], shapes, *args[1:])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)
