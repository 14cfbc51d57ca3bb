"""Multi-scale deformable attention: the Triton kernels against the grid_sample reference.

Times the forward (under ``torch.no_grad``) and forward + backward (gradients for values,
locations and weights) of ``ms_deform_attn_triton`` and ``ms_deform_attn_reference`` at the size of
the official pixel decoder's encoder: batch 2, a 1024² image, so levels 32², 64², 128² (strides
32, 16, 8), every pixel a query (Lq = S = 21504), 8 heads of 32 channels, 3 levels, 4 points.
Sampling locations are the official encoder's: each query's own pixel centre plus offsets of a
few pixels; attention weights are a softmax over the 12 samples of a head. CUDA events, median of
``--iters`` runs after ``--warmup``; peak memory is the forward + backward's, above the inputs.
Prints a markdown table, the command and the device.

    python benchmarks/bench_msda.py                   # CUDA: fp32 and bf16
    python benchmarks/bench_msda.py --sweep           # CUDA: also try block sizes and warps
    python benchmarks/bench_msda.py --interpret       # CPU, tiny size, Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from m2f_lite.modeling.ms_deform_attn import ms_deform_attn_reference
from m2f_lite.modeling.ms_deform_attn_triton import (
    KernelConfig,
    ms_deform_attn_triton,
    triton_available,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL = {
    "batch": 2,
    "levels": [(32, 32), (64, 64), (128, 128)],
    "heads": 8,
    "dim": 32,
    "points": 4,
}
TINY = {"batch": 1, "levels": [(4, 4), (2, 2)], "heads": 2, "dim": 8, "points": 2}
TENSORS = ("value", "sampling_locations", "attention_weights")  # the inputs that get gradients


def make_inputs(size: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """value ``[B, S, M, D]``, locations ``[B, Lq, M, L, P, 2]``, weights ``[B, Lq, M, L, P]``, Lq = S."""
    gen = torch.Generator().manual_seed(seed)
    B, M, D, P = size["batch"], size["heads"], size["dim"], size["points"]
    shapes = size["levels"]
    L = len(shapes)
    centres = []  # each query's own pixel centre, in [0, 1]: the encoder's reference points
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        centres.append(torch.stack([xs, ys], dim=-1).reshape(h * w, 2))  # [HW, 2]
    S = sum(h * w for h, w in shapes)
    ref = torch.cat(centres)[None, :, None, None, None, :]  # [1, S, 1, 1, 1, 2]
    level_size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # [L, 2]
    offsets = torch.randn(B, S, M, L, P, 2, generator=gen) * 2.0  # pixels of each level
    locations = ref + offsets / level_size[None, None, None, :, None, :]  # [B, S, M, L, P, 2]
    weights = torch.randn(B, S, M, L * P, generator=gen).softmax(-1).view(B, S, M, L, P)
    value = torch.randn(B, S, M, D, generator=gen)
    tensors = {"value": value, "sampling_locations": locations, "attention_weights": weights}
    out = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    out["spatial_shapes"] = list(shapes)  # a list, as the pixel decoder passes it
    return out


def _call(fn: Callable, inputs: dict, **kwargs) -> torch.Tensor:
    return fn(
        inputs["value"], inputs["spatial_shapes"], inputs["sampling_locations"],
        inputs["attention_weights"], **kwargs,
    )  # fmt: skip


def median_ms(step: Callable[[], None], *, cuda: bool, warmup: int, iters: int) -> float:
    """Median time of ``step`` in milliseconds: CUDA events on the GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(fn: Callable, inputs: dict, *, cuda: bool, warmup: int, iters: int, **kwargs) -> dict:
    """Forward time, forward + backward time and the forward + backward's peak memory."""

    def forward() -> None:
        with torch.no_grad():
            _call(fn, inputs, **kwargs)

    leaves = [inputs[k].requires_grad_() for k in TENSORS]
    grad_out = torch.randn_like(_call(fn, inputs, **kwargs).detach())

    def forward_backward() -> None:
        _call(fn, inputs, **kwargs).backward(grad_out)
        for t in leaves:
            t.grad = None

    result = {
        "forward": median_ms(forward, cuda=cuda, warmup=warmup, iters=iters),
        "forward_backward": median_ms(forward_backward, cuda=cuda, warmup=warmup, iters=iters),
        "peak_mib": float("nan"),
    }
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.requires_grad_(False)
    return result


def max_difference(inputs: dict) -> float:
    """Largest |triton - reference| of the forward, the reference computed in fp32."""
    with torch.no_grad():
        fast = _call(ms_deform_attn_triton, inputs).float()
        as_fp32 = {**inputs, **{k: inputs[k].float() for k in TENSORS}}
        return (fast - _call(ms_deform_attn_reference, as_fp32)).abs().max().item()


def sweep(inputs: dict, **timing) -> list[str]:
    """Forward then backward launch parameters, each chosen by its time: markdown rows."""
    rows, best_forward = [], None
    for block_q in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            config = KernelConfig(block_q_forward=block_q, warps_forward=warps)
            t = measure(ms_deform_attn_triton, inputs, config=config, **timing)
            rows.append(f"| forward | {block_q} | {warps} | {t['forward']:.3f} |")
            if best_forward is None or t["forward"] < best_forward[0]:
                best_forward = (t["forward"], block_q, warps)
    for block_q in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            config = KernelConfig(
                block_q_forward=best_forward[1], warps_forward=best_forward[2],
                block_q_backward=block_q, warps_backward=warps,
            )  # fmt: skip
            t = measure(ms_deform_attn_triton, inputs, config=config, **timing)
            rows.append(
                f"| forward + backward | {block_q} | {warps} | {t['forward_backward']:.3f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=OFFICIAL["batch"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time block sizes and warps too")
    parser.add_argument(
        "--interpret", action="store_true",
        help="run a tiny size on the CPU through Triton's interpreter (shows it runs; times mean nothing)",
    )  # fmt: skip
    args = parser.parse_args()

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are called
        size, device, device_name = TINY, "cpu", f"CPU ({platform.machine()}), Triton interpreter"
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
    elif torch.cuda.is_available():
        size, device, device_name = (
            dict(OFFICIAL, batch=args.batch),
            "cuda",
            torch.cuda.get_device_name(),
        )
    else:
        sys.exit(
            "bench_msda.py: no CUDA device here; the kernels need one (or run with --interpret)"
        )
    if not triton_available(device):
        sys.exit(f"bench_msda.py: Triton cannot run on {device} here (is triton installed?)")
    timing = {"cuda": device == "cuda", "warmup": args.warmup, "iters": args.iters}

    import triton

    S = sum(h * w for h, w in size["levels"])
    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}")
    print(
        f"size: B={size['batch']}, levels={size['levels']}, Lq=S={S}, heads={size['heads']}, "
        f"D={size['dim']}, P={size['points']}; median of {args.iters} after {args.warmup} warm-up\n"
    )
    print("| dtype | path | forward ms | fwd+bwd ms | peak MiB (fwd+bwd) | speed-up fwd | speed-up fwd+bwd | max abs diff |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.dtypes:
        inputs = make_inputs(size, DTYPES[name], device)
        diff = max_difference(inputs)
        ref = measure(ms_deform_attn_reference, inputs, **timing)
        fast = measure(ms_deform_attn_triton, inputs, **timing)
        for path, t in (("grid_sample reference", ref), ("Triton", fast)):
            peak = f"{t['peak_mib']:.0f}" if timing["cuda"] else "—"
            shown_diff = f"{diff:.2e}" if path == "Triton" else "—"
            print(
                f"| {name} | {path} | {t['forward']:.3f} | {t['forward_backward']:.3f} | {peak} | "
                f"{ref['forward'] / t['forward']:.2f}× | "
                f"{ref['forward_backward'] / t['forward_backward']:.2f}× | {shown_diff} |"
            )
    if args.sweep:
        print(f"\nlaunch parameters ({args.dtypes[0]}; backward timed with the best forward):\n")
        print("| kernels timed | BLOCK_Q | warps | ms |\n| --- | ---: | ---: | ---: |")
        print("\n".join(sweep(make_inputs(size, DTYPES[args.dtypes[0]], device), **timing)))


if __name__ == "__main__":
    main()
