"""What a training run leaves to read: ``log.jsonl`` and the ``loss.png`` drawn from it.

One JSON object per line: a training record every ``solver.log_period`` steps (``iteration``,
``loss`` (the weighted total), ``loss_ce``, ``loss_mask``, ``loss_dice`` (the final prediction's
unweighted terms), ``lr``, ``time`` and ``data_time`` (seconds per step), ``grad_norm``,
``memory_mb``, ``skipped``), each averaged over the period; and an evaluation record after each
evaluation (``iteration``, ``eval``: PQ/AP/mIoU, ``metrics``: everything the evaluators returned).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from m2f_lite.atomic_io import atomic_write_text


def headline(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """PQ, AP and mIoU (the paper's three numbers) of an evaluation, those present."""
    keys = (("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU"))
    return {name: metrics[task][name] for task, name in keys if name in metrics.get(task, {})}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated on a GPU, else resident in this process (``ru_maxrss`` is
    KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


class TrainLog:
    """Append-only ``log.jsonl`` in ``output_dir``; a no-op when ``enabled`` is False (rank > 0).

    ``resume_from``: the iteration a resumed run starts at; records of later iterations (written
    before the interruption, and about to be redone) are dropped. ``None``: a fresh run, fresh log.
    """

    def __init__(self, output_dir: Path, *, enabled: bool, resume_from: int | None) -> None:
        self.path, self.enabled = Path(output_dir) / "log.jsonl", enabled
        if not enabled or not self.path.exists():
            return
        if resume_from is None:
            self.path.unlink()
        else:
            kept = [r for r in self.records() if r["iteration"] <= resume_from]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self, png: Path) -> None:
        """Training loss and, on a second axis, the evaluation metrics (%), to ``png``."""
        if not self.enabled:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

        records = self.records()
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        fig = Figure(figsize=(7, 3.5), facecolor="white")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], color="tab:blue")
        ax.set(xlabel="iteration", ylabel="training loss (weighted total)")
        if evals:
            ax2 = ax.twinx()
            for key, color in (("PQ", "tab:red"), ("AP", "tab:green"), ("mIoU", "tab:orange")):
                points = [(r["iteration"], r["eval"][key]) for r in evals if key in r["eval"]]
                if points:
                    ax2.plot(*zip(*points), "o-", color=color, label=key)
            ax2.set_ylabel("metric (%)")
            ax2.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
