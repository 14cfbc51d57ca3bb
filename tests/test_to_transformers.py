"""m2f_lite → HF transformers (``to_transformers``, ``m2f-lite convert ... --to transformers``).

Tiny models with random weights (every tensor perturbed, BatchNorm statistics included, so that
no weight can be left at a default unnoticed): the round trip ``from_transformers(
to_transformers(m))`` gives back ``m``'s state dict exactly, and HF's forward computes m2f_lite's
class and mask logits to 1e-4. HF takes normalised pixels: both get the same ``[B, 3, H, W]``
normalised batch (``Mask2Former.forward_features``). No network: HF models are built from configs.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tiny_run import NARROW_HEAD
from transformers import Mask2FormerForUniversalSegmentation

from m2f_lite import checkpoint as ckpt
from m2f_lite import cli
from m2f_lite.book_model import checkpoint_path
from m2f_lite.config import get_config
from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.weights.transformers import (
    NotRepresentableError,
    from_transformers,
    to_transformers,
)

TINY = [  # a narrow head: 2 encoder layers, 3 decoder layers (HF's decoder_layers = 4)
    "model.num_classes=7",
    "model.num_queries=12",
    *NARROW_HEAD,
    "model.enc_layers=2",
    "model.dec_layers=3",
]
BACKBONES = {  # the backbone kinds HF has, tiny: bottleneck ResNet, basic ResNet, Swin
    "resnet50": dict(layers=(1, 2, 1, 1), channels=(8, 16, 24, 32)),
    "resnet18": dict(layers=(1, 1, 1, 1)),
    # window 3 on token grids of 24x40 ... 3x5: padding and shifted windows on every stage
    "swin_tiny": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3),
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every floating tensor of the state dict moved off its initial value (variances > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            else:
                value.add_(0.05 * torch.randn(value.shape, generator=g))
    return model.eval()


def _tiny_model(name: str):
    torch.manual_seed(0)
    cfg = get_config("shapes_tiny", TINY)
    backbone = build_backbone(name, norm="frozen_bn", **BACKBONES[name])
    return _perturb(build_model(cfg, backbone=backbone))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_round_trip_and_hf_forward(name):
    model = _tiny_model(name)
    hf = to_transformers(model)
    assert isinstance(hf, Mask2FormerForUniversalSegmentation) and not hf.training
    back = from_transformers(hf).state_dict()
    own = model.state_dict()
    assert sorted(back) == sorted(own)
    for key, value in own.items():
        assert torch.equal(back[key], value), key
    images = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.forward_features(images, aux=False)
        got = hf(pixel_values=images)
    torch.testing.assert_close(got.class_queries_logits, want["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.masks_queries_logits, want["pred_masks"], atol=1e-4, rtol=0)


def test_cli_convert_to_transformers_writes_save_pretrained(tmp_path, capsys):
    """``m2f-lite convert CKPT --to transformers DIR`` → a folder HF's from_pretrained reads."""
    torch.manual_seed(0)
    cfg = get_config("shapes_tiny", TINY)
    model = _perturb(build_model(cfg))
    path = ckpt.save_checkpoint(tmp_path / "tiny.pt", model=model, config=cfg)
    out = tmp_path / "hf"
    assert cli.main(["convert", str(path), str(out), "--to", "transformers"]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    hf = Mask2FormerForUniversalSegmentation.from_pretrained(out, local_files_only=True).eval()
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.forward_features(images, aux=False)
        got = hf(pixel_values=images)
    torch.testing.assert_close(got.masks_queries_logits, want["pred_masks"], atol=1e-4, rtol=0)
    # and back, from the files HF wrote: shapes_tiny's trainable BatchNorm comes back as FrozenBN
    # (the same statistics, without the training-time update counters)
    back = from_transformers(hf).state_dict()
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(back) == sorted(own) and all(torch.equal(back[k], v) for k, v in own.items())
    assert capsys.readouterr().out.startswith(f"wrote {out} ")


def test_what_hf_cannot_hold_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(NotRepresentableError, match="2 encoder heads, 4 decoder"):
        to_transformers(build_model(get_config("shapes_tiny", [*TINY, "model.enc_nheads=2"])))
    with pytest.raises(NotRepresentableError, match="masked_attention"):
        to_transformers(
            build_model(get_config("shapes_tiny", [*TINY, "model.masked_attention=false"]))
        )
    assert issubclass(NotRepresentableError, ValueError)
    # the book's model: resnet18_half's 32-wide stem
    out = tmp_path / "hf"
    assert cli.main(["convert", str(checkpoint_path()), str(out), "--to", "transformers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f-lite: error: to_transformers: backbone resnet18_half")
    assert "\n" not in err and not out.exists()
