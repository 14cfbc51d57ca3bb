"""The paper's ablations in miniature, on the shapes dataset: each variant, several seeds, one file.

Every run is ``m2f-lite train shapes_book`` (the book's recipe and budget) with one switch:

    variant                      overrides
    Mask2Former                  (none: the book's model, re-trained per seed)
    standard cross-attention     model.masked_attention=false        (paper Table 4a / Fig. 3)
    full-mask loss               loss.point_loss=false loss.point_matching=false   (Table 4c)
    10 queries                   model.num_queries=10                 (Table 4e: fewer queries)
    1 decoder layer              model.dec_layers=1                   (Table 4f: fewer layers)

Each run evaluates every ``--eval-period`` steps at the paper's test thresholds (object 0.8,
overlap 0.8), which gives the convergence curves (PQ against iterations). The results, with the
command, machine, commit and date, go to ``m2f_lite/assets/ablations.json`` (package data: chapter
10 plots it, also when opened alone on Colab). Runs resume where they stopped; ``--jobs 2`` runs two
at a time, with the CPU threads split between them (on a GPU, several small runs share it well).

    m2f-lite ablate                      # the full study: 5 variants x 3 seeds, the book's budget
    m2f-lite ablate --max-iter 20 --seeds 0 --variants "1 decoder layer" --out /tmp/a.json

The study at the book's budget takes about 12 hours on 2 CPU cores (15 runs of ~50 minutes) and
minutes on one GPU with ``--jobs 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from m2f_lite.atomic_io import atomic_write_text
from m2f_lite.book_model import PRESET, asset_dir, git_commit, machine_description

VARIANTS = {
    "Mask2Former": [],
    "standard cross-attention": ["model.masked_attention=false"],
    "full-mask loss": ["loss.point_loss=false", "loss.point_matching=false"],
    "10 queries": ["model.num_queries=10"],
    "1 decoder layer": ["model.dec_layers=1"],
}
METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
# what the paper found for each switch, against Mask2Former (its Sec. 4.3 ablations on COCO/ADE20K):
# +1 = the variant should score higher, -1 lower, 0 about the same
PAPER = {
    "standard cross-attention": (-1, "masked attention is better on all three tasks"),
    "full-mask loss": (0, "the point loss matches it, at a third of the training memory"),
    "10 queries": (-1, "100 queries are best; fewer lose quality"),
    "1 decoder layer": (-1, "more layers (three rounds over the scales) are better"),
}


def slug(label: str) -> str:
    return label.lower().replace(" ", "_").replace("-", "_")


def run_one(label: str, seed: int, args: argparse.Namespace, threads: int) -> dict:
    """Train (or resume) one variant and seed: its final metrics, curve and seconds per step."""
    out = Path(args.runs) / f"{slug(label)}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "m2f_lite.cli",
        "train",
        PRESET,
        "--resume",
        f"--output_dir={out}",
        f"--seed={seed}",
        f"--solver.max_iter={args.max_iter}",
        f"--solver.eval_period={args.eval_period}",
        f"--solver.checkpoint_period={args.eval_period}",
        *([f"--data.root={args.data_root}"] if args.data_root else []),
        *[f"--{o}" for o in VARIANTS[label]],
    ]
    if not (out / "model_final.pt").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        t0 = time.perf_counter()
        done = subprocess.run(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if done.returncode != 0:  # the run's own last line says why
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"{label}, seed {seed}: training failed ({why})")
        print(f"{label}, seed {seed}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x]
    evals = [r for r in records if r.get("metrics")]
    curve = [{"iteration": r["iteration"], **_headline(r["metrics"])} for r in evals]
    steps = [r for r in records if "time" in r]
    return {
        "seed": seed,
        **curve[-1],
        "curve": curve,
        "s_per_step": statistics.median(r["time"] for r in steps),
        "command": " ".join(["m2f-lite", *command[3:]]),
    }


def _headline(metrics: dict) -> dict:
    pan, segm, sem = metrics["panoptic_seg"], metrics["segm"], metrics["sem_seg"]
    values = {
        "PQ": pan["PQ"],
        "PQ_th": pan["PQ_th"],
        "PQ_st": pan["PQ_st"],
        "AP": segm["AP"],
        "mIoU": sem["mIoU"],
    }
    return {k: round(float(v), 3) for k, v in values.items()}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of each metric."""
    out = {}
    for k in METRICS:
        values = [r[k] for r in runs]
        out[k] = {
            "mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        }
    return out


def compare(study: dict, metric: str = "PQ") -> list[dict]:
    """Each variant against Mask2Former on ``metric``: the difference of the means, its standard
    error over the seeds, and whether the sign agrees with :data:`PAPER` (a difference within two
    standard errors counts as "about the same")."""
    base = study["variants"]["Mask2Former"]["runs"]
    rows = []
    for label, v in study["variants"].items():
        if label == "Mask2Former":
            continue
        a, b = [r[metric] for r in v["runs"]], [r[metric] for r in base]
        diff = statistics.fmean(a) - statistics.fmean(b)
        var = sum(statistics.variance(x) / len(x) for x in (a, b) if len(x) > 1)
        se = var**0.5
        sign = 0 if abs(diff) <= 2 * se else (1 if diff > 0 else -1)
        expected, claim = PAPER[label]
        rows.append(
            {
                "variant": label,
                "diff": diff,
                "se": se,
                "agrees": sign == expected,
                "paper": claim,
            }
        )
    return rows


def summary_figure(study: dict):
    """PQ, AP and mIoU of each variant: the mean over seeds, error bars of one standard deviation,
    the seeds as dots."""
    import matplotlib.pyplot as plt

    labels = list(study["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.5 * len(labels) + 1.6), sharey=True)
    for ax, metric in zip(axes, ("PQ", "AP", "mIoU")):
        for i, label in enumerate(labels):
            v = study["variants"][label]
            s = v["summary"][metric]
            color = "tab:blue" if label == "Mask2Former" else "tab:gray"
            ax.barh(i, s["mean"], xerr=s["std"], color=color, alpha=0.8, capsize=3)
            ax.plot([r[metric] for r in v["runs"]], [i] * len(v["runs"]), "k.", ms=4)
        ax.set_xlabel(f"{metric} (val, thresholds 0.8)")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    seeds = len(study["seeds"])
    fig.suptitle(f"{study['max_iter']} iterations each, mean ± std over {seeds} seeds (dots)")
    fig.tight_layout()
    return fig


def convergence_figure(study: dict, labels=("Mask2Former", "standard cross-attention")):
    """PQ against iterations (mean ± std over seeds) for the given variants: the paper's claim
    that masked attention converges faster."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label in labels:
        runs = study["variants"][label]["runs"]
        its = [c["iteration"] for c in runs[0]["curve"]]
        pq = np.array([[c["PQ"] for c in r["curve"]] for r in runs])  # [seeds, evaluations]
        mean, std = pq.mean(0), pq.std(0, ddof=1) if len(pq) > 1 else np.zeros(pq.shape[1])
        ax.plot(its, mean, marker="o", label=label)
        ax.fill_between(its, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("PQ (val)")
    ax.legend(frameon=False)
    ax.set_title("Convergence: masked vs standard cross-attention")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    from m2f_lite.config import get_config

    budget = get_config(PRESET).solver.max_iter
    p = argparse.ArgumentParser(prog="m2f-lite ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-iter", type=int, default=budget, help=f"default {budget} (the book's)")
    p.add_argument("--eval-period", type=int, default=None, help="default max_iter / 5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (threads split evenly)")
    p.add_argument("--runs", default="runs/ablations", help="folder of the training runs")
    p.add_argument("--data-root", default=None, help="the shapes data (default: the preset's)")
    p.add_argument("--out", default=str(asset_dir() / "ablations.json"), help="the results file")
    args = p.parse_args(argv)
    args.eval_period = args.eval_period or max(args.max_iter // 5, 1)
    threads = max((os.cpu_count() or 2) // args.jobs, 1)
    jobs = [(label, seed) for label in args.variants for seed in args.seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: run_one(*job, args, threads), jobs))
    variants = {}
    for (label, _), result in zip(jobs, done):
        variants.setdefault(label, {"overrides": VARIANTS[label], "runs": []})["runs"].append(
            result
        )
    for v in variants.values():
        v["summary"] = summarise(v["runs"])
    info = {
        "command": " ".join(["m2f-lite ablate", *(sys.argv[2:] if argv is None else argv)]),
        "preset": PRESET,
        "max_iter": args.max_iter,
        "book_budget": args.max_iter == budget,
        "seeds": args.seeds,
        "thresholds": {"object_mask_threshold": 0.8, "overlap_threshold": 0.8},
        "machine": machine_description(),
        "commit": git_commit(Path(__file__).resolve().parents[1]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hours": round((time.perf_counter() - t0) / 3600, 2),
        "variants": variants,
    }
    atomic_write_text(Path(args.out), json.dumps(info, indent=1) + "\n")
    for label, v in variants.items():
        s = v["summary"]
        print(
            f"{label:>26}: "
            + "  ".join(f"{k} {s[k]['mean']:.1f}±{s[k]['std']:.1f}" for k in METRICS)
        )


if __name__ == "__main__":
    main()
