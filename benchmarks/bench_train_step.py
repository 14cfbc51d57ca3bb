"""Seconds per training step of a shapes recipe on the CPU: the real loader, model, criterion,
clipping and AdamW of `m2f-lite train`, the median over `--steps` steps after 3 warm-up steps.

    python benchmarks/bench_train_step.py shapes_book --threads 2
    python benchmarks/bench_train_step.py shapes_tiny --threads 1 --profile   # + torch.profiler table
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch starts OpenMP (see m2f_lite.cli)

import numpy as np
import torch

from m2f_lite.config import get_config
from m2f_lite.criterion import build_criterion, pad_target_masks
from m2f_lite.data.build import build_dataset, collate
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.optim import build_optimizer
from m2f_lite.sampler import build_train_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", nargs="?", default="shapes_book")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--root", default="data/shapes", help="the shapes data (make data/shapes)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_config(args.preset, [f"data.root={args.root}", *args.overrides])
    torch.manual_seed(0)
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = build_optimizer(cfg, model)
    dataset = build_dataset(cfg, cfg.data.train_split, train=True)
    loader = iter(
        build_train_loader(dataset, global_batch=cfg.solver.ims_per_batch, collate_fn=collate)
    )

    def step() -> float:
        start = time.perf_counter()
        images, targets = next(loader)
        targets = [{k: t[k] for k in ("labels", "masks")} for t in targets]
        outputs = model(images)
        loss = criterion.total(
            criterion(outputs, pad_target_masks(targets, outputs["padded_size"]))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_value)
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(3):
        step()
    seconds = float(np.median([step() for _ in range(args.steps)]))
    print(f"{args.preset}, {args.threads} threads: {seconds:.3f} s/step ({1 / seconds:.2f} it/s)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
