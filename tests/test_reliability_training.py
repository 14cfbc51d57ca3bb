"""Training under faults: NaN losses, out-of-memory, Ctrl-C/SIGTERM, bad checkpoints, unsafe loads.

(``kill -9`` and bit-exact resume: ``test_resume.py``; corrupt files in detail: ``test_checkpoint.py``.)
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import make_shapes, tiny_args, tiny_config

import m2f_lite
from m2f_lite import checkpoint as ckpt
from m2f_lite import engine
from m2f_lite.criterion import build_criterion


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def _criterion_that(action, at_call: int):
    """``build_criterion`` whose ``total`` runs ``action(loss)`` on its ``at_call``-th call."""

    def build(cfg):
        criterion = build_criterion(cfg)
        total, calls = criterion.total, [0]

        def patched(losses):
            calls[0] += 1
            loss = total(losses)
            return action(loss) if calls[0] == at_call else loss

        criterion.total = patched
        return criterion

    return build


def _count_steps(monkeypatch) -> list[int]:
    """Record every optimizer step the engine takes."""
    steps, original = [], engine.build_optimizer

    def build(cfg, model):
        opt = original(cfg, model)
        opt.register_step_post_hook(lambda *args: steps.append(1))
        return opt

    monkeypatch.setattr(engine, "build_optimizer", build)
    return steps


def test_nan_loss_skips_the_step(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        engine, "build_criterion", _criterion_that(lambda loss: loss * float("nan"), at_call=2)
    )
    steps = _count_steps(monkeypatch)
    result = engine.train(
        tiny_config(shapes, tmp_path, "solver.max_iter=3", "solver.nonfinite_loss=skip")
    )
    assert result["iteration"] == 3 and result["skipped_steps"] == 1 and len(steps) == 2
    assert "iteration 2: non-finite loss (nan)" in capsys.readouterr().err
    state = ckpt.load_checkpoint(tmp_path / "model_final.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_loss_stops_the_run_naming_the_iteration(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(
        engine, "build_criterion", _criterion_that(lambda loss: loss * float("inf"), at_call=3)
    )
    with pytest.raises(
        FloatingPointError, match=r"iteration 3: non-finite loss \(inf\).*nonfinite_loss=stop"
    ):
        engine.train(
            tiny_config(shapes, tmp_path, "solver.max_iter=5", "solver.nonfinite_loss=stop")
        )


def test_out_of_memory_comes_with_advice(shapes, tmp_path, monkeypatch, capsys):
    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine, "build_criterion", _criterion_that(oom, at_call=2))
    with pytest.raises(torch.OutOfMemoryError):
        engine.train(tiny_config(shapes, tmp_path))
    err = capsys.readouterr().err
    assert "iteration 2: out of GPU memory" in err
    assert all(
        word in err
        for word in (
            "solver.ims_per_batch",
            "solver.grad_accum",
            "solver.amp=bf16",
            "loss.num_points",
        )
    )


def test_ctrl_c_finishes_the_step_and_saves(shapes, tmp_path, monkeypatch):
    def interrupt(loss):
        signal.raise_signal(signal.SIGINT)  # as if Ctrl-C were pressed during step 2
        return loss

    monkeypatch.setattr(engine, "build_criterion", _criterion_that(interrupt, at_call=2))
    result = engine.train(
        tiny_config(shapes, tmp_path, "solver.max_iter=10", "solver.checkpoint_period=100")
    )
    assert result["interrupted"] == signal.SIGINT and result["iteration"] == 2
    assert result["checkpoint"] == str(tmp_path / "model_0000002.pt")
    assert ckpt.load_checkpoint(result["checkpoint"])["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_saves_a_checkpoint_and_exits_143(shapes, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = tiny_args(shapes, out, "solver.max_iter=100000", "solver.checkpoint_period=100000")
    proc = subprocess.Popen([sys.executable, "-m", "m2f_lite.cli", "train", "shapes_tiny", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and saved.name != "model_final.pt"
    assert "continue with --resume" in err and "Traceback" not in err
    assert ckpt.load_checkpoint(saved)["iteration"] >= 1


def test_resume_with_another_config_is_refused_with_the_diff(shapes, tmp_path):
    saved = tiny_config(shapes, tmp_path, "solver.max_iter=2")
    engine.train(saved)
    changed = tiny_config(
        shapes, tmp_path, "solver.max_iter=2", "model.num_queries=5", "solver.base_lr=0.005"
    )
    with pytest.raises(ckpt.CheckpointError) as err:
        engine.train(changed, resume=True)
    message = str(err.value)
    assert "refusing to resume" in message and "model.num_queries: 8 -> 5" in message
    assert f"solver.base_lr: {saved.solver.base_lr!r} -> 0.005" in message


def test_resume_from_a_truncated_or_weights_only_checkpoint_is_an_error(shapes, tmp_path):
    engine.train(tiny_config(shapes, tmp_path / "a", "solver.max_iter=2"))
    final = tmp_path / "a" / "model_final.pt"
    final.write_bytes(final.read_bytes()[:1000])  # as if the disk filled up
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        engine.train(tiny_config(shapes, tmp_path / "a", "solver.max_iter=2"), resume=True)
    (tmp_path / "b").mkdir()
    cfg = tiny_config(shapes, tmp_path / "b", "solver.max_iter=2")
    ckpt.save_checkpoint(
        tmp_path / "b" / "model_final.pt", model=engine.build_model(cfg), config=cfg
    )
    with pytest.raises(ckpt.CheckpointError, match="weights only"):
        engine.train(cfg, resume=True)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [
        (path.name, node)
        for path in Path(m2f_lite.__file__).parent.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
    ]
    assert calls, "expected torch.load calls in the package"
    for name, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, (
            f"{name}:{node.lineno}"
        )
