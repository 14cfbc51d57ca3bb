"""Export the network to ONNX or ``torch.export``: ``m2f-lite export CHECKPOINT --format ... OUT``.

What is exported is the network only, :meth:`Mask2Former.forward_features` with ``aux=False``:

* input ``images`` ``[B, 3, H, W]`` float32, already normalised (``(x - pixel_mean) / pixel_std``)
  and zero-padded to ``H``, ``W`` multiples of 32, as :meth:`Mask2Former.preprocess` makes it;
* outputs ``pred_logits`` ``[B, Q, K+1]`` (class logits, last column "no object") and
  ``pred_masks`` ``[B, Q, H/4, W/4]`` (mask logits at stride 4, on the padded image).

``B``, ``H`` and ``W`` are dynamic (``H``, ``W`` any multiple of 32 from 64 to 2048) for a ResNet
backbone. A Swin backbone is exported at one input size (``size=(H, W)``, ``--size HxW``) with a
dynamic batch: its window step pads each token map to a multiple of the window (``H % M``), and
torch.export's symbolic shapes turn that into modular arithmetic it did not finish simplifying in
5 minutes (torch 2.14; measured on a 4-block Swin), where a fixed size exports in seconds.
``size`` fixes the size of a ResNet export as well. The post-processing stays in Python: upsample ``pred_masks`` to ``(H, W)``, crop each image's true
size, resize to the original resolution and run :mod:`m2f_lite.inference` (semantic, instance or
panoptic) on the result: the official post-processing has data-dependent shapes (top-k, per-segment
loops) that a static graph expresses badly, and it is cheap next to the network.

Multi-scale deformable attention is traced through its reference path
(:func:`~m2f_lite.modeling.ms_deform_attn.ms_deform_attn_reference`: ``F.grid_sample`` per level),
so the ONNX file holds standard operators only (``GridSample``, opset 18) and runs in
onnxruntime on the CPU with no custom operator; ``tests/test_export.py`` checks onnxruntime's and
``torch.export``'s outputs against the eager model at sizes not seen at export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2f_lite.atomic_io import atomic_file

FORMATS = ("onnx", "torch-export")
# H and W of the exported graph: multiples of this (the model's size_divisibility)
SIZE_MULTIPLE = 32
OPSET = 18  # GridSample (the reference deformable attention) needs 16 or later
MAX_SIDE = 2048  # the largest H or W the dynamic shapes allow
EXAMPLE_SIZE = (64, 96)  # the example traced: multiples of 32, h != w, both > 1 (see _dims)


class ExportedNetwork(nn.Module):
    """``Mask2Former.forward_features(images, aux=False)`` as a pair of tensors (what is exported).

    ``images`` ``[B, 3, H, W]``, normalised and padded → ``pred_logits`` ``[B, Q, K+1]``,
    ``pred_masks`` ``[B, Q, H/4, W/4]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model.forward_features(images, aux=False)
        return outputs["pred_logits"], outputs["pred_masks"]


@contextlib.contextmanager
def reference_attention() -> Iterator[None]:
    """Run multi-scale deformable attention through its reference path (``M2F_MSDA=reference``)
    inside the block: the gather path's ``embedding_bag`` and the Triton kernel do not export."""
    previous = os.environ.get("M2F_MSDA")
    os.environ["M2F_MSDA"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["M2F_MSDA"]
        else:
            os.environ["M2F_MSDA"] = previous


def _dims(size: tuple[int, int] | None) -> dict[str, dict[int, Any]]:
    """Dynamic batch, and (``size`` None) H, W as 32·h, 32·w. The example has batch 2 and h ≠ w,
    both > 1, so that the tracer specialises no size to 1 and does not assume H = W."""
    batch = torch.export.Dim("batch", min=1, max=64)
    if size is not None:
        return {"images": {0: batch}}
    h = torch.export.Dim("h", min=2, max=MAX_SIDE // SIZE_MULTIPLE)
    w = torch.export.Dim("w", min=2, max=MAX_SIDE // SIZE_MULTIPLE)
    return {"images": {0: batch, 2: SIZE_MULTIPLE * h, 3: SIZE_MULTIPLE * w}}


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (``--size``) → ``(H, W)``, both positive multiples of 32."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text}: expected HxW, e.g. 384x512") from None
    if min(h, w) <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"--size {text}: H and W must be positive multiples of {SIZE_MULTIPLE}")
    return h, w


def export_program(
    model: nn.Module, *, size: tuple[int, int] | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ExportedNetwork` (eval mode, CPU, float32).

    ``model`` is a :class:`~m2f_lite.modeling.mask2former.Mask2Former`; it is put in eval mode.
    ``size=None``: dynamic B, H, W (traced at :data:`EXAMPLE_SIZE`; ResNet backbones only);
    ``size=(H, W)``: that input size, dynamic B.
    """
    if size is None and getattr(model.backbone, "family", "resnet") == "swin":
        raise ValueError(
            "a Swin backbone exports at one input size (its window padding does not trace "
            "symbolically in reasonable time): give --size HxW, e.g. --size 384x512"
        )
    h, w = size or EXAMPLE_SIZE
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"size=({h}, {w}): H and W must be multiples of {SIZE_MULTIPLE}")
    network = ExportedNetwork(model.float().cpu().eval()).eval()
    example = torch.zeros(2, 3, h, w)  # [B, 3, H, W], batch 2: not specialised to 1
    with reference_attention(), torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=_dims(size))


def onnx_model(program: torch.export.ExportedProgram, *, optimize: bool = True) -> Any:
    """The ONNX model (``onnx.ModelProto``, opset 18, weights inside) of an exported program.

    ``optimize``: onnxscript's graph optimisation (constant folding, redundant casts and shape
    ops removed; about a third of the conversion time); the tests skip it for the models with
    random weights, and check the optimised graph on the shapes model.
    """
    # onnxscript warns once per Split node that it does not fold it (dozens of lines of noise)
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with reference_attention():
            onnx_program = torch.onnx.export(
                program,
                input_names=["images"],
                output_names=["pred_logits", "pred_masks"],
                opset_version=OPSET,
                dynamo=True,
                optimize=optimize,
                verbose=False,
            )
    finally:
        folding.setLevel(level)
    return onnx_program.model_proto


def _check_writable(out: Path) -> None:
    """One clear error before minutes of tracing: the folder of ``out`` must exist and be writable."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the file to write")
    if not folder.is_dir():
        raise ValueError(f"{out}: cannot write, the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{out}: cannot write, the folder {folder} is not writable")


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    format: str,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``out`` (``format`` ``"onnx"`` or ``"torch-export"``), atomically.

    ONNX: one self-contained ``.onnx`` file (weights inside, opset 18), for onnxruntime;
    torch-export: ``torch.export.save`` of the program (``.pt2``), read with ``torch.export.load``.
    ``size``: see :func:`export_program`. Returns ``{"path", "format", "seconds", "bytes"}``.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: not supported; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    _check_writable(out)
    start = time.perf_counter()
    program = export_program(model, size=size)
    try:
        with atomic_file(out) as f:
            if format == "torch-export":
                torch.export.save(program, f)
            else:  # one self-contained file: the serialised ModelProto, weights inside
                f.write(onnx_model(program).SerializeToString())
    except OSError as e:
        raise ValueError(f"{out}: cannot write ({e.strerror or e})") from e
    return {
        "path": str(out),
        "format": format,
        "seconds": time.perf_counter() - start,
        "bytes": out.stat().st_size,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    size: tuple[int, int] | None = None,
) -> dict:
    """Load an m2f_lite checkpoint (verified, strict) and :func:`export_model` its network."""
    from m2f_lite import checkpoint as ckpt
    from m2f_lite.modeling.mask2former import build_model

    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: not supported; choose one of: {', '.join(FORMATS)}")
    _check_writable(Path(out))
    state = ckpt.load_checkpoint(checkpoint)
    model = build_model(ckpt.checkpoint_config(state, checkpoint))
    ckpt.load_model_state(
        model, {k: v.float() for k, v in state["model"].items()}, source=str(checkpoint)
    )
    return export_model(model, out, format=format, size=size)


def export_main(checkpoint: str, out: str, *, format: str, size: str | None = None) -> str:
    """``m2f-lite export``: export, and the line it prints (``size``: ``--size HxW`` or None)."""
    hw = parse_size(size) if size else None
    report = export_checkpoint(checkpoint, out, format=format, size=hw)
    sizes = f"H x W = {hw[0]} x {hw[1]}" if hw else f"H and W multiples of {SIZE_MULTIPLE}"
    return (
        f"wrote {report['path']} ({report['format']}, {report['bytes'] / 2**20:.1f} MiB, "
        f"{report['seconds']:.0f} s): images [B, 3, H, W] normalised, {sizes} "
        "-> pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4]"
    )
