"""The command line end to end: train -> eval -> predict -> eval-files, as ``make demo`` runs it.

The files ``predict`` writes score exactly what ``eval`` reports: the predictor and the evaluation
share the test-time resize, the model and the post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_run import make_shapes, tiny_args

from m2f_lite import checkpoint as ckpt
from m2f_lite.cli import main
from m2f_lite.data.synthetic import shapes_meta
from m2f_lite.metrics import eval_files
from m2f_lite.metrics.panoptic_format import read_panoptic_png


def run(argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors and train's interrupted exit
        return int(e.code)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("shapes"))
    out = tmp_path_factory.mktemp("run")
    assert (
        run(
            [
                "train",
                "shapes_tiny",
                *tiny_args(root, out, "solver.max_iter=3", "solver.eval_period=3"),
            ]
        )
        == 0
    )
    return root, out


def test_train_writes_the_run_and_reports_the_metrics(trained, capsys):
    root, out = trained
    state = ckpt.load_checkpoint(out / "model_final.pt")
    assert state["iteration"] == 3 and state["meta"]["classes"][0] == "circle"
    assert ckpt.checkpoint_config(state).data.root == str(root)
    assert (out / "loss.png").exists() and (out / "log.jsonl").exists()


def test_eval_checkpoint_or_preset_with_weights(trained, tmp_path, capsys):
    root, out = trained
    assert run(["eval", out / "model_final.pt", "--json", tmp_path / "m.json"]) == 0
    table = capsys.readouterr().out
    assert "== panoptic_seg ==" in table and "PQ" in table and "mIoU" in table and "AP50" in table
    metrics = json.loads((tmp_path / "m.json").read_text())
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert (
        metrics["panoptic_seg"]["PQ"] == logged[-1]["eval"]["PQ"]
    )  # the same as the training's eval
    args = tiny_args(root, tmp_path)
    assert (
        run(
            [
                "eval",
                "shapes_tiny",
                "--weights",
                out / "model_final.pt",
                *args,
                "--json",
                tmp_path / "p.json",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "p.json").read_text()) == metrics


def test_predict_files_score_what_eval_reports(trained, tmp_path, capsys):
    # (barely trained, so the numbers are small; test_predictor checks image by image that the
    # predictor's results are the evaluation's)
    root, out = trained
    weights, pred = out / "model_final.pt", tmp_path / "pred"
    override = "--inference.object_mask_threshold=0.5"  # reaches eval and predict alike
    assert run(["eval", weights, override, "--json", tmp_path / "m.json"]) == 0
    expected = json.loads((tmp_path / "m.json").read_text())
    images = sorted((root / "images" / "val").glob("*.png"))  # image ids 0, 1, 2 in this order
    for task in ("panoptic", "instance", "semantic"):
        assert (
            run(["predict", *images, "--weights", weights, "--task", task, "--out", pred, override])
            == 0
        )
    for image in images:
        overlay = np.asarray(Image.open(pred / f"{image.stem}_overlay.png"))
        assert overlay.shape == (*np.asarray(Image.open(image)).shape[:2], 3)
        assert read_panoptic_png(pred / f"{image.stem}_panoptic.png").shape == overlay.shape[:2]
    annotations = json.loads((pred / "panoptic.json").read_text())["annotations"]
    assert [(a["image_id"], a["file_name"]) for a in annotations] == [
        (i, f"{im.stem}_panoptic.png") for i, im in enumerate(images)
    ]

    # the same numbers from the files, through the CLI and through the functions it calls
    pan_gt, inst_gt, sem_gt = (
        root / "panoptic_val.json",
        root / "instances_val.json",
        root / "semantic_val",
    )
    assert run(["eval-files", "panoptic", "--gt-json", pan_gt, "--gt-dir", root / "panoptic_val",
                "--pred-json", pred / "panoptic.json", "--pred-dir", pred]) == 0  # fmt: skip
    assert (
        run(["eval-files", "instance", "--gt-json", inst_gt, "--results", pred / "instances.json"])
        == 0
    )
    semantic = [
        "--gt-dir",
        sem_gt,
        "--pred-dir",
        pred,
        "--num-classes",
        7,
        "--pred-suffix",
        "_semantic",
    ]
    assert run(["eval-files", "semantic", *semantic]) == 0
    assert f"{expected['sem_seg']['mIoU']:.2f}" in capsys.readouterr().out
    from_files = {
        **eval_files.evaluate_panoptic_files(pan_gt, root / "panoptic_val", pred / "panoptic.json", pred),
        **eval_files.evaluate_instance_files(inst_gt, pred / "instances.json"),
        **eval_files.evaluate_semantic_files(sem_gt, pred, num_classes=7, pred_suffix="_semantic", class_names=shapes_meta().classes),
    }  # fmt: skip
    assert from_files.keys() == expected.keys()
    for task in expected:
        for k, v in expected[task].items():
            assert from_files[task][k] == pytest.approx(v, abs=1e-9, nan_ok=True), (task, k)


def test_resume_through_the_cli(trained, tmp_path):
    root, _ = trained
    args = tiny_args(root, tmp_path, "solver.max_iter=2", "solver.checkpoint_period=1")
    assert run(["train", "shapes_tiny", *args]) == 0
    assert (
        run(
            [
                "train",
                "shapes_tiny",
                *args[:-2],
                "--solver.max_iter=3",
                "--solver.checkpoint_period=1",
                "--resume",
            ]
        )
        == 0
    )
    assert ckpt.load_checkpoint(tmp_path / "model_final.pt")["iteration"] == 3
    assert run(["train", "shapes_tiny", *args, "--resume-from", tmp_path / "model_0000001.pt"]) == 0


def test_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("data", "train", "eval", "predict", "convert", "eval-files", "bench"):
        assert command in text


def test_shapes_are_made_on_first_use(tmp_path, monkeypatch):
    """`m2f-lite train shapes_tiny` works in a fresh clone: the dataset is generated first."""
    calls = []
    from m2f_lite.data import synthetic

    monkeypatch.setattr(synthetic, "generate", lambda root, **kw: calls.append((Path(root), kw)))
    monkeypatch.setattr(
        "m2f_lite.engine.train",
        lambda cfg, resume: {"interrupted": None, "metrics": {}, "checkpoint": "x"},
    )
    assert run(["train", "shapes_tiny", f"--data.root={tmp_path / 'shapes'}"]) == 0
    assert calls == [(tmp_path / "shapes", {"n_train": 500, "n_val": 100, "size": 128, "seed": 0})]
