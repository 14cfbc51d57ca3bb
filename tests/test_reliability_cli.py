"""Bad command lines give one line, ``m2f-lite: error: ...``, exit status 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite.cli import main
from m2f_lite.modeling.mask2former import build_model


def run(argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = tiny_config(Path("unused"), Path("unused"))
    return ckpt.save_checkpoint(
        tmp_path_factory.mktemp("w") / "m.pt", model=build_model(cfg), config=cfg
    )


CASES = {
    "unknown key": (["train", "shapes_tiny", "--model.nope=1"], "unknown config key 'model.nope'"),
    "unknown key, no dashes": (["train", "shapes_tiny", "solver.lr=1"], "unknown config key 'solver.lr'"),
    "wrong type": (["train", "shapes_tiny", "--model.num_queries=many"], "expected int"),
    "wrong bool": (["train", "shapes_tiny", "--loss.point_loss=perhaps"], "expected a boolean"),
    "no value": (["train", "shapes_tiny", "--solver.max_iter"], "expected key=value"),
    "unknown preset": (["train", "coco_tiny"], "unknown preset 'coco_tiny'"),
    "unknown command": (["fly"], "invalid choice: 'fly'"),
    "no command": ([], "required: command"),
    "bad task": (["predict", "x.png", "--weights", "w.pt", "--task", "depth"], "invalid choice: 'depth'"),
    "no weights": (["predict", "x.png"], "required: --weights"),
    "missing checkpoint": (["eval", "runs/nope/model_final.pt"], "no such checkpoint file"),
    "preset without weights": (["eval", "shapes_tiny"], "give --weights"),
    "missing weights": (["predict", "x.png", "--weights", "nope.pt"], "nope.pt: no such checkpoint file"),
    "no such gpu": (["predict", "x.png", "--weights", "w.pt", "--device", "cuda:99"], "CUDA GPU(s)"),
    "bad device": (["predict", "x.png", "--weights", "w.pt", "--device", "gpu"], "--device gpu"),
    "both resumes": (["train", "shapes_tiny", "--resume", "--resume-from", "a.pt"], "not both"),
    "override for data": (["data", "synthetic", "--model.num_queries=1"], "unrecognized arguments"),
    "missing convert source": (["convert", "nope.pkl", "out.pt"], "nope.pkl"),
    "missing eval files": (["eval-files", "instance", "--gt-json", "g.json", "--results", "r.json"], "r.json"),
    "missing semantic folder": (["eval-files", "semantic", "--gt-dir", "nope", "--pred-dir", "nope", "--num-classes", "3"], "nope"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_lines_give_one_line(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = CASES[case]
    assert run(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2f-lite: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_missing_image_and_corrupt_checkpoint(weights, tmp_path, capsys):
    assert run(["predict", tmp_path / "nope.jpg", "--weights", weights, "--out", tmp_path]) == 2
    assert "nope.jpg: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(weights.read_bytes()[:-100])
    assert run(["eval", broken]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f-lite: error: ") and "truncated" in err and "\n" not in err


def test_a_checkpoint_of_another_shape_is_reported_by_key(weights, tmp_path, capsys):
    assert run(["eval", "shapes_tiny", "--weights", weights, f"--data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "shape mismatch" in err and "Traceback" not in err
    assert "pixel_decoder.level_embed: checkpoint" in err  # the keys are named, with both shapes
    assert not (tmp_path / "panoptic_train.json").exists()  # checked before any data is made


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "m2f_lite.cli", "train", "shapes_tiny", "--model.num_queries=x"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "m2f-lite: error: override model.num_queries='x': expected int"
    assert not (tmp_path / "data").exists()  # nothing was made before the arguments were checked
    assert torch.__version__  # (torch imported fine in the child: the failure is the argument's)
