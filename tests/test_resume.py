"""Resuming: bit-exact continuation, and a run killed with SIGKILL continues from its last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import make_shapes, tiny_args, tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite import engine


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(path)["model"]


def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(shapes, tmp_path):
    # Randomness everywhere: LSJ augmentation, importance-sampled points, trainable BatchNorm
    # statistics, the poly schedule; the resumed run must reproduce all of it.
    overrides = ("solver.max_iter=4", "solver.checkpoint_period=2")
    full = engine.train(tiny_config(shapes, tmp_path / "full", *overrides))
    assert full["iteration"] == 4

    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "model_0000002.pt", tmp_path / "cut" / "model_0000002.pt")
    resumed = engine.train(tiny_config(shapes, tmp_path / "cut", *overrides), resume=True)
    assert resumed["iteration"] == 4

    a, b = (
        _model_state(tmp_path / "full" / "model_final.pt"),
        _model_state(tmp_path / "cut" / "model_final.pt"),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_opt = ckpt.load_checkpoint(tmp_path / "full" / "model_final.pt")["optimizer"]
    cut_opt = ckpt.load_checkpoint(tmp_path / "cut" / "model_final.pt")["optimizer"]
    assert all(
        torch.equal(full_opt["state"][i]["exp_avg_sq"], cut_opt["state"][i]["exp_avg_sq"])
        for i in full_opt["state"]
    )
    # the resumed log holds the redone iterations once
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [3, 4]


def test_resume_without_a_checkpoint_starts_from_scratch(shapes, tmp_path):
    result = engine.train(tiny_config(shapes, tmp_path, "solver.max_iter=1"), resume=True)
    assert result["iteration"] == 1 and (tmp_path / "model_final.pt").is_file()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "m2f_lite.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def test_kill_9_loses_at_most_one_checkpoint_interval(shapes, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(shapes, out, "solver.max_iter=1000", "solver.checkpoint_period=2")
    proc = subprocess.Popen(_cli("train", "shapes_tiny", *args), env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    _wait_for(lambda: (out / "model_0000004.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = ckpt.latest_checkpoint(out)
    saved_at = ckpt.load_checkpoint(last)["iteration"]  # complete and verified, never half-written
    logged = [
        json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()
    ]
    assert (
        saved_at >= 4 and max(logged) - saved_at < 2 + 1
    )  # lost: less than one interval (+ the step in flight)

    done = subprocess.run(_cli("train", "shapes_tiny", *args[:-2], f"--solver.max_iter={saved_at + 2}", "--solver.checkpoint_period=2", "--resume"),
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {last}" in done.stderr
    assert ckpt.load_checkpoint(out / "model_final.pt")["iteration"] == saved_at + 2
    logged = [
        json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, saved_at + 3))  # continued right after the checkpoint, no gap
