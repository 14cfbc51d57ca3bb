"""Model speed and memory: m2f_lite vs HF transformers' Mask2Former, same config and weights, one run.

A random-init HF ``Mask2FormerForUniversalSegmentation`` (the R50 COCO-panoptic shape by default:
133 classes, 100 queries, 6 encoder and 9 decoder layers; ``--tiny`` for a tiny one) is converted
with ``m2f_lite.weights.transformers.from_transformers``; both models then see the same images (HF the
normalised pixels, m2f_lite the 0..255 images, which it normalises itself) and, for training, the
same targets. The models alternate call by call (a busy machine slows both alike); each figure is
the median of ``--runs`` calls after ``--warmup`` calls.

* forward: eval mode, batch 1, under ``torch.inference_mode``; m2f_lite with every output HF
  computes (``aux_outputs`` included) and with the final prediction only (``aux=False``, what
  inference reads);
* training step, batch 2: forward + loss + backward + AdamW (lr 1e-4, weight decay 0.05, the same
  optimiser for both). HF computes its loss inside its forward (``mask_labels``,
  ``class_labels``), m2f_lite's comes from ``build_criterion``; both sample 12544 points. Both
  backbones keep BatchNorm frozen, as the official recipe (HF's BN layers in eval mode, their
  affine parameters not trained);
* msda (CPU): the deformable-attention core alone, forward + backward, the gather path against
  the grid_sample reference, at the pixel decoder's size;
* memory: the peak memory of a training step above the resting state (weights, gradients,
  optimiser state): on the CPU the peak resident set of a fresh subprocess per model
  (``getrusage``), on CUDA ``torch.cuda.max_memory_allocated``.

On CUDA (the default device when a GPU is present) the suite is: forward latency at batch 1 and
training throughput (img/s) and peak memory at batch 2 and 8, each in fp32 and under bf16
autocast, at 1024²; then the step time of the official recipe (``coco_panoptic_r50``: R50, 1024²,
batch 2 per GPU, bf16, 100 queries; m2f_lite alone). Prints markdown tables, the command and the
machine; ``--out FILE`` appends them to FILE too.

    python benchmarks/bench_model.py                       # CPU: R50, 512², every part
    python benchmarks/bench_model.py --tiny --size 256     # the tiny config
    python benchmarks/bench_model.py --what forward --threads 1 --runs 10
    python benchmarks/bench_model.py --what forward --compile   # m2f_lite under torch.compile too
    python benchmarks/bench_model.py --device cuda         # the GPU suite
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

from m2f_lite.config import IMAGENET_MEAN, IMAGENET_STD, get_config
from m2f_lite.criterion import build_criterion
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.modeling.pixel_decoder import encoder_reference_points
from m2f_lite.weights.transformers import from_transformers

STAGES = ["stage1", "stage2", "stage3", "stage4"]
OURS, HF = "m2f_lite", "HF transformers"
Step = Callable[[], object]


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
    backbone = ResNetConfig(embedding_size=64, depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 96, 128], layer_type="bottleneck", out_features=STAGES)  # fmt: skip
    head = dict(num_labels=7, num_queries=20, feature_size=64, mask_feature_size=64, hidden_dim=64)
    layers = dict(encoder_layers=2, decoder_layers=4, num_attention_heads=4)
    return Mask2FormerConfig(backbone_config=backbone, **head, **layers, encoder_feedforward_dim=128, dim_feedforward=128)  # fmt: skip


def make_models(tiny: bool, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """HF's model and its m2f_lite conversion, both in eval mode on ``device``."""
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(hf_config(tiny)).eval()
    ours = from_transformers(hf).eval()
    return hf.to(device), ours.to(device)


def make_batch(batch: int, size: int, num_classes: int, device: str, seed: int = 0) -> dict:
    """Images (0..255, and normalised for HF) and targets: 8 random rectangles per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    targets = []
    for _ in range(batch):
        masks = torch.zeros(8, size, size, dtype=torch.bool)
        corners = torch.randint(0, size // 2, (8, 2), generator=g).tolist()
        sides = torch.randint(size // 16, size // 2, (8, 2), generator=g).tolist()
        for mask, (y, x), (dy, dx) in zip(masks, corners, sides):
            mask[y : y + dy, x : x + dx] = True
        labels = torch.randint(0, num_classes, (8,), generator=g)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    pixel_values = ((images - mean) / std).to(device)
    return {"images": images.to(device), "pixel_values": pixel_values, "targets": targets}


def forward_steps(hf, ours, data: dict, compiled=None) -> dict[str, Step]:
    """Eval forward passes (call them under ``torch.inference_mode``)."""
    images = data["images"]
    steps = {OURS: lambda: ours(images)}
    if "aux" in inspect.signature(ours.forward).parameters:  # not in versions before the option
        steps[f"{OURS}, final prediction only"] = lambda: ours(images, aux=False)
    if compiled is not None:
        steps[f"{OURS}, torch.compile"] = lambda: compiled(images)
    steps[HF] = lambda: hf(pixel_values=data["pixel_values"])
    return steps


def train_steps(hf, ours, data: dict, dtype: torch.dtype | None) -> dict[str, Step]:
    """One training step of each model: forward + loss + backward + AdamW, under autocast if ``dtype``."""
    hf.train()
    for module in hf.model.pixel_level_module.encoder.modules():  # frozen BatchNorm, as ours
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval().requires_grad_(False)
    ours.train()
    cfg = get_config("coco_panoptic_r50")  # the official loss settings
    cfg.model.num_classes = hf.config.num_labels
    criterion = build_criterion(cfg).to(data["images"].device)
    autocast = {"device_type": data["images"].device.type, "dtype": dtype, "enabled": dtype is not None}  # fmt: skip
    mask_labels = [t["masks"].float() for t in data["targets"]]
    class_labels = [t["labels"] for t in data["targets"]]

    def step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Step:
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

        def run() -> torch.Tensor:
            with torch.autocast(**autocast):
                loss = loss_fn()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            return loss.detach()

        return run

    def loss_ours() -> torch.Tensor:
        return criterion.total(criterion(ours(data["images"]), data["targets"]))

    def loss_hf() -> torch.Tensor:
        pv = data["pixel_values"]
        return hf(pixel_values=pv, mask_labels=mask_labels, class_labels=class_labels).loss

    return {OURS: step(ours, loss_ours), HF: step(hf, loss_hf)}


def timed(fns: dict[str, Step], runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of ``runs`` calls of each function after ``warmup`` calls, interleaved."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def cuda_step_memory(fn: Step) -> float:
    """MiB that one call of ``fn`` allocates above what was allocated before it (CUDA)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` size in MiB: ``VmRSS`` (resident now), ``VmHWM`` (its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def child_memory(args: argparse.Namespace) -> None:
    """``--child-memory NAME``: the peak RSS of one model's second training step above the RSS
    before it (gradients and optimiser state exist by then). The peak is reset before the step
    (``/proc/self/clear_refs``); both models are built in both children, so both start alike."""
    hf, ours = make_models(args.tiny, "cpu")
    step = train_steps(hf, ours, make_batch(2, args.size, hf.config.num_labels, "cpu"), None)
    step = step[args.child_memory]
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": status_mib("VmHWM") - before}))


def cpu_memory(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for name in (OURS, HF):
        cmd = [sys.executable, __file__, "--child-memory", name, "--size", str(args.size)]
        cmd += ["--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def msda_steps(size: int, batch: int = 2) -> dict[str, Step]:
    """Forward + backward of the MSDA core, reference (grid_sample) and gather path, at the pixel
    decoder's size for a ``size``² image: levels at strides 32, 16, 8, every pixel a query, the
    official encoder's sampling pattern (own pixel centre + a few pixels' offsets)."""
    from m2f_lite.modeling.ms_deform_attn import ms_deform_attn_gather, ms_deform_attn_reference

    g = torch.Generator().manual_seed(0)
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    S, M, D, L, P = sum(h * w for h, w in shapes), 8, 32, 3, 4
    reference_points = encoder_reference_points(shapes, batch, "cpu")  # [B, S, L, 2]
    scale = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None]  # [L, 1, 2]
    offsets = torch.randn(batch, S, M, L, P, 2, generator=g) * 2 / scale
    inputs = [
        torch.randn(batch, S, M, D, generator=g),
        reference_points[:, :, None, :, None] + offsets,
        torch.randn(batch, S, M, L * P, generator=g).softmax(-1).view(batch, S, M, L, P),
    ]
    grad = torch.randn(batch, S, M * D, generator=g)

    def run(fn: Callable) -> Step:
        def step() -> None:
            args = [t.detach().requires_grad_(True) for t in inputs]
            fn(args[0], shapes, *args[1:]).backward(grad)

        return step

    return {"gather (CPU fast path)": run(ms_deform_attn_gather), "grid_sample reference": run(ms_deform_attn_reference)}  # fmt: skip


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines += ["| --- |" + " ---: |" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def latency(title: str, times: dict[str, list[float]]) -> str:
    ref = statistics.median(times[HF])
    rows = [
        [name, f"{statistics.median(t):.1f}", f"{min(t):.1f}", f"{statistics.median(t) / ref:.2f}"]
        for name, t in times.items()
    ]
    return table(title, ["model", "median ms", "min ms", "× HF"], rows)


def machine(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    load = os.getloadavg()[0]
    return (
        f"{name or platform.machine()}, {platform.platform()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"{torch.get_num_threads()} threads on {os.cpu_count()} cores, load average {load:.1f}"
    )


def run_cpu(args: argparse.Namespace) -> list[str]:
    hf, ours = make_models(args.tiny, "cpu")
    name, size, parts = "tiny" if args.tiny else "R50", args.size, []
    if "forward" in args.what:
        data = make_batch(1, size, hf.config.num_labels, "cpu")
        compiled = None
        with torch.inference_mode():
            if args.compile:
                compiled, start = torch.compile(ours), time.perf_counter()
                compiled(data["images"])
                parts.append(f"torch.compile: compilation + first call {time.perf_counter() - start:.0f} s")  # fmt: skip
            diff = hf(pixel_values=data["pixel_values"]).masks_queries_logits - ours(data["images"])["pred_masks"]  # fmt: skip
            times = timed(forward_steps(hf, ours, data, compiled), args.runs, args.warmup)
        parts.append(latency(f"Forward, {name}, 1x3x{size}x{size}, CPU, eval, fp32", times))
        parts.append(f"max |pred_masks difference| m2f_lite vs HF: {diff.abs().max():.2e}")
    if "train" in args.what:
        steps = train_steps(hf, ours, make_batch(2, size, hf.config.num_labels, "cpu"), None)
        times = timed(steps, args.runs, args.warmup)
        parts.append(latency(f"Training step, {name}, 2x3x{size}x{size}, CPU, fp32", times))
    if "msda" in args.what:
        times = timed(msda_steps(size), args.runs, args.warmup)
        ref = statistics.median(times["grid_sample reference"])
        rows = [[k, f"{statistics.median(t):.1f}", f"{ref / statistics.median(t):.2f}"] for k, t in times.items()]  # fmt: skip
        title = f"MSDA core, forward + backward, batch 2, levels of a {size}² image, CPU, fp32"
        parts.append(table(title, ["implementation", "median ms", "speed-up"], rows))
    if "memory" in args.what:
        mem = cpu_memory(args)
        rows = [[k, f"{v:.0f}", f"{v / mem[HF]:.2f}"] for k, v in mem.items()]
        title = f"Training step, peak RSS above rest, {name}, 2x3x{size}x{size}, CPU"
        parts.append(table(title, ["model", "MiB", "× HF"], rows))
    return parts


def run_gpu(args: argparse.Namespace) -> list[str]:
    hf, ours = make_models(args.tiny, "cuda")
    size, parts, rows = args.size, [], []
    dtypes = (("fp32", None), ("bf16", torch.bfloat16))
    data = make_batch(1, size, hf.config.num_labels, "cuda")
    for label, dtype in dtypes:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            times = timed(forward_steps(hf, ours, data), args.runs, args.warmup)
        parts.append(latency(f"Forward, 1x3x{size}x{size}, {label}, eval", times))
    for label, dtype in dtypes:
        for batch in args.gpu_batches:
            steps = train_steps(hf, ours, make_batch(batch, size, hf.config.num_labels, "cuda"), dtype)  # fmt: skip
            try:
                times = timed(steps, args.runs, args.warmup)
                mem = {k: cuda_step_memory(fn) for k, fn in steps.items()}
            except torch.cuda.OutOfMemoryError:
                rows.append([label, str(batch), "out of memory"] + [""] * 5)
                continue
            finally:
                del steps
                gc.collect()
                torch.cuda.empty_cache()
            ips = {k: batch * 1e3 / statistics.median(t) for k, t in times.items()}
            rows.append([label, str(batch), f"{ips[OURS]:.2f}", f"{ips[HF]:.2f}", f"{ips[OURS] / ips[HF]:.2f}",
                         f"{mem[OURS]:.0f}", f"{mem[HF]:.0f}", f"{mem[OURS] / mem[HF]:.2f}"])  # fmt: skip
    header = ["dtype", "batch", "ours img/s", "HF img/s", "speed × HF", "ours MiB", "HF MiB", "memory × HF"]  # fmt: skip
    parts.append(table(f"Training throughput, peak memory above rest, {size}²", header, rows))
    return [*parts, official_recipe(args)]


def official_recipe(args: argparse.Namespace) -> str:
    """Step time of ``coco_panoptic_r50`` (m2f_lite alone): R50, 1024², batch 2, bf16, 100 queries."""
    cfg = get_config("coco_panoptic_r50")
    model = build_model(cfg).cuda().train()
    criterion = build_criterion(cfg).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.solver.base_lr, weight_decay=0.05)
    data = make_batch(2, cfg.data.image_size, cfg.model.num_classes, "cuda", seed=1)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion.total(criterion(model(data["images"]), data["targets"]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    ms = statistics.median(timed({"step": step}, args.runs, args.warmup)["step"])
    rows = [[f"{ms:.1f}", f"{2e3 / ms:.2f}", f"{cuda_step_memory(step):.0f}"]]
    title = f"Official recipe coco_panoptic_r50 (m2f_lite), 2x3x{cfg.data.image_size}², bf16"
    return table(title, ["ms / step", "img/s", "peak MiB above rest"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny config instead of R50")
    parser.add_argument("--size", type=int, default=0, help="square side (512 CPU, 1024 GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--what", default="forward,train,msda,memory", help="CPU parts to run")
    parser.add_argument("--gpu-batches", type=lambda s: [int(b) for b in s.split(",")], default=[2, 8])  # fmt: skip
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(m2f_lite)")
    parser.add_argument("--out", help="append the tables to this markdown file")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.size = args.size or (1024 if args.device == "cuda" else 512)
    if args.child_memory:
        return child_memory(args)
    parts = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    parts.append(f"command: `python {' '.join(sys.argv)}`  \nmachine: {machine(args.device)}")
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
