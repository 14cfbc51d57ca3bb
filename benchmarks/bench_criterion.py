"""Criterion memory and time: point-sampled losses vs full-mask losses (Sec. 3.3 of the paper).

The training setting of one image: a 1024² input, so pred_masks at 256² (H/4), 100 queries, 50
target masks at 1024², deep supervision (10 predictions: the final one and 9 auxiliary). Each
variant runs matching + loss + backward of the weighted total in a fresh subprocess:

- ``point``: K = 12544 points for matching and for the loss (the paper);
- ``full``: matching on full masks at 256² and the loss on the predictions upsampled to 1024²
  (``point_matching=False``, ``point_loss=False``; the paper's ablation, as MaskFormer computes it).

Peak memory is the criterion's own: on CUDA ``torch.cuda.max_memory_allocated`` above what the
inputs hold; on the CPU the process's peak resident set (``getrusage``) above its size before the
first call. The paper's 18 GB → 6 GB is for the whole training step (model included) per image;
this isolates the criterion's part. Prints a markdown table with the command and the machine.

    python benchmarks/bench_criterion.py                      # CPU, 1024², 100 queries, 50 targets
    python benchmarks/bench_criterion.py --device cuda
    python benchmarks/bench_criterion.py --size 512 --runs 1  # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from m2f_lite.criterion import SetCriterion
from m2f_lite.matcher import HungarianMatcher

VARIANTS = {"point": True, "full": False}  # name -> point sampling for matching and loss


def make_inputs(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Random predictions (leaf tensors with gradients) and random rectangular target masks."""
    g = torch.Generator().manual_seed(0)
    h = args.size // 4

    def prediction() -> dict[str, torch.Tensor]:
        logits = torch.randn(1, args.queries, args.classes + 1, generator=g)
        masks = 4 * torch.randn(1, args.queries, h, h, generator=g)
        return {
            "pred_logits": logits.to(args.device).requires_grad_(),
            "pred_masks": masks.to(args.device).requires_grad_(),
        }

    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(args.predictions - 1)]
    masks = torch.zeros(args.targets, args.size, args.size, dtype=torch.bool)
    corners = torch.randint(0, args.size // 2, (args.targets, 2), generator=g)
    sides = torch.randint(args.size // 16, args.size // 2, (args.targets, 2), generator=g)
    for mask, (y, x), (dy, dx) in zip(masks, corners.tolist(), sides.tolist()):
        mask[y : y + dy, x : x + dx] = True
    labels = torch.randint(0, args.classes, (args.targets,), generator=g)
    return outputs, [{"labels": labels.to(args.device), "masks": masks.to(args.device)}]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """One variant in this process: peak extra memory (first call) and time per call."""
    torch.set_num_threads(args.threads)
    points = VARIANTS[args.worker]
    matcher = HungarianMatcher(num_points=args.points, point_matching=points)
    criterion = SetCriterion(
        num_classes=args.classes, matcher=matcher, num_points=args.points, point_loss=points
    )
    criterion.to(args.device)
    cuda = args.device == "cuda"

    def step(outputs: dict, targets: list[dict]) -> None:
        losses = criterion(outputs, targets)
        criterion.total(losses).backward()
        if cuda:
            torch.cuda.synchronize()

    # warm up on a tiny problem (lazy initialisation of kernels and threads is not the criterion's)
    step(*make_inputs(argparse.Namespace(**{**vars(args), "size": 64, "predictions": 2})))
    outputs, targets = make_inputs(args)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_bytes()
    start = time.perf_counter()
    step(outputs, targets)
    first = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step(outputs, targets)
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": peak / 2**20,
        "first_s": first,
        "median_s": statistics.median(times) if times else first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=1024, help="input side; pred masks are size/4")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--predictions", type=int, default=10, help="final + auxiliary predictions")
    parser.add_argument("--points", type=int, default=12544)
    parser.add_argument("--runs", type=int, default=2, help="timed calls after the first one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    print(
        f"`{' '.join(['python', 'benchmarks/bench_criterion.py', *sys.argv[1:]])}` on {machine}, torch {torch.__version__}"
    )
    print(
        f"{args.size}² input ({args.size // 4}² pred masks), {args.queries} queries, {args.targets} targets, {args.predictions} predictions, batch 1\n"
    )
    print("| criterion (matching + loss + backward) | peak memory (MB) | time (s, median) |")
    print("| --- | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['peak_mb']:.0f} | {r['median_s']:.2f} |")
    ratio = results["full"]["peak_mb"] / max(results["point"]["peak_mb"], 1e-9)
    speed = results["full"]["median_s"] / results["point"]["median_s"]
    print(
        f"\nfull / point: {ratio:.1f}× memory, {speed:.1f}× time (paper, whole training step: 18 GB → 6 GB, 3×)"
    )


if __name__ == "__main__":
    main()
