"""Export cost and CPU latency: ``m2f-lite export`` (ONNX, torch.export) against the eager model.

For one checkpoint (the shipped shapes model by default) or a preset with random weights
(``--preset coco_panoptic_r50``): the time ``m2f_lite.export.export_model`` takes and the size of
the file it writes, for each format; then the forward latency at batch 1 on the CPU of

* eager: ``Mask2Former.forward_features(aux=False)`` under ``torch.inference_mode`` (the gather
  deformable attention, the package's CPU default);
* eager, reference attention: the same with ``M2F_MSDA=reference`` (what the export traces);
* torch.export: the exported program's module;
* onnxruntime: the ONNX file, CPUExecutionProvider, all graph optimisations,

alternating call by call (a busy machine slows all alike); each figure is the median of ``--runs``
calls after ``--warmup``. ``--threads`` sets torch's and onnxruntime's intra-op threads alike.

    python benchmarks/bench_export.py                              # shapes_book.pt, 128 x 128
    python benchmarks/bench_export.py --preset coco_panoptic_r50 --size 512 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from m2f_lite import checkpoint as ckpt
from m2f_lite import export
from m2f_lite.book_model import machine_description
from m2f_lite.config import get_config
from m2f_lite.modeling.mask2former import build_model

SHAPES_CKPT = Path(export.__file__).parent / "assets" / "shapes_book.pt"


def load(args: argparse.Namespace) -> torch.nn.Module:
    if args.preset:
        torch.manual_seed(0)
        return build_model(get_config(args.preset)).eval()
    state = ckpt.load_checkpoint(args.checkpoint)
    model = build_model(ckpt.checkpoint_config(state, args.checkpoint)).eval()
    ckpt.load_model_state(model, {k: v.float() for k, v in state["model"].items()})
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(SHAPES_CKPT))
    p.add_argument("--preset", default=None, help="a preset with random weights instead")
    p.add_argument("--size", type=int, default=128, help="square input side (multiple of 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = load(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        # a Swin exports at one size (m2f_lite.export); a ResNet with dynamic B, H, W
        size = (args.size, args.size) if model.backbone.family == "swin" else None
        for fmt, name in (("torch-export", "model.pt2"), ("onnx", "model.onnx")):
            report = export.export_model(model, Path(tmp) / name, format=fmt, size=size)
            files[fmt] = report["path"]
            rows.append(
                f"| export {fmt} | {report['seconds']:.1f} s | {report['bytes'] / 2**20:.1f} MiB |"
            )
        program = torch.export.load(files["torch-export"]).module()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])
        x = torch.randn(1, 3, args.size, args.size)

        def eager_reference():
            with export.reference_attention():
                model.forward_features(x, aux=False)

        runners = {
            "eager (gather MSDA)": lambda: model.forward_features(x, aux=False),
            "eager (reference MSDA)": eager_reference,
            "torch.export module": lambda: program(x),
            "onnxruntime": lambda: session.run(None, {"images": x.numpy()}),
        }
        times: dict[str, list[float]] = {k: [] for k in runners}
        with torch.inference_mode():
            for i in range(args.warmup + args.runs):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
    eager = statistics.median(times["eager (gather MSDA)"])
    print(
        f"command: python benchmarks/bench_export.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    print(f"machine: {machine_description()}, onnxruntime {ort.__version__}")
    print(
        f"model: {args.preset or Path(args.checkpoint).name}, input 1 x 3 x {args.size} x {args.size}, {args.threads} thread(s)\n"
    )
    print("| step | time | file |\n| --- | --- | --- |")
    print("\n".join(rows))
    print("\n| forward, batch 1 | median ms | vs eager |\n| --- | --- | --- |")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m * 1000:.1f} | {m / eager:.2f}x |")


if __name__ == "__main__":
    main()
