"""Forward latency: m2f_lite vs HF transformers' Mask2Former, same config and weights, one run.

A random-init HF ``Mask2FormerForUniversalSegmentation`` (R50 backbone and the official COCO
panoptic head by default; ``--tiny`` for the tiny test config) is converted with
``m2f_lite.convert.from_transformers``; both models then run the same image (HF on the normalised
pixels, m2f_lite on the raw 0..255 image, which it normalises itself), in eval mode under
``torch.inference_mode``. Prints the median and min of ``--runs`` timed runs after ``--warmup``
runs (the two models alternating), the largest output difference, the command and the machine, as a markdown table.

    python benchmarks/bench_model.py                  # R50, 512x512, CPU, batch 1
    python benchmarks/bench_model.py --tiny --size 256
    python benchmarks/bench_model.py --device cuda --runs 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

from m2f_lite.config import IMAGENET_MEAN, IMAGENET_STD
from m2f_lite.convert import from_transformers

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def hf_config(tiny: bool) -> Mask2FormerConfig:
    """The official R50 COCO-panoptic shape (133 classes, 100 queries, 6 + 9 layers), or a tiny one."""
    if not tiny:
        backbone = ResNetConfig(
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            layer_type="bottleneck",
            out_features=STAGES,
        )
        return Mask2FormerConfig(backbone_config=backbone, num_labels=133)
    backbone = ResNetConfig(
        embedding_size=64,
        depths=[1, 1, 1, 1],
        hidden_sizes=[32, 64, 96, 128],
        layer_type="bottleneck",
        out_features=STAGES,
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=7,
        num_queries=20,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=128,
        dim_feedforward=128,
        encoder_layers=2,
        decoder_layers=4,
        num_attention_heads=4,
    )


def timed(
    fns: dict[str, Callable[[], object]], runs: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Wall-clock milliseconds of ``runs`` calls of each function after ``warmup`` calls, the
    functions interleaved call by call so that a busy machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test config instead of R50")
    parser.add_argument("--size", type=int, default=512, help="square input side (default 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(hf_config(args.tiny)).eval()
    ours = from_transformers(hf).eval()
    hf, ours = hf.to(args.device), ours.to(args.device)
    image = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 255
    mean = torch.tensor(IMAGENET_MEAN, device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=args.device).view(1, 3, 1, 1)
    pixel_values = (image - mean) / std

    with torch.inference_mode():
        out_hf = hf(pixel_values=pixel_values)
        out_ours = ours(image)
        diff_masks = (out_hf.masks_queries_logits - out_ours["pred_masks"]).abs().max().item()
        diff_logits = (out_hf.class_queries_logits - out_ours["pred_logits"]).abs().max().item()
        fns = {"ours": lambda: ours(image), "hf": lambda: hf(pixel_values=pixel_values)}
        times = timed(fns, args.runs, args.warmup, args.device)
    t_ours, t_hf = times["ours"], times["hf"]

    name = "tiny" if args.tiny else "R50"
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(
        f"## Forward latency, {name}, {args.batch}x3x{args.size}x{args.size}, {args.device}, eval\n"
    )
    print("| model | median ms | min ms | runs |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| m2f_lite | {statistics.median(t_ours):.1f} | {min(t_ours):.1f} | {args.runs} |")
    print(f"| HF transformers | {statistics.median(t_hf):.1f} | {min(t_hf):.1f} | {args.runs} |")
    print(f"\nmax |difference|: pred_masks {diff_masks:.2e}, pred_logits {diff_logits:.2e}")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.platform()}, {device}, python {platform.python_version()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, transformers {__import__('transformers').__version__}"
    )


if __name__ == "__main__":
    main()
