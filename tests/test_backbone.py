"""The backbone: shapes of every named variant, parity with HF transformers (which follows the
official Swin window step), the official-vs-timm Swin gap, freezing and FrozenBN."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ResNetBackbone, ResNetConfig, SwinBackbone, SwinConfig

from m2f_lite.modeling.backbone import BACKBONES, build_backbone
from m2f_lite.modeling.swin import shifted_window_mask
from m2f_lite.weights.backbone import backbone_name_from_hf_config, hf_backbone_to_timm

STAGES = ["stage1", "stage2", "stage3", "stage4"]

# The official widths (paper Sec. 4 / the configs' MODEL.SWIN.EMBED_DIM × 2^i, ResNet 256..2048).
EXPECTED = {
    "resnet18": ([64, 128, 256, 512], None),
    "resnet18_half": ([32, 64, 128, 256], None),  # the book's model (not an official backbone)
    "resnet50": ([256, 512, 1024, 2048], None),
    "resnet101": ([256, 512, 1024, 2048], None),
    "swin_tiny": ([96, 192, 384, 768], 7),
    "swin_small": ([96, 192, 384, 768], 7),
    "swin_base": ([128, 256, 512, 1024], 7),
    "swin_base_384": ([128, 256, 512, 1024], 12),
    "swin_large_384": ([192, 384, 768, 1536], 12),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter and float buffer (HF zero-initialises some, e.g. the Swin
    bias table, and BN statistics start at 0/1), so a wrong key map cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif "norm" in name and name.endswith("weight"):  # LayerNorm / BN scales around 1
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def test_every_named_backbone_has_the_official_shapes():
    assert set(BACKBONES) == set(EXPECTED)
    for name, (channels, window) in EXPECTED.items():
        with torch.device("meta"):  # structure only: building Swin-L for real takes seconds
            backbone = build_backbone(name)
        assert backbone.channels == channels, name
        assert backbone.strides == [4, 8, 16, 32] and backbone.names == [
            "res2",
            "res3",
            "res4",
            "res5",
        ]
        if window is not None:
            blocks = [b for stage in backbone.body.layers for b in stage.blocks]
            assert all(b.window_size == (window, window) for b in blocks), name
            assert [b.shift_size[0] for b in backbone.body.layers[0].blocks] == [0, window // 2]
    with torch.device("meta"):
        assert len(build_backbone("resnet101").body.layer3) == 23
        assert len(build_backbone("swin_small").body.layers[2].blocks) == 18


@pytest.mark.parametrize("name", ["resnet50", "swin_tiny"])
def test_forward_shapes_at_any_size(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    for H, W in [(64, 96), (50, 70)]:
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, H, W))
        assert list(features) == ["res2", "res3", "res4", "res5"]
        for (key, f), c, s in zip(features.items(), backbone.channels, backbone.strides):
            assert f.shape == (1, c, math.ceil(H / s), math.ceil(W / s)), (key, f.shape)
            assert torch.isfinite(f).all()


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_resnet_matches_hf(layer_type):
    config = ResNetConfig(
        depths=[2, 1, 2, 1],
        hidden_sizes=[32, 48, 64, 96],
        layer_type=layer_type,
        out_features=STAGES,
    )
    hf = ResNetBackbone(config).eval()
    randomize_(hf)
    name, arch = backbone_name_from_hf_config(config)
    assert name == ("resnet50" if layer_type == "bottleneck" else "resnet18")
    ours = build_backbone(name, **arch).eval()
    ours.load_state_dict(hf_backbone_to_timm(hf.state_dict(), name), strict=True)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        expected = hf(x).feature_maps
        got = ours(x)
    for e, g in zip(expected, got.values()):  # float rounding only: FrozenBN folds BN's formula
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def tiny_swin_pair(window: int = 7) -> tuple[SwinBackbone, torch.nn.Module]:
    """A random HF SwinBackbone and our backbone carrying the same weights (two blocks per stage,
    so every stage has a shifted block)."""
    config = SwinConfig(
        embed_dim=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        window_size=window,
        out_features=STAGES,
    )
    hf = SwinBackbone(config).eval()
    randomize_(hf)
    name, arch = backbone_name_from_hf_config(config)
    ours = build_backbone(name, **arch).eval()
    ours.load_state_dict(hf_backbone_to_timm(hf.state_dict(), name), strict=True)
    return hf, ours


# 64x96 and 224x352: grids not multiples of the window; 100x130: image not a multiple of the patch
# either; 32x40: grids smaller than the window from res3 on (the official code still shifts).
@pytest.mark.parametrize("size", [(64, 96), (100, 130), (224, 352), (32, 40)])
def test_swin_matches_hf_at_sizes_off_the_window_grid(size):
    hf, ours = tiny_swin_pair()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = hf(x).feature_maps  # includes HF's hidden_states_norms = official norm0..3
        got = ours(x)
    for e, g in zip(expected, got.values()):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_swin_window_12_matches_hf():
    hf, ours = tiny_swin_pair(window=12)
    assert ours.name == "swin_base_384"
    x = torch.randn(1, 3, 100, 200)
    with torch.no_grad():
        for e, g in zip(hf(x).feature_maps, ours(x).values()):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("Hp", "Wp", "window"), [(14, 21, 7), (7, 7, 7), (12, 24, 12)])
def test_shifted_window_mask_matches_the_slice_construction(Hp, Wp, window):
    """The official BasicLayer labels 3×3 slabs of the padded map with slices, then blocks pairs
    of tokens in one window whose labels differ."""
    shift = window // 2
    label = torch.zeros(Hp, Wp)
    slabs = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in slabs for w in slabs):
        label[h, w] = i
    windows = label.view(Hp // window, window, Wp // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)  # [nW, M²], row-major windows
    expected = windows[:, :, None] != windows[:, None, :]
    assert torch.equal(shifted_window_mask(Hp, Wp, window, shift, torch.device("cpu")), expected)


def test_timm_window_step_is_not_the_official_one():
    """timm rolls before padding: same numbers when every grid is a multiple of the window
    (224², grids 56/28/14/7), different ones otherwise. The official step is needed."""
    hf, ours = tiny_swin_pair()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        for e, t in zip(hf(x).feature_maps, ours.body.forward_timm_window_step(x)):
            torch.testing.assert_close(t, e, rtol=1e-4, atol=1e-4)
        x = torch.randn(1, 3, 64, 96)
        gaps = [
            (t - e).abs().max().item()
            for e, t in zip(hf(x).feature_maps, ours.body.forward_timm_window_step(x))
        ]
    assert max(gaps) > 0.05, gaps


def _frozen_names(backbone) -> set[str]:
    return {n for n, p in backbone.named_parameters() if not p.requires_grad}


def test_freeze_at_counts_stem_then_stages():
    tiny = {"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)}
    assert _frozen_names(build_backbone("resnet50", **tiny)) == set()
    frozen = _frozen_names(build_backbone("resnet50", freeze_at=1, **tiny))
    assert frozen == {"body.conv1.weight"}  # the stem's BN is a FrozenBN: buffers, no parameters
    backbone = build_backbone("resnet50", freeze_at=3, **tiny)
    prefixes = {n.split(".")[1] for n in _frozen_names(backbone)}
    assert prefixes == {"conv1", "layer1", "layer2"}
    assert all(
        p.requires_grad
        for n, p in backbone.named_parameters()
        if n.split(".")[1] in ("layer3", "layer4")
    )

    swin = {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 1, 1)}
    backbone = build_backbone("swin_tiny", freeze_at=2, drop_path_rate=0.3, **swin)
    frozen = _frozen_names(backbone)
    assert {n.split(".")[1] for n in frozen} == {"patch_embed", "layers", "norm0"}
    assert all(n.startswith(("body.patch_embed", "body.layers.0.", "body.norm0")) for n in frozen)
    backbone.train()
    assert (
        not backbone.body.layers[0].training and backbone.body.layers[1].training
    )  # frozen: no drop path
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone("resnet18", freeze_at=6)


def test_frozen_batchnorm_never_updates():
    backbone = build_backbone("resnet50", layers=(1, 1, 1, 1), channels=(8, 8, 16, 16)).train()
    assert not any("bn" in n or "downsample.1" in n for n, _ in backbone.named_parameters())
    before = {
        k: v.clone() for k, v in backbone.state_dict().items() if "bn" in k or "downsample.1" in k
    }
    assert any(k.endswith("running_mean") for k in before) and not any(
        "num_batches" in k for k in before
    )
    out = backbone(torch.randn(2, 3, 64, 64) * 5 + 3)  # statistics far from the stored ones
    sum(f.sum() for f in out.values()).backward()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    plain = build_backbone("resnet50", layers=(1, 1, 1, 1), channels=(8, 8, 16, 16)).eval()
    fast = build_backbone(
        "resnet50", layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), channels_last=True
    ).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        for a, b in zip(plain(x).values(), fast(x).values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_swin_drop_path_follows_the_official_linear_rule():
    backbone = build_backbone("swin_tiny", drop_path_rate=0.3, embed_dim=8, num_heads=(1, 1, 1, 1))
    rates = [
        getattr(b.drop_path1, "drop_prob", 0.0)
        for stage in backbone.body.layers
        for b in stage.blocks
    ]  # 12 blocks of Swin-T
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 12))


def test_bad_names_and_overrides_are_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match="window_size"):
        build_backbone("resnet50", window_size=7)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_backbone("resnet18")(torch.randn(3, 32, 32))


def test_norm_option_frozen_or_trainable():
    """Official recipes fine-tune with FrozenBN; from scratch the BatchNorms train. A frozen BN must
    not start at timm's zero-initialised last scale, which would switch the residual branches off."""
    from torchvision.ops import FrozenBatchNorm2d

    frozen = build_backbone("resnet18")
    assert isinstance(frozen.body.layer1[0].bn2, FrozenBatchNorm2d)
    assert frozen.body.layer1[0].bn2.weight.abs().sum() > 0
    trainable = build_backbone("resnet18", norm="bn")
    bn = trainable.body.layer1[0].bn2
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.weight.requires_grad
    trainable.train()
    before = bn.running_mean.clone()
    trainable(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, bn.running_mean)
    with pytest.raises(ValueError, match="norm"):
        build_backbone("resnet18", norm="group")


def test_syncbn_backbone_converts_to_sync_batchnorm_with_the_same_weights():
    """model.backbone_norm=syncbn: trainable BatchNorm that the training loop turns into
    nn.SyncBatchNorm under DDP; the conversion keeps every parameter and key (optimizer, checkpoints)."""
    backbone = build_backbone("resnet18", norm="syncbn", layers=(1, 1, 1, 1))
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight.requires_grad for m in bns)
    params = {id(p) for p in backbone.parameters()}
    keys = list(backbone.state_dict())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == len(bns)
    assert {id(p) for p in synced.parameters()} == params and list(synced.state_dict()) == keys
    with pytest.raises(ValueError, match="'syncbn'"):
        build_backbone("resnet18", norm="gn")
