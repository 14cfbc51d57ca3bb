"""The backbone: an ImageNet network whose stages give the multi-scale features of Mask2Former.

Mask2Former (Sec. 3.2, Fig. 2) reads four feature maps from the backbone, ``res2..res5`` at
strides 4, 8, 16 and 32: the pixel decoder attends over res3–res5 and upsamples to res2, whose
stride-4 resolution is the resolution of the predicted masks. The paper uses ResNet-50/101 and
Swin-T/S/B/L; here they are timm models:

- ResNet, torchvision style (stride in the 3×3 conv, as detectron2's ``R-50.pkl`` with
  ``STRIDE_IN_1X1: False``), through timm's ``features_only``, with every BatchNorm frozen
  (detectron2's default ``FrozenBN``: weight, bias and statistics are buffers, never updated).
- Swin, on timm's modules with the official window step and per-output LayerNorms
  (:mod:`m2f_lite.modeling.swin`), so the numbers are the official ``D2SwinTransformer``'s.

>>> backbone = build_backbone("resnet18")
>>> backbone.channels, backbone.strides
([64, 128, 256, 512], [4, 8, 16, 32])
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from m2f_lite.modeling.swin import SwinTrunk

# name -> family, timm model, architecture: the official MODEL.RESNETS / MODEL.SWIN values spelled
# as timm's keyword arguments. build_backbone accepts the same keywords as overrides.
_RESNET_WIDTHS = {"channels": (64, 128, 256, 512)}  # bottleneck widths (timm's stem is 64 wide)
BACKBONES: dict[str, dict[str, Any]] = {
    "resnet18": {
        "family": "resnet",
        "timm": "resnet18",
        "arch": {"layers": (2, 2, 2, 2), **_RESNET_WIDTHS},
    },
    # half the widths of resnet18, stem included: the book's CPU model (shapes_book), trained from
    # scratch: 3.1x fewer multiply-adds than resnet18 (0.19 vs 0.59 G at 128 x 128), no ImageNet weights
    "resnet18_half": {
        "family": "resnet",
        "timm": "resnet18",
        "arch": {"layers": (2, 2, 2, 2), "channels": (32, 64, 128, 256), "stem_width": 32},
    },
    "resnet50": {
        "family": "resnet",
        "timm": "resnet50",
        "arch": {"layers": (3, 4, 6, 3), **_RESNET_WIDTHS},
    },
    "resnet101": {
        "family": "resnet",
        "timm": "resnet101",
        "arch": {"layers": (3, 4, 23, 3), **_RESNET_WIDTHS},
    },
    "swin_tiny": {
        "family": "swin",
        "timm": "swin_tiny_patch4_window7_224",
        "arch": {
            "embed_dim": 96,
            "depths": (2, 2, 6, 2),
            "num_heads": (3, 6, 12, 24),
            "window_size": 7,
            "mlp_ratio": 4.0,
        },
    },
    "swin_small": {
        "family": "swin",
        "timm": "swin_small_patch4_window7_224",
        "arch": {
            "embed_dim": 96,
            "depths": (2, 2, 18, 2),
            "num_heads": (3, 6, 12, 24),
            "window_size": 7,
            "mlp_ratio": 4.0,
        },
    },
    "swin_base": {
        "family": "swin",
        "timm": "swin_base_patch4_window7_224",
        "arch": {
            "embed_dim": 128,
            "depths": (2, 2, 18, 2),
            "num_heads": (4, 8, 16, 32),
            "window_size": 7,
            "mlp_ratio": 4.0,
        },
    },
    "swin_base_384": {  # pre-trained at 384 with window 12 (MODEL.SWIN.PRETRAIN_IMG_SIZE: 384)
        "family": "swin",
        "timm": "swin_base_patch4_window12_384",
        "arch": {
            "embed_dim": 128,
            "depths": (2, 2, 18, 2),
            "num_heads": (4, 8, 16, 32),
            "window_size": 12,
            "mlp_ratio": 4.0,
        },
    },
    "swin_large_384": {
        "family": "swin",
        "timm": "swin_large_patch4_window12_384",
        "arch": {
            "embed_dim": 192,
            "depths": (2, 2, 18, 2),
            "num_heads": (6, 12, 24, 48),
            "window_size": 12,
            "mlp_ratio": 4.0,
        },
    },
}


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """detectron2's ``FrozenBN``: BatchNorm with fixed statistics and affine parameters (buffers).

    ``y = (x - mean) / sqrt(var + eps) · weight + bias``, computed by ``F.batch_norm`` in
    inference mode: one pass over ``x`` where torchvision's ``x * scale + bias`` makes two (the
    same numbers on the CPU; ``tests/test_fast_paths.py`` compares them). Gradients flow to ``x``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` replaced by a :class:`FrozenBatchNorm2d` holding
    its weight, bias, statistics and eps (in place for children; returns the new root)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                source = getattr(module, name)
                if source is not None:
                    getattr(frozen, name).copy_(source)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def backbone_family(name: str) -> str:
    """``"resnet"`` or ``"swin"`` for a name in :data:`BACKBONES`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]["family"]


class Backbone(nn.Module):
    """A timm ResNet or Swin returning ``{"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}``.

    Args:
        name: a key of :data:`BACKBONES` (kept for the weight converters).
        arch: the architecture keywords for timm (the entry's ``arch`` plus any overrides).
        norm: the ResNet's normalisation: ``"frozen_bn"`` (detectron2's default ``FrozenBN``, for
            fine-tuning ImageNet weights, as most official recipes), ``"bn"`` (trainable
            BatchNorm, for training from scratch, e.g. the tiny CPU recipe) or ``"syncbn"``
            (``MODEL.RESNETS.NORM: "SyncBN"`` of the Cityscapes and ADE20K R101 recipes: trainable
            BatchNorm here, which the training loop turns into ``nn.SyncBatchNorm`` under DDP on
            GPUs, so the statistics are those of the global batch). Swin ignores it.
        drop_path_rate: stochastic depth of the Swin blocks (``MODEL.SWIN.DROP_PATH_RATE``, 0.3 in
            the official Swin configs), increasing linearly over the blocks; ResNets ignore it.
        channels_last: feed the ResNet its input in channels-last memory format, which every
            convolution then keeps (the same numbers up to float rounding; faster: oneDNN and
            cuDNN convolutions work in it natively, and the pixel decoder reads the maps as
            ``[B, HW, C]`` without a copy). The weights stay contiguous (safetensors needs
            that). ``None`` (default): on for ResNets. Outputs have the NCHW shape either way.

    Attributes: ``channels`` (from timm's ``feature_info``), ``strides`` = [4, 8, 16, 32],
    ``names`` = ["res2", "res3", "res4", "res5"]. Inputs of any size work: a Swin pads the image
    to a multiple of 4 and its token maps to a multiple of the window, as the official code; the
    output sizes are then ``ceil(H / stride)``.
    """

    def __init__(
        self,
        *,
        name: str,
        arch: dict[str, Any] | None = None,
        norm: str = "frozen_bn",
        drop_path_rate: float = 0.0,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if norm not in ("frozen_bn", "bn", "syncbn"):
            raise ValueError(f"Backbone norm={norm!r}: expected 'frozen_bn', 'bn' or 'syncbn'")
        self.name = name
        self.norm = norm
        self.family = backbone_family(name)
        self.arch = dict(arch or {})
        self.channels_last = channels_last is not False and self.family == "resnet"
        timm_name = BACKBONES[name]["timm"]
        if self.family == "resnet":
            body = timm.create_model(
                timm_name,
                pretrained=False,
                features_only=True,
                out_indices=(1, 2, 3, 4),
                # timm zero-initialises each block's last BN scale; frozen at 0 it would switch the
                # residual branches off for good when no pretrained weights are loaded
                zero_init_last=norm != "frozen_bn",
                **self.arch,
            )
            # frozen: every BatchNorm2d -> FrozenBatchNorm2d (weight, bias, statistics are buffers)
            self.body = freeze_batch_norm(body) if norm == "frozen_bn" else body
            self.channels: list[int] = list(self.body.feature_info.channels())
        else:
            self.body = SwinTrunk(
                timm_name=timm_name, drop_path_rate=drop_path_rate, arch=self.arch
            )
            self.channels = list(self.body.channels)
        self.strides = [4, 8, 16, 32]
        self.names = ["res2", "res3", "res4", "res5"]
        self.frozen: list[nn.Module] = []

    def stages(self) -> list[list[nn.Module]]:
        """The modules of the stem and of res2..res5, in order (what ``freeze_at`` counts)."""
        b = self.body
        if self.family == "resnet":
            return [[b.conv1, b.bn1], [b.layer1], [b.layer2], [b.layer3], [b.layer4]]
        # timm's stage i holds the patch merging that feeds it; norm{i} normalises its output
        return [[b.patch_embed]] + [[b.layers[i], getattr(b, f"norm{i}")] for i in range(4)]

    def freeze(self, freeze_at: int) -> None:
        """detectron2's ``FREEZE_AT``: 0 = train everything, 1 = freeze the stem (ResNet stem or Swin
        patch embedding), 2 = the stem and res2, ..., 5 = everything. Frozen parameters get
        ``requires_grad=False`` and frozen modules stay in eval mode (no drop path)."""
        if not 0 <= freeze_at <= 5:
            raise ValueError(
                f"freeze_at={freeze_at}: expected 0 (nothing frozen) to 5 (stem and res2..res5)"
            )
        self.frozen = [m for stage in self.stages()[:freeze_at] for m in stage]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: normalised images ``[B, 3, H, W]`` → ``{"res2": [B, C2, ⌈H/4⌉, ⌈W/4⌉], ...}``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Backbone input: expected [B, 3, H, W], got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)  # four maps, strides 4..32
        return dict(zip(self.names, features))


def build_backbone(
    name: str,
    *,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    drop_path_rate: float = 0.0,
    channels_last: bool | None = None,
    **arch_overrides: Any,
) -> Backbone:
    """The backbone ``name`` (a key of :data:`BACKBONES`), randomly initialised: never downloads.

    ``arch_overrides`` replace architecture keywords of the entry, for tiny or converted variants:
    ``build_backbone("resnet50", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))``,
    ``build_backbone("swin_tiny", embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))``.
    The keys are those of the entry's ``arch``: ResNet ``layers``, ``channels`` (bottleneck
    widths; bottleneck outputs are 4× wider; the stem stays 64 wide); Swin ``embed_dim``,
    ``depths``, ``num_heads``, ``window_size``, ``mlp_ratio``. Pretrained weights are loaded
    separately, by ``m2f_lite.weights.backbone.load_pretrained_backbone``.
    """
    backbone_family(name)  # a clear error for an unknown name
    allowed = BACKBONES[name]["arch"]
    unknown = set(arch_overrides) - set(allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise ValueError(
            f"build_backbone({name!r}): unknown keys {sorted(unknown)}; expected {expected}"
        )
    arch = {**BACKBONES[name]["arch"], **arch_overrides}
    backbone = Backbone(
        name=name, arch=arch, norm=norm, drop_path_rate=drop_path_rate, channels_last=channels_last
    )
    backbone.freeze(freeze_at)
    return backbone
