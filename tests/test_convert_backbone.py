"""Backbone weight names: detectron2/official round trips, loading files, HF names, safe pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import ResNetConfig, SwinConfig

from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.weights.backbone import (
    backbone_name_from_hf_config,
    detectron2_backbone_to_timm,
    hf_backbone_to_timm,
    load_pretrained_backbone,
    timm_to_detectron2_backbone,
)
from m2f_lite.weights.unpickler import read_state_dict

STAGES = ["stage1", "stage2", "stage3", "stage4"]
TINY = {
    "resnet50": {"layers": (2, 1, 1, 1), "channels": (8, 8, 16, 16)},
    "resnet18": {"layers": (2, 1, 1, 1), "channels": (8, 8, 16, 16)},
    "swin_tiny": {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 1, 1)},
}


def random_backbone(name: str, seed: int):
    """A tiny backbone with random values in every parameter and buffer."""
    backbone = build_backbone(name, **TINY[name]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in backbone.state_dict().items():
            t.copy_(
                torch.rand(t.shape, generator=g) + 0.5
                if key.endswith("running_var")
                else torch.randn(t.shape, generator=g) * 0.2
            )
    return backbone


def official_resnet_keys(layers, bottleneck: bool) -> set[str]:
    """detectron2's ResNet names, written out from its BottleneckBlock / BasicBlock definitions."""
    norm = ("weight", "bias", "running_mean", "running_var")
    keys = {"stem.conv1.weight", *(f"stem.conv1.norm.{p}" for p in norm)}
    for s, n in enumerate(layers):
        for b in range(n):
            convs = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
            if b == 0 and (bottleneck or s > 0):  # a projection where the width or stride changes
                convs.append("shortcut")
            for c in convs:
                keys |= {
                    f"res{s + 2}.{b}.{c}.weight",
                    *(f"res{s + 2}.{b}.{c}.norm.{p}" for p in norm),
                }
    return keys


def official_swin_keys(depths) -> set[str]:
    """The official Swin names (mask2former/modeling/backbone/swin.py), buffers included."""
    keys = {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    for i, depth in enumerate(depths):
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}"
            keys |= {
                f"{block}.{m}.{p}"
                for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                for p in ("weight", "bias")
            }
            keys |= {
                f"{block}.attn.relative_position_bias_table",
                f"{block}.attn.relative_position_index",
            }
        if i < len(depths) - 1:
            keys |= {
                f"layers.{i}.downsample.reduction.weight",
                f"layers.{i}.downsample.norm.weight",
                f"layers.{i}.downsample.norm.bias",
            }
        keys |= {f"norm{i}.weight", f"norm{i}.bias"}
    return keys


def test_full_size_key_sets_are_the_official_ones():
    with torch.device("meta"):
        r50, r18, swin = (
            build_backbone("resnet50"),
            build_backbone("resnet18"),
            build_backbone("swin_tiny"),
        )
        assert set(
            timm_to_detectron2_backbone(r50.state_dict(), "resnet50")
        ) == official_resnet_keys((3, 4, 6, 3), True)
        assert set(
            timm_to_detectron2_backbone(r18.state_dict(), "resnet18")
        ) == official_resnet_keys((2, 2, 2, 2), False)
        assert set(
            timm_to_detectron2_backbone(swin.state_dict(), "swin_tiny")
        ) == official_swin_keys((2, 2, 6, 2))


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "swin_tiny"])
def test_detectron2_round_trip_is_exact_and_computes_the_same(name):
    source = random_backbone(name, seed=1)
    official = timm_to_detectron2_backbone(source.state_dict(), name)
    official_np = {k: v.numpy() for k, v in official.items()}  # detectron2 .pkl files hold numpy
    back = detectron2_backbone_to_timm(official_np, name)
    own = source.state_dict()
    assert set(back) == set(own)
    assert all(torch.equal(back[k], own[k]) for k in own)

    target = build_backbone(name, **TINY[name]).eval()
    target.load_state_dict(back, strict=True)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        for a, b in zip(source(x).values(), target(x).values()):
            assert torch.equal(a, b)


def test_official_swin_index_buffer_is_the_official_formula():
    official = timm_to_detectron2_backbone(
        random_backbone("swin_tiny", 0).state_dict(), "swin_tiny"
    )
    index = official["layers.0.blocks.0.attn.relative_position_index"]  # [49, 49] for window 7
    coords = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")).flatten(
        1
    )  # [2, 49]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + 6  # [49, 49, 2], from 0
    assert torch.equal(index, rel[..., 0] * 13 + rel[..., 1])


def _outputs(backbone, x):
    with torch.no_grad():
        return list(backbone(x).values())


def test_load_pretrained_from_detectron2_pkl_timm_pth_and_safetensors(tmp_path):
    x = torch.randn(1, 3, 40, 56)
    source = random_backbone("resnet50", seed=2)
    expected = _outputs(source, x)
    # detectron2 R-50.pkl layout: numpy, a "model" wrapper, the ImageNet classifier under stem.fc
    official = {
        k: v.numpy()
        for k, v in timm_to_detectron2_backbone(source.state_dict(), "resnet50").items()
    }
    official |= {
        "stem.fc.weight": np.zeros((10, 16), np.float32),
        "stem.fc.bias": np.zeros(10, np.float32),
    }
    with (tmp_path / "R-50.pkl").open("wb") as f:
        pickle.dump(
            {"model": official, "__author__": "torchvision", "matching_heuristics": True}, f
        )
    # timm / torchvision layout: no prefix, BN counters, a classifier
    timm_sd = {k.removeprefix("body."): v for k, v in source.state_dict().items()}
    timm_sd |= {
        "bn1.num_batches_tracked": torch.tensor(5),
        "fc.weight": torch.zeros(10, 64),
        "fc.bias": torch.zeros(10),
    }
    torch.save(timm_sd, tmp_path / "r50.pth")
    save_file(timm_sd, str(tmp_path / "r50.safetensors"))
    for file in ("R-50.pkl", "r50.pth", "r50.safetensors"):
        target = build_backbone("resnet50", **TINY["resnet50"]).eval()
        load_pretrained_backbone(target, str(tmp_path / file))
        for a, b in zip(expected, _outputs(target, x)):
            assert torch.equal(a, b), file


def test_load_pretrained_official_swin_checkpoint_without_output_norms(tmp_path):
    source = random_backbone("swin_tiny", seed=3)
    official = timm_to_detectron2_backbone(source.state_dict(), "swin_tiny")
    official = {
        k: v for k, v in official.items() if not k.startswith("norm")
    }  # ImageNet: no norm0..3
    official |= {
        "norm.weight": torch.ones(64),
        "head.weight": torch.zeros(10, 64),
        "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49),
    }
    torch.save({"model": official}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    target = build_backbone("swin_tiny", **TINY["swin_tiny"]).eval()
    load_pretrained_backbone(target, str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    loaded = target.state_dict()
    assert all(
        torch.equal(loaded[k], v)
        for k, v in source.state_dict().items()
        if not k.startswith("body.norm")
    )
    assert torch.equal(loaded["body.norm0.weight"], torch.ones(8))  # left at the official init


def test_load_pretrained_names_the_bad_keys(tmp_path):
    state = build_backbone("resnet50", **TINY["resnet50"]).state_dict()
    torch.save({k.removeprefix("body."): v for k, v in state.items()}, tmp_path / "small.pth")
    with pytest.raises(
        ValueError,
        match=r"small\.pth: weights do not fit backbone 'resnet18'(.|\n)*unexpected .*conv3",
    ):
        load_pretrained_backbone(
            build_backbone("resnet18", **TINY["resnet18"]), str(tmp_path / "small.pth")
        )
    del state["body.layer1.0.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \(1\): body\.layer1\.0\.conv2\.weight"):
        load_pretrained_backbone(
            build_backbone("resnet50", **TINY["resnet50"]), str(tmp_path / "partial.pth")
        )
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_pretrained_backbone(build_backbone("resnet18"), str(tmp_path / "nope.pth"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file if unpickled


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with (tmp_path / "evil.pkl").open("wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Exploit(str(marker))}}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl: refusing to unpickle io\.open"):
        read_state_dict(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_hf_swin_names_of_transformers_4_convert_the_same():
    from transformers import SwinBackbone

    hf = SwinBackbone(
        SwinConfig(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 1, 1, 1], out_features=STAGES)
    )
    v5 = hf.state_dict()
    v4 = {}
    for key, value in v5.items():
        for new, old in [
            ("q_proj", "self.query"),
            ("k_proj", "self.key"),
            ("v_proj", "self.value"),
            ("o_proj", "output.dense"),
        ]:
            key = key.replace(f"attention.{new}.", f"attention.{old}.")
        v4[key.replace("attention.relative_position_bias.", "attention.self.")] = value
    assert set(v4) != set(v5)
    a, b = hf_backbone_to_timm(v5, "swin_tiny"), hf_backbone_to_timm(v4, "swin_tiny")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="no mapping"):
        hf_backbone_to_timm({**v5, "swin.extra.weight": torch.zeros(1)}, "swin_tiny")


def test_backbone_name_from_hf_config():
    assert backbone_name_from_hf_config(SwinConfig(out_features=STAGES)) == ("swin_tiny", {})
    swin_l = SwinConfig(
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        out_features=STAGES,
    )
    assert backbone_name_from_hf_config(swin_l) == ("swin_large_384", {})
    r101 = ResNetConfig(depths=[3, 4, 23, 3], out_features=STAGES)
    assert backbone_name_from_hf_config(r101) == ("resnet101", {})
    tiny = SwinConfig(
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=12,
        out_features=STAGES,
    )
    assert backbone_name_from_hf_config(tiny) == (
        "swin_base_384",
        {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    )
    with pytest.raises(ValueError, match="downsample_in_bottleneck"):
        backbone_name_from_hf_config(
            ResNetConfig(downsample_in_bottleneck=True, out_features=STAGES)
        )
    with pytest.raises(ValueError, match="out_features"):
        backbone_name_from_hf_config(SwinConfig(out_features=["stage4"]))


def test_load_pretrained_into_trainable_batchnorm(tmp_path):
    """A from-scratch backbone (norm="bn") takes detectron2 weights, which carry no BN counters."""
    x = torch.randn(1, 3, 40, 56)
    source = random_backbone("resnet50", seed=3)
    official = {
        k: v.numpy()
        for k, v in timm_to_detectron2_backbone(source.state_dict(), "resnet50").items()
    }
    with (tmp_path / "R-50.pkl").open("wb") as f:
        pickle.dump({"model": official}, f)
    target = build_backbone("resnet50", norm="bn", **TINY["resnet50"]).eval()
    load_pretrained_backbone(target, str(tmp_path / "R-50.pkl"))
    for a, b in zip(_outputs(source, x), _outputs(target, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
