"""Helpers for the engine tests: a tiny shapes dataset and a tiny config that trains in seconds.

Not a test module (pytest collects ``test_*.py`` only); the engine, resume, DDP, predictor and CLI
tests import it (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

from m2f_lite.config import Config, get_config

TINY = [
    "device=cpu",  # the same numbers on a GPU workstation as in CI
    "model.hidden_dim=32",
    "model.nheads=2",
    "model.dim_feedforward=64",
    "model.num_queries=8",
    "model.dec_layers=2",
    "model.conv_dim=32",
    "model.mask_dim=32",
    "model.enc_layers=1",
    "model.enc_nheads=2",
    "model.enc_dim_feedforward=64",
    "loss.num_points=256",
    "data.image_size=64",
    "data.min_size_test=64",
    "data.max_size_test=64",
    "data.num_workers=0",
    "solver.ims_per_batch=2",
    "solver.max_iter=4",
    "solver.warmup_iters=0",
    "solver.checkpoint_period=2",
    "solver.eval_period=0",
    "solver.log_period=1",
]


def make_shapes(root: Path, *, n_train: int = 8, n_val: int = 3, size: int = 64) -> Path:
    """A small synthetic shapes dataset under ``root`` (made once per folder)."""
    from m2f_lite.data import synthetic

    if not (root / "panoptic_val.json").exists():
        synthetic.generate(root, n_train=n_train, n_val=n_val, size=size, seed=0)
    return root


def tiny_config(data_root: Path, output_dir: Path, *overrides: str) -> Config:
    """``shapes_tiny`` shrunk to seconds on a CPU, on ``data_root``, writing into ``output_dir``."""
    return get_config(
        "shapes_tiny",
        [*TINY, f"data.root={data_root}", f"output_dir={output_dir}", *overrides],
    )


def tiny_args(data_root: Path, output_dir: Path, *overrides: str) -> list[str]:
    """The same as command-line overrides for ``m2f-lite train shapes_tiny``."""
    return [
        f"--{o}" for o in (*TINY, f"data.root={data_root}", f"output_dir={output_dir}", *overrides)
    ]


# a 64-wide head (every module kept, fewer channels): the export and HF round-trip tests
NARROW_HEAD = [
    "model.hidden_dim=64",
    "model.conv_dim=64",
    "model.mask_dim=64",
    "model.nheads=4",
    "model.enc_nheads=4",
    "model.dim_feedforward=128",
    "model.enc_dim_feedforward=128",
]
