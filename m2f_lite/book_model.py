"""The book's model: ``shapes_book`` trained once, shipped inside the package, loaded by every chapter.

Three files in ``m2f_lite/assets/`` (package data, so an installed package has them too):

- ``shapes_book.pt``: an ordinary m2f_lite checkpoint (``model``, ``config``, ``meta``; see
  :mod:`m2f_lite.checkpoint`) with the weights in half precision (the model computes in float32;
  loading casts them back). ``m2f-lite eval m2f_lite/assets/shapes_book.pt`` evaluates it.
- ``shapes_book.json``: the sidecar: the command that made it, the config it was trained with, the
  metrics the *shipped* weights score on the shapes val split at the paper's test thresholds,
  the training curve (each evaluation during training), the commit, the machine and the date.
- ``shapes_book_log.jsonl``: the training run's ``log.jsonl`` (losses and lr every 50 steps).

``make book-model`` retrains it from scratch: the data, ``m2f-lite train shapes_book``, then
``python -m m2f_lite.book_model runs/shapes_book``, which rounds the weights to half precision,
evaluates what will ship and writes the three files. ``tests/test_book_model.py`` checks that the
shipped file loads strictly into today's model, that its recorded config is today's preset, and
that evaluating it reproduces the recorded metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch

PRESET = "shapes_book"
# the data it was trained and is evaluated on: `m2f-lite data synthetic` with these arguments
DATA_ARGS = {"n_train": 500, "n_val": 100, "size": 128, "seed": 0}
RUN_DIR = "runs/shapes_book"
COMMAND = (
    f"m2f-lite data synthetic --out data/shapes --n-train {DATA_ARGS['n_train']} "
    f"--n-val {DATA_ARGS['n_val']} --size {DATA_ARGS['size']} --seed {DATA_ARGS['seed']} && "
    f"m2f-lite train {PRESET} --output_dir={RUN_DIR} && python -m m2f_lite.book_model {RUN_DIR}"
)
RETRAIN = "`make book-model` (about 50 minutes on 2 CPU cores), then commit m2f_lite/assets/"


def asset_dir() -> Path:
    """``m2f_lite/assets`` of the installed (or checked-out) package."""
    return Path(str(resources.files("m2f_lite") / "assets"))


def checkpoint_path() -> Path:
    return asset_dir() / f"{PRESET}.pt"


def sidecar() -> dict[str, Any]:
    """The recorded facts of the shipped model (``shapes_book.json``)."""
    return json.loads((asset_dir() / f"{PRESET}.json").read_text())


def training_log() -> list[dict[str, Any]]:
    """The training run's ``log.jsonl`` records (training and evaluation records, in order)."""
    text = (asset_dir() / f"{PRESET}_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load(device: str | torch.device = "cpu", *, data_root: str | os.PathLike | None = None):
    """The shipped model in eval mode on ``device``: ``(model, cfg, meta)``.

    ``cfg`` is the config it was trained with (``data.root`` replaced by ``data_root`` if given);
    ``meta`` the shapes dataset's ``DatasetMeta`` (class names, thing flags, colours).
    """
    from m2f_lite import checkpoint as ckpt
    from m2f_lite.config import apply_overrides
    from m2f_lite.data.meta import DatasetMeta
    from m2f_lite.modeling.mask2former import build_model

    path = checkpoint_path()
    state = ckpt.load_checkpoint(path)
    cfg = ckpt.checkpoint_config(state, path)
    if data_root is not None:
        cfg = apply_overrides(cfg, {"data.root": str(data_root)})
    model = build_model(cfg)
    ckpt.load_model_state(model, state["model"], source=str(path))  # strict; fp16 -> fp32
    return model.to(device).eval(), cfg, DatasetMeta(**state["meta"])


def half_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors rounded to float16 (what ships); integer buffers unchanged."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def git_commit(repo: Path) -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def write_assets(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Round ``run_dir/model_final.pt`` to half precision, evaluate it, write the three files."""
    from m2f_lite import checkpoint as ckpt
    from m2f_lite.atomic_io import atomic_write_text
    from m2f_lite.config import config_from_dict
    from m2f_lite.evaluation import evaluate
    from m2f_lite.modeling.mask2former import build_model
    from m2f_lite.train_log import headline

    run_dir, out = Path(run_dir), Path(out) if out else asset_dir()
    final = run_dir / "model_final.pt"
    state = ckpt.load_checkpoint(final)
    cfg = ckpt.checkpoint_config(state, final)
    if cfg.name != PRESET:
        raise ValueError(f"{final}: trained from preset {cfg.name!r}, expected {PRESET!r}")
    shipped = {
        "model": half_state(state["model"]),
        "config": state["config"],
        "meta": state["meta"],
    }
    model = build_model(config_from_dict(shipped["config"]))
    ckpt.load_model_state(model, shipped["model"], source=str(final))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test that reproduces it (the sums' order is then fixed)
    try:
        metrics = evaluate(cfg, model.eval(), progress=False)  # what ships is what is measured
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x]
    curve = [{"iteration": r["iteration"], **r["eval"]} for r in records if r.get("eval")]
    train_seconds = sum(r["time"] * cfg.solver.log_period for r in records if "time" in r)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_save(shipped, out / f"{PRESET}.pt")
    info = {
        "preset": PRESET,
        "command": COMMAND,
        "data": DATA_ARGS,
        "thresholds": {
            "object_mask_threshold": cfg.inference.object_mask_threshold,
            "overlap_threshold": cfg.inference.overlap_threshold,
        },
        "headline": {
            **headline(metrics),
            "PQ_th": metrics["panoptic_seg"]["PQ_th"],
            "PQ_st": metrics["panoptic_seg"]["PQ_st"],
        },
        "metrics": metrics,
        "curve": curve,
        "training": {
            "iterations": cfg.solver.max_iter,
            "minutes": round(train_seconds / 60, 1),
            "eval_seconds_shipped": round(time.perf_counter() - t0, 1),
        },
        "sha256": hashlib.sha256((out / f"{PRESET}.pt").read_bytes()).hexdigest(),
        "config": state["config"],
        "commit": git_commit(Path(__file__).resolve().parents[1]),
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    atomic_write_text(out / f"{PRESET}.json", json.dumps(info, indent=1, sort_keys=False) + "\n")
    atomic_write_text(out / f"{PRESET}_log.jsonl", (run_dir / "log.jsonl").read_text())
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m m2f_lite.book_model",
        description="Ship a trained shapes_book run as the book's model (m2f_lite/assets/).",
    )
    parser.add_argument("run_dir", help="the output_dir of `m2f-lite train shapes_book`")
    parser.add_argument("--out", default=None, help="folder to write (default: m2f_lite/assets)")
    args = parser.parse_args(argv)
    info = write_assets(args.run_dir, args.out)
    summary = ", ".join(f"{k} {v:.1f}" for k, v in info["headline"].items())
    print(f"wrote {info['preset']}.pt/.json/_log.jsonl: {summary}")


if __name__ == "__main__":
    main()
