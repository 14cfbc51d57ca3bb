"""Export the network to ONNX or ``torch.export``: ``m2f-lite export CHECKPOINT --format ... OUT``.

What is exported is the network only, :meth:`Mask2Former.forward_features` with ``aux=False``:

* input ``images`` ``[B, 3, H, W]`` float32, already normalised (``(x - pixel_mean) / pixel_std``)
  and zero-padded to ``H``, ``W`` multiples of 32, as :meth:`Mask2Former.preprocess` makes it;
* outputs ``pred_logits`` ``[B, Q, K+1]`` (class logits, last column "no object") and
  ``pred_masks`` ``[B, Q, H/4, W/4]`` (mask logits at stride 4, on the padded image).

``B``, ``H`` and ``W`` are dynamic (``H``, ``W`` any multiple of 32 from 64 to 2048). The
post-processing stays in Python: upsample ``pred_masks`` to ``(H, W)``, crop each image's true
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
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2f_lite.atomic_io import atomic_file

FORMATS = ("onnx", "torch-export")
SIZE_MULTIPLE = (
    32  # H and W of the exported graph: multiples of this (the model's size_divisibility)
)
MAX_SIDE = 2048  # the largest H or W the dynamic shapes allow
EXAMPLE_SIZE = (64, 96)  # the example traced: any multiples of 32 (neither 1 nor equal: see _dims)


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


def _dims() -> dict[str, dict[int, Any]]:
    """Dynamic batch, and H, W as 32·h, 32·w. The example has batch 2 and h ≠ w, both > 1, so that
    the tracer specialises no size to 1 and does not assume H = W."""
    batch = torch.export.Dim("batch", min=1, max=64)
    h = torch.export.Dim("h", min=2, max=MAX_SIDE // SIZE_MULTIPLE)
    w = torch.export.Dim("w", min=2, max=MAX_SIDE // SIZE_MULTIPLE)
    return {"images": {0: batch, 2: SIZE_MULTIPLE * h, 3: SIZE_MULTIPLE * w}}


def export_program(
    model: nn.Module, *, example_size: tuple[int, int] = EXAMPLE_SIZE
) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ExportedNetwork` (eval mode, CPU, float32, dynamic B/H/W).

    ``model`` is a :class:`~m2f_lite.modeling.mask2former.Mask2Former`; it is put in eval mode.
    """
    h, w = example_size
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == w or min(h, w) < 2 * SIZE_MULTIPLE:
        raise ValueError(
            f"example_size={example_size}: expected two different multiples of {SIZE_MULTIPLE}, "
            f"each at least {2 * SIZE_MULTIPLE}"
        )
    network = ExportedNetwork(model.float().cpu().eval()).eval()
    example = torch.zeros(2, 3, h, w)
    with reference_attention(), torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=_dims())


def _check_writable(out: Path) -> None:
    """One clear error before minutes of tracing: the folder of ``out`` must exist and be writable."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the file to write")
    if not folder.is_dir():
        raise ValueError(f"{out}: cannot write, the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{out}: cannot write, the folder {folder} is not writable")


def export_model(model: nn.Module, out: str | os.PathLike, *, format: str) -> dict[str, Any]:
    """Export ``model`` to ``out`` (``format`` ``"onnx"`` or ``"torch-export"``), atomically.

    ONNX: one self-contained ``.onnx`` file (weights inside, opset 18), for onnxruntime;
    torch-export: ``torch.export.save`` of the program (``.pt2``), read with ``torch.export.load``.
    Returns ``{"path", "format", "seconds", "bytes"}``.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: not supported; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    _check_writable(out)
    start = time.perf_counter()
    program = export_program(model)
    try:
        with atomic_file(out) as f:
            if format == "torch-export":
                torch.export.save(program, f)
            else:
                import onnx

                with reference_attention():
                    onnx_program = torch.onnx.export(
                        program,
                        input_names=["images"],
                        output_names=["pred_logits", "pred_masks"],
                        dynamo=True,
                        verbose=False,
                    )
                onnx.save_model(onnx_program.model_proto, f)
    except OSError as e:
        raise ValueError(f"{out}: cannot write ({e.strerror or e})") from e
    return {
        "path": str(out),
        "format": format,
        "seconds": time.perf_counter() - start,
        "bytes": out.stat().st_size,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str
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
    return export_model(model, out, format=format)


def export_main(checkpoint: str, out: str, *, format: str) -> str:
    """``m2f-lite export``: export, and the line it prints."""
    report = export_checkpoint(checkpoint, out, format=format)
    return (
        f"wrote {report['path']} ({report['format']}, {report['bytes'] / 2**20:.1f} MiB, "
        f"{report['seconds']:.0f} s): images [B, 3, H, W] normalised, H and W multiples of "
        f"{SIZE_MULTIPLE} -> pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4]"
    )
