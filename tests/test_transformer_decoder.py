"""The masked-attention transformer decoder: attention paths, the attention mask, round robin,
predictions after every stage."""

import pytest
import torch
from torch import nn

from m2f_lite.modeling.transformer_decoder import (
    DecoderLayer,
    MultiHeadAttention,
    MultiScaleMaskedTransformerDecoder,
    attention_mask,
)

SIZES = [(2, 3), (4, 6), (8, 12)]  # strides 32, 16, 8 of a 64x96 image


def inputs(B=2, C=32, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = [torch.randn(B, C, h, w, generator=g) for h, w in SIZES]
    mask_features = torch.randn(B, D, 16, 24, generator=g)
    return memory, mask_features


def tiny_decoder(**kw):
    torch.manual_seed(0)
    args = dict(
        in_channels=32,
        num_classes=5,
        hidden_dim=32,
        num_queries=6,
        nheads=4,
        dim_feedforward=64,
        num_layers=4,
        mask_dim=16,
    )
    return MultiScaleMaskedTransformerDecoder(**{**args, **kw}).eval()


def random_blocked(B, Lq, Lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocked = torch.rand(B, 1, Lq, Lk, generator=g) < 0.6
    blocked[:, :, :, 0] = False  # no row entirely blocked
    return blocked


def test_attention_paths_match_nn_multihead_attention():
    torch.manual_seed(0)
    B, Lq, Lk, C, h = 2, 5, 7, 16, 4
    ours = MultiHeadAttention(embed_dim=C, num_heads=h)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
    torch_mha = nn.MultiheadAttention(C, h)
    torch_mha.load_state_dict(ours.state_dict())  # same parameter names and layout
    q, k, v = torch.randn(B, Lq, C), torch.randn(B, Lk, C), torch.randn(B, Lk, C)
    blocked = random_blocked(B, Lq, Lk)
    # nn.MultiheadAttention: sequence first, a [B*h, Lq, Lk] mask with True = blocked
    expected = torch_mha(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=blocked.expand(B, h, Lq, Lk).flatten(0, 1),
    )[0].transpose(0, 1)
    fast = ours(q, k, v, blocked)
    ours.reference = True
    reference = ours(q, k, v, blocked)
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        ours(q, k, v),
        torch_mha(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))[0].transpose(0, 1),
        atol=1e-6,
        rtol=1e-5,
    )


def test_attention_mask_thresholds_resizes_and_unblocks_empty_rows():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # query 0: top-left quarter
    logits[0, 1] = 5.0  # query 1: everything; query 2: nothing
    logits.requires_grad_(True)
    blocked = attention_mask(logits, (2, 2))
    assert blocked.shape == (1, 3, 4) and blocked.dtype == torch.bool and not blocked.requires_grad
    assert blocked[0, 0].tolist() == [False, True, True, True]
    assert blocked[0, 1].tolist() == [False] * 4
    assert blocked[0, 2].tolist() == [False] * 4  # blocked everywhere -> unblocked everywhere
    # the threshold is sigmoid < 0.5 of the bilinearly resized logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 12, generator=g)
    resized = torch.nn.functional.interpolate(
        logits, size=(4, 6), mode="bilinear", align_corners=False
    )
    expected = resized.sigmoid().flatten(2) < 0.5
    expected[expected.all(-1)] = False
    assert torch.equal(attention_mask(logits, (4, 6)), expected)


def test_masked_cross_attention_ignores_blocked_memory():
    torch.manual_seed(0)
    layer = DecoderLayer(d_model=16, nhead=2, dim_feedforward=32, pre_norm=False).eval()
    tgt, qpos = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    memory, pos = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    blocked = torch.zeros(1, 1, 3, 10, dtype=torch.bool)
    blocked[..., 5:] = True  # every query sees only memory pixels 0..4
    out = layer(tgt, qpos, memory, pos, blocked)
    changed = memory.clone()
    changed[:, 5:] += 10.0
    torch.testing.assert_close(layer(tgt, qpos, changed, pos, blocked), out)
    assert not torch.allclose(
        layer(tgt, qpos, changed, pos, None), layer(tgt, qpos, memory, pos, None)
    )


def test_outputs_one_prediction_per_stage():
    dec = tiny_decoder()
    memory, mask_features = inputs()
    out = dec(memory, mask_features)
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, 16, 24)
    assert len(out["aux_outputs"]) == 4  # query initialisation + 3 of the 4 layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, 6) and aux["pred_masks"].shape == (2, 6, 16, 24)
    # the first prediction reads the learnable queries alone: the same for every image
    torch.testing.assert_close(
        out["aux_outputs"][0]["pred_logits"][0], out["aux_outputs"][0]["pred_logits"][1]
    )
    # and it is the heads on LayerNorm(query_feat)
    q = dec.decoder_norm(dec.query_feat.weight)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"][0], dec.class_embed(q))
    torch.testing.assert_close(
        out["aux_outputs"][0]["pred_masks"][0],
        torch.einsum("qc,chw->qhw", dec.mask_embed(q), mask_features[0]),
    )


def test_round_robin_from_the_coarsest_scale():
    dec = tiny_decoder(num_layers=5)
    seen = []
    for layer in dec.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(args[2].shape[1]))
    dec(*inputs())
    assert seen == [6, 24, 96, 6, 24]


def test_reference_attention_gives_the_same_predictions():
    dec = tiny_decoder()
    memory, mask_features = inputs()
    with torch.no_grad():
        fast = dec(memory, mask_features)
        for m in dec.modules():
            if isinstance(m, MultiHeadAttention):
                m.reference = True
        reference = dec(memory, mask_features)
    torch.testing.assert_close(fast["pred_masks"], reference["pred_masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast["pred_logits"], reference["pred_logits"], atol=1e-4, rtol=1e-4)


def test_masked_attention_switch_and_pre_norm_change_the_result():
    memory, mask_features = inputs()
    base = tiny_decoder()(memory, mask_features)["pred_logits"]
    unmasked = tiny_decoder(masked_attention=False)(memory, mask_features)["pred_logits"]
    pre = tiny_decoder(pre_norm=True)(memory, mask_features)["pred_logits"]
    assert not torch.allclose(base, unmasked) and not torch.allclose(base, pre)


def test_input_projection_only_when_needed():
    assert all(isinstance(p, nn.Identity) for p in tiny_decoder().input_proj)
    assert all(isinstance(p, nn.Conv2d) for p in tiny_decoder(enforce_input_proj=True).input_proj)
    dec = tiny_decoder(in_channels=24)
    assert dec.input_proj[0].in_channels == 24
    memory, mask_features = inputs(C=24)
    assert dec(memory, mask_features)["pred_logits"].shape == (2, 6, 6)
    with pytest.raises(ValueError, match="memory"):
        dec(memory[:2], mask_features)


def test_gradients_reach_every_parameter():
    dec = tiny_decoder().train()
    memory, mask_features = inputs()
    mask_features.requires_grad_(True)
    out = dec(memory, mask_features)
    loss = (
        out["pred_logits"].sum()
        + out["pred_masks"].sum()
        + sum(a["pred_masks"].sum() for a in out["aux_outputs"])
    )
    loss.backward()
    assert all(p.grad is not None for p in dec.parameters())
