"""Runs that must not lose data or report a useless result as success (issue #17).

Each test reproduces a failure found by attacking the command line as a user's mistakes would:
shapes data synthesised over a user's dataset, empty or all-skipped runs that exited 0, two runs in
one ``output_dir``, ``predict`` replacing earlier results, stops that waited for a whole
evaluation, temporary files left by ``kill -9``, files written 0600 whatever the umask.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from tiny_run import make_shapes, tiny_args, tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite.atomic_io import atomic_write_text, remove_stale_temporaries
from m2f_lite.cli import main
from m2f_lite.config import get_config
from m2f_lite.data import synthetic
from m2f_lite.modeling.mask2former import build_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step"),  # skipped steps
]


def run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=4, n_val=2, size=48)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = tiny_config(Path("unused"), Path("unused"))
    return ckpt.save_checkpoint(
        tmp_path_factory.mktemp("w") / "m.pt", model=build_model(cfg), config=cfg
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# Shapes data is synthesised only where the generator may write
# ----------------------------------------------------------------------------------------------


def test_a_val_only_folder_is_never_overwritten_with_shapes(shapes, tmp_path, capsys):
    """Before: no panoptic_train.json meant "make the shapes here", over the user's val split."""
    user = tmp_path / "mine"
    shutil.copytree(shapes, user)
    for p in [*user.glob("*train*"), user / "images" / "train", user / synthetic.MARKER]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = _tree(user)
    assert run(["train", "shapes_tiny", *tiny_args(user, tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f-lite: error: ") and "\n" not in err
    assert f"{user / 'panoptic_train.json'}: no such file" in err and synthetic.MARKER in err
    assert _tree(user) == before and not (tmp_path / "run").exists()


def test_shapes_are_made_in_an_empty_or_generated_folder_only(tmp_path, monkeypatch, capsys):
    _ensure_shapes = synthetic.ensure_dataset

    monkeypatch.setattr(synthetic, "SHAPES_ARGS", {"n_train": 1, "n_val": 1, "size": 32})
    empty, absent = tmp_path / "empty", tmp_path / "absent"
    empty.mkdir()
    for root in (empty, absent):
        _ensure_shapes(get_config("shapes_tiny", [f"data.root={root}"]), ("train", "val"))
        assert (root / "panoptic_train.json").is_file() and (root / synthetic.MARKER).is_file()
    (absent / "panoptic_train.json").unlink()  # a generated folder, half deleted: made again
    _ensure_shapes(get_config("shapes_tiny", [f"data.root={absent}"]), ("train",))
    assert (absent / "panoptic_train.json").is_file()
    other = tmp_path / "coco"  # not a shapes dataset: nothing is ever generated for it
    other.mkdir()
    _ensure_shapes(get_config("shapes_tiny", ["data.dataset=coco_custom", f"data.root={other}"]), ("train",))  # fmt: skip
    assert list(other.iterdir()) == []
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# What only `data check` caught: train and eval read the same files and refuse them too
# ----------------------------------------------------------------------------------------------


def test_eval_refuses_what_data_check_refuses(shapes, weights, tmp_path, capsys):
    """Before: an unknown category in instances_val.json or a wrong height changed AP, rc 0."""
    cases = {
        "category": (
            lambda d: d["annotations"][0].update(category_id=55),
            "instances_val.json: annotations[0].category_id: unknown category id 55",
        ),
        "height": (
            lambda d: d["images"][1].update(height=50),
            "instances_val.json: images[id=1].height/width: image",
        ),
    }
    for name, (edit, message) in cases.items():
        root = tmp_path / name
        shutil.copytree(shapes, root)
        data = json.loads((root / "instances_val.json").read_text())
        edit(data)
        (root / "instances_val.json").write_text(json.dumps(data))
        assert run(["eval", weights, f"--data.root={root}"]) == 2, name
        err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()  # after the progress bar
        assert err.startswith("m2f-lite: error: ") and "\n" not in err and message in err, err


# ----------------------------------------------------------------------------------------------
# Files follow the umask; temporary files of a killed write are cleaned
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")  # before: always 0600 (mkstemp)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.chmod(0o640)  # an existing file keeps its mode, as open(path, "w") keeps it
        assert stat.S_IMODE(atomic_write_text(path, "[]").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_training_outputs_follow_the_umask(shapes, tmp_path):
    from m2f_lite import engine

    old = os.umask(0o022)
    try:
        engine.train(tiny_config(shapes, tmp_path, "solver.max_iter=1"), progress=False)
    finally:
        os.umask(old)
    for name in ("model_final.pt", "config.json", "log.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(shapes, tmp_path):
    from m2f_lite import engine

    tmp_path.joinpath(".model_0000002.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.tmp"  # not a temporary of atomic_file's: kept
    mine.write_text("mine")
    engine.train(tiny_config(shapes, tmp_path, "solver.max_iter=1"), progress=False)
    assert not list(tmp_path.glob(".*.tmp")) and mine.read_text() == "mine"
    assert remove_stale_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# One training run per output_dir
# ----------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_output_dir_is_refused(shapes, tmp_path, capsys):
    from m2f_lite import engine
    from m2f_lite.distributed import Runtime

    with engine.OutputDirLock(tmp_path, Runtime()):  # a first run holds the folder
        assert run(["train", "shapes_tiny", *tiny_args(shapes, tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("m2f-lite: error: ") and "\n" not in err
        assert f"output_dir {tmp_path} is in use by another training run (pid {os.getpid()}" in err
        assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "config.json").exists()
    # released when the first run ends (and by the kernel if it is killed): the next one runs
    result = engine.train(tiny_config(shapes, tmp_path, "solver.max_iter=1"), progress=False)
    assert result["iteration"] == 1


# ----------------------------------------------------------------------------------------------
# Empty or useless runs are not reported as success
# ----------------------------------------------------------------------------------------------


def _empty_split(root: Path, split: str) -> None:
    for kind in ("panoptic", "instances"):
        path = root / f"{kind}_{split}.json"
        data = json.loads(path.read_text())
        data.update(images=[], annotations=[])
        path.write_text(json.dumps(data))


def test_data_check_of_an_empty_dataset_fails(shapes, tmp_path, capsys):
    root = tmp_path / "empty"
    shutil.copytree(shapes, root)
    _empty_split(root, "val")
    assert run(["data", "check", root]) == 1  # before: 0 errors, exit 0
    out = capsys.readouterr().out
    assert f"error: {root / 'panoptic_val.json'}: images: no images: the split is empty" in out
    (tmp_path / "nothing").mkdir()
    assert run(["data", "check", tmp_path / "nothing"]) == 1


def test_eval_on_an_empty_val_split_is_an_error(shapes, weights, tmp_path, capsys):
    root = tmp_path / "empty"
    shutil.copytree(shapes, root)
    _empty_split(root, "val")
    assert run(["eval", weights, f"--data.root={root}"]) == 2  # before: NaN metrics, exit 0
    err = capsys.readouterr().err.strip()
    assert err == (
        f"m2f-lite: error: {root / 'panoptic_val.json'}: no images in data.val_split='val': "
        "nothing to evaluate"
    )
    _empty_split(root, "train")
    assert run(["train", "shapes_tiny", *tiny_args(root, tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"m2f-lite: error: {root}: no images in data.train_split='train': nothing to train on"
    )


def _nan_criterion(cfg):
    from m2f_lite.criterion import build_criterion

    criterion = build_criterion(cfg)
    total = criterion.total
    criterion.total = lambda losses: total(losses) * float("nan")
    return criterion


def test_a_run_whose_every_step_was_skipped_fails(shapes, tmp_path, monkeypatch, capsys):
    from m2f_lite import engine

    monkeypatch.setattr(engine, "build_criterion", _nan_criterion)
    args = tiny_args(shapes, tmp_path, "solver.max_iter=2", "solver.nonfinite_loss=skip")
    assert run(["train", "shapes_tiny", *args]) == 1  # before: exit 0 with a model_final.pt
    err = capsys.readouterr().err
    assert "m2f-lite: error: all 2 steps had a non-finite loss" in err
    assert not (tmp_path / "model_final.pt").exists()


def test_nonfinite_stop_names_only_a_checkpoint_that_exists(shapes, tmp_path, monkeypatch):
    from m2f_lite import engine

    monkeypatch.setattr(engine, "build_criterion", _nan_criterion)
    cfg = tiny_config(shapes, tmp_path, "solver.max_iter=3", "solver.nonfinite_loss=stop")
    with pytest.raises(FloatingPointError, match=r"iteration 1: .*; no checkpoint was saved$"):
        engine.train(cfg, progress=False)  # before: "the last checkpoint is in <output_dir>"
    assert ckpt.latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    engine.train(tiny_config(shapes, tmp_path, "solver.max_iter=2"), progress=False)
    monkeypatch.setattr(engine, "build_criterion", _nan_criterion)
    resumed = tiny_config(shapes, tmp_path, "solver.max_iter=3", "solver.nonfinite_loss=stop")
    with pytest.raises(FloatingPointError) as e:
        engine.train(resumed, resume=True, progress=False)
    named = str(e.value).rsplit("the last checkpoint is ", 1)[1]
    assert Path(named).is_file() and ckpt.load_checkpoint(named)["iteration"] == 2


# ----------------------------------------------------------------------------------------------
# predict adds to an output folder, keyed by the input's path
# ----------------------------------------------------------------------------------------------


def test_predict_keeps_earlier_results_and_same_stem_inputs(shapes, weights, tmp_path, capsys):
    image = shapes / "images" / "val" / "000000.png"
    a, b, c = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c.png"
    for p in (a, b, c):
        p.parent.mkdir(exist_ok=True)
        shutil.copy(image, p)
    out = tmp_path / "out"

    def predict(*images) -> dict[str, int]:
        argv = ["predict", *images, "--weights", weights, "--out", out, "--task", "panoptic"]
        assert run([*argv, "--device", "cpu"]) == 0
        annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
        names = {a["file_name"]: a["image_id"] for a in annotations}
        assert len(names) == len(annotations)  # one entry per image, ids distinct
        return names

    first = predict(a, b)  # before: b/x.png overwrote a/x.png's files
    assert sorted(first) == ["x_2_panoptic.png", "x_panoptic.png"]
    assert (out / "x_overlay.png").is_file() and (out / "x_2_overlay.png").is_file()
    second = predict(c)  # before: the second run's image 0 replaced the first run's
    assert second == {**first, "c_panoptic.png": max(first.values()) + 1}
    assert predict(b) == second  # the same file keeps its id and its files
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# Stops
# ----------------------------------------------------------------------------------------------


def test_sigterm_during_an_evaluation_stops_after_the_current_image(shapes, tmp_path, monkeypatch):
    import signal

    import m2f_lite.inference
    from m2f_lite import engine

    images, original = [], m2f_lite.inference.postprocess_from_config

    def postprocess(*args, **kwargs):
        images.append(1)
        if len(images) == 1:
            signal.raise_signal(signal.SIGTERM)  # arrives while the first image is evaluated
        return original(*args, **kwargs)

    monkeypatch.setattr(m2f_lite.inference, "postprocess_from_config", postprocess)
    cfg = tiny_config(shapes, tmp_path, "solver.max_iter=10", "solver.eval_period=2",
                      "solver.checkpoint_period=100")  # fmt: skip
    result = engine.train(cfg, progress=False)
    # before: all the val images were evaluated, then 2 more training steps ran before the stop
    assert len(images) == 1 < 2 == len(engine.build_dataset(cfg, "val", train=False))
    assert result["interrupted"] == signal.SIGTERM and result["iteration"] == 2
    assert result["checkpoint"] == str(tmp_path / "model_0000002.pt")
    assert ckpt.load_checkpoint(result["checkpoint"])["iteration"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------------------------------------
# convert verifies what it reads
# ----------------------------------------------------------------------------------------------


def test_convert_refuses_a_pth_with_a_flipped_byte_inside_a_tensor(tmp_path, capsys):
    import zipfile

    import torch
    from test_convert import official, tiny_model

    src = tmp_path / "model_final.pth"
    weights = official(tiny_model(0, preset_only=True))  # numpy arrays, as in a .pkl
    torch.save({"model": {k: torch.as_tensor(v) for k, v in weights.items()}}, src)
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # the local header (30 bytes) holds the name and extra-field lengths at bytes 26 and 28
    name_len, extra_len = (int.from_bytes(data[info.header_offset + i : info.header_offset + i + 2], "little") for i in (26, 28))  # fmt: skip
    data[info.header_offset + 30 + name_len + extra_len + 10] ^= 0xFF  # a byte of a weight
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(bytes(data))
    assert run(["convert", src, tmp_path / "good.pt"]) == 0  # the intact file converts
    capsys.readouterr()
    assert run(["convert", bad, tmp_path / "bad.pt"]) == 2  # before: converted silently
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"m2f-lite: error: {bad}: corrupt") and "CRC-32 mismatch" in err
    assert "\n" not in err and not (tmp_path / "bad.pt").exists()


def _wait_for_training(proc, out: Path) -> None:
    import time

    deadline = time.monotonic() + 180
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def test_sigterm_under_torchrun_exits_143_without_a_traceback(shapes, tmp_path):
    """Two CPU processes (gloo) under ``python -m m2f_lite.distributed`` (torchrun's launcher):
    before, torchrun ended a saved stop with exit 1 and a traceback, and process 1 exited 0."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = tiny_args(shapes, out, "solver.max_iter=100000", "solver.checkpoint_period=100000")
    cmd = [sys.executable, "-m", "m2f_lite.distributed", "--standalone", "--nproc_per_node=2",
           "-m", "m2f_lite.cli", "train", "shapes_tiny", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_training(proc, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "m2f-lite: stopped by SIGTERM (exit 143)" in err
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and ckpt.load_checkpoint(saved)["iteration"] >= 1
    assert len(ckpt.load_checkpoint(saved)["rng"]) == 2  # saved by both processes together


def test_a_signal_forwarded_by_torchrun_is_not_a_second_ctrl_c(monkeypatch):
    """Under torchrun a Ctrl-C reaches each process from the terminal and again from torchrun's
    agent, milliseconds apart: before, that counted as "again: quit without saving"."""
    import signal

    from m2f_lite.engine import StopOnSignal

    with StopOnSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the forwarded copy: still the one stop
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(StopOnSignal, "REPEAT_S", 0.0)  # a later, deliberate second Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
