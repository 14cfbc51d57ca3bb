"""Checkpoints: written atomically, verified on load, loaded with ``weights_only=True``.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain Python values only, so
that ``torch.load(weights_only=True)`` reads it (no pickled code can run):

- ``model``: the state dict (without DDP's ``module.`` prefix); ``config``: ``Config.to_dict()``;
- training checkpoints add ``iteration`` (optimizer steps done), ``optimizer``, ``scheduler``,
  ``scaler``, ``rng`` (one entry per process: python, numpy, torch, cuda generator states as
  tensors and ints), ``sampler`` (the data stream position) and ``meta`` (the dataset's class
  names, thing flags, category ids and colours, for ``predict``). ``m2f-lite convert`` writes
  the first two only.

Writing (:func:`atomic_save`): to a temporary file in the same folder, ``fsync``, then
``os.replace`` over the target and ``fsync`` of the folder, so a crash (or ``kill -9``) leaves
either the old file or the new one, never half of one. Reading (:func:`load_checkpoint`): the file
is a zip archive whose every record carries a CRC-32; ``zipfile.testzip`` re-reads them all, so a
truncated file (no central directory) or a flipped byte is reported before ``torch.load``, which
would otherwise load corrupt tensor bytes silently. Then the required keys are checked.

Resuming (:func:`check_resume_config`) refuses a config that differs from the checkpoint's, except
for :data:`RESUME_SAFE_KEYS`: fields that change where files go, how often to log, evaluate or
save, how many loader workers to use, the device, or how long to train. ``solver.max_iter`` is
among them so that a run can be extended; with ``lr_scheduler="poly"`` (whose curve depends on
``max_iter``) the resumed run then follows the new schedule from the resumed iteration on.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m2f_lite.atomic_io import atomic_file
from m2f_lite.config import Config, config_diff, config_from_dict

RESUME_SAFE_KEYS = (
    "name",
    "output_dir",
    "device",
    "weights",
    "data.root",
    "data.num_workers",
    "solver.max_iter",
    "solver.checkpoint_period",
    "solver.eval_period",
    "solver.log_period",
    "solver.nonfinite_loss",
)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit: the message names the file."""


# ----------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temporary file, ``fsync``, ``os.replace``."""
    path = Path(path)
    with atomic_file(path) as f:
        torch.save(obj, f)
    return path


def verify_file(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete ``torch.save`` archive whose records match their CRC-32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint (not a complete torch.save archive: {e})"
        ) from e
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC-32 mismatch in record {bad!r})")


def read_checkpoint_file(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> Any:
    """``verify_file`` then ``torch.load(weights_only=True)``: whatever object the file holds."""
    path = Path(path)
    if verify:
        verify_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such checkpoint file") from e
    except Exception as e:
        from m2f_lite.weights.unpickler import _one_line  # torch's refusals run to many lines

        raise CheckpointError(f"{path}: {_one_line(e)}") from e


def is_model_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is an m2f_lite checkpoint (a dict with ``model`` and ``config``)."""
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or ``m2f-lite convert``).

    Verifies the archive (``verify_file``), loads it with ``weights_only=True`` and checks that it
    holds ``model`` and ``config``. Raises :class:`CheckpointError` naming the file otherwise.
    """
    state = read_checkpoint_file(path, map_location=map_location, verify=verify)
    if not is_model_checkpoint(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: not an m2f_lite checkpoint (expected keys 'model' and 'config', found {keys}); "
            "official .pkl/.pth files go through `m2f-lite convert` first"
        )
    return state


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> Config:
    """The ``Config`` stored in a checkpoint."""
    try:
        return config_from_dict(state["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its config does not fit this version ({e})") from e


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """``model.load_state_dict`` (strict) with every missing, unexpected or mis-shaped key named."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    for what, keys in (("shape mismatch", mismatched), ("missing", missing)):
        if keys:
            problems.append(
                f"{len(keys)} {what}: " + "; ".join(keys[:10]) + (" ..." * (len(keys) > 10))
            )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: " + "; ".join(unexpected[:10]))
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
    model.load_state_dict(state_dict)


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Initial weights (``cfg.weights``): an m2f_lite checkpoint loads the whole model (returns
    ``"model"``); anything else goes to the backbone (ImageNet ``.pth``/``.safetensors``,
    detectron2 ``R-50.pkl``: ``load_pretrained_backbone``; returns ``"backbone"``)."""
    from m2f_lite.weights.backbone import load_pretrained_backbone

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights {str(path)!r}: no such file")
    if zipfile.is_zipfile(path):  # torch.save's format: ours, or a timm/torchvision state dict
        state = read_checkpoint_file(path)
        if is_model_checkpoint(state):
            load_model_state(model, state["model"], source=str(path))
            return "model"
    load_pretrained_backbone(model.backbone, str(path))
    return "backbone"


# ----------------------------------------------------------------------------------------------
# Random number generators, as tensors and ints (weights_only=True can read them)
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and cuda) global generator states, in loadable plain types."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global RNG)
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (the global RNG)
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (or ``torch.compile``), whose state dict has no ``module.`` prefix."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    config: Config,
    iteration: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    sampler: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to continue training (or, with only model and config, to predict)."""
    state: dict[str, Any] = {"model": unwrap(model).state_dict(), "config": config.to_dict()}
    if iteration is not None:
        state["iteration"] = int(iteration)
        state["rng"] = rng_state()
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    if sampler is not None:
        state["sampler"] = dict(sampler)
    state.update(extra or {})
    return atomic_save(state, path)


def check_resume_config(saved: Config, current: Config, *, path: str | os.PathLike) -> list[str]:
    """Refuse to resume with a config that differs in more than :data:`RESUME_SAFE_KEYS`.

    Returns the lines of allowed differences (for a log message); raises :class:`CheckpointError`
    with the full diff (``config_diff``) otherwise.
    """
    lines = config_diff(saved, current)
    unsafe = [line for line in lines if line.split(":", 1)[0] not in RESUME_SAFE_KEYS]
    if unsafe:
        raise CheckpointError(
            f"{path}: refusing to resume, the config differs from the checkpoint's "
            f"(checkpoint -> now):\n  " + "\n  ".join(unsafe) + "\n"
            "Resume with the same preset and overrides, or start a new run in another output_dir. "
            f"Fields that may change on resume: {', '.join(RESUME_SAFE_KEYS)}."
        )
    return lines


def checkpoint_name(iteration: int) -> str:
    """``model_0000500.pt``: the periodic checkpoint after ``iteration`` optimizer steps."""
    return f"model_{iteration:07d}.pt"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``output_dir``: ``model_final.pt`` if present, else the periodic
    ``model_NNNNNNN.pt`` with the largest iteration; ``None`` when there is none."""
    folder = Path(output_dir)
    if (folder / "model_final.pt").is_file():
        return folder / "model_final.pt"
    periodic = sorted(p for p in folder.glob("model_*.pt") if p.stem[len("model_") :].isdigit())
    return periodic[-1] if periodic else None
