"""Never a hang, a bounded memory, one line for every bad input (issue 17, part C).

Each test reproduced its failure before the fix: ``pq_compute`` from a plain script hung forever,
``predict`` on a large photo needed memory in proportion to the photo times the queries, and the
errors below printed tracebacks.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import make_shapes, tiny_args, tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite import inference
from m2f_lite.cli import main
from m2f_lite.data.coco_panoptic import parse_panoptic_json
from m2f_lite.data.files import DatasetError
from m2f_lite.data.synthetic import shapes_meta
from m2f_lite.modeling.mask2former import build_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "1000"}

PQ_SCRIPT = """\
import json, sys
import numpy as np
from m2f_lite.metrics.panoptic_format import write_panoptic_png
from m2f_lite.metrics.pq import pq_compute
{prelude}
root = sys.argv[1]
anns = []
for i in range(4):
    m = np.zeros((8, 8), np.uint32)
    m[:4] = 1  # one segment of 32 pixels per image
    write_panoptic_png(f"{{root}}/{{i}}.png", m)
    segment = {{"id": 1, "category_id": 1, "iscrowd": 0, "area": 32}}
    anns.append({{"image_id": i, "file_name": f"{{i}}.png", "segments_info": [segment]}})
with open(f"{{root}}.json", "w") as f:
    json.dump({{"annotations": anns, "categories": [{{"id": 1, "name": "a", "isthing": 1}}]}}, f)
{call}
"""
PQ_CALL = 'print("PQ", pq_compute(f"{root}.json", f"{root}.json", root, root, num_workers=2)["All"]["pq"])'


def _run_pq_script(
    tmp_path: Path, *, prelude: str = "", guarded: bool
) -> subprocess.CompletedProcess:
    call = f'if __name__ == "__main__":\n    {PQ_CALL}' if guarded else PQ_CALL
    script = tmp_path / "score.py"
    script.write_text(PQ_SCRIPT.format(prelude=prelude, call=call))
    (tmp_path / "gt").mkdir()
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "gt")],
        capture_output=True,
        text=True,
        timeout=120,  # hung forever before the fix
        env=ENV,
    )


def test_pq_compute_from_a_script_without_a_main_guard(tmp_path):
    done = _run_pq_script(tmp_path, guarded=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PQ", "1.0"]
    assert "without an `if __name__" in done.stderr  # said once, in the parent
    assert "bootstrapping phase" not in done.stderr  # no worker re-ran the script


def test_pq_compute_falls_back_to_one_process_when_its_workers_die(tmp_path):
    # a guarded script whose spawned workers exit as they start (as under an OOM killer)
    prelude = (
        'import os\nif __name__ == "__mp_main__":  # a spawned worker starting\n    os._exit(3)'
    )
    done = _run_pq_script(tmp_path, prelude=prelude, guarded=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PQ", "1.0"]
    assert "evaluating the images in this process" in done.stderr


# ---------------------------------------------------------------- predict: memory and odd sizes


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    cfg = tiny_config(Path("unused"), Path("unused"), "inference.object_mask_threshold=0.0")
    torch.manual_seed(0)
    return ckpt.save_checkpoint(
        tmp_path_factory.mktemp("w") / "m.pt",
        model=build_model(cfg),
        config=cfg,
        extra={"meta": dataclasses.asdict(shapes_meta())},
    )


def _outputs(num_queries: int = 6, num_classes: int = 7, size: tuple[int, int] = (5, 7)) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "pred_logits": 3 * torch.randn(1, num_queries, num_classes + 1, generator=gen),
        "pred_masks": 4 * torch.randn(1, num_queries, *size, generator=gen),
    }


def test_full_resolution_work_in_chunks_equals_the_official_at_once(monkeypatch):
    """One query (or chunk) at a time at the output size gives the official results: panoptic
    and instance bit for bit, semantic to float rounding."""
    outputs, is_thing = _outputs(), [True, True, True, False, False, True, False]
    kwargs = dict(is_thing=is_thing, object_mask_threshold=0.0, overlap_threshold=0.5)
    resize = inference.ToOutputSize(padded_size=(20, 28), image_size=(17, 26), output_size=(41, 53))
    mask_cls, low = outputs["pred_logits"][0], outputs["pred_masks"][0]  # [Q, K+1], [Q, h, w]
    full = resize(low)  # [Q, H, W]: what the official code holds
    ids, segments = inference.panoptic_inference(mask_cls, full, **kwargs)
    assert len(segments) >= 2  # the case exercises the running argmax
    monkeypatch.setattr(inference, "FULL_RES_BUDGET", 41 * 53 * 2)  # chunks of 2 queries
    ids_c, segments_c = inference.panoptic_inference(mask_cls, low, **kwargs, resize=resize)
    assert torch.equal(ids, ids_c) and segments == segments_c
    inst = inference.instance_inference(mask_cls, full, topk=10)
    inst_c = inference.instance_inference(mask_cls, low, topk=10, resize=resize)
    for key in ("masks", "scores", "labels"):
        assert torch.equal(inst[key], inst_c[key]), key
    torch.testing.assert_close(
        inference.semantic_inference(mask_cls, low, resize=resize),
        inference.semantic_inference(mask_cls, full),
    )


MEMORY_SCRIPT = """\
import resource, sys
import numpy as np
from PIL import Image
from m2f_lite import inference
from m2f_lite.cli import main
from m2f_lite.predictor import Predictor

weights, photo, out, per_pixel, task = *sys.argv[1:4], int(sys.argv[4]), sys.argv[5]
h, w = 1000, 1500
y, x = np.mgrid[0:h, 0:w]
Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(photo)
inference.FULL_RES_BUDGET = 1  # one query at a time, as a 50-megapixel photo is processed
Predictor.from_checkpoint(weights, device="cpu")  # torch, the model: in memory before the limit
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()  # virtual size now
limit = used + per_pixel * h * w
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
argv = ["predict", photo, "--weights", weights, "--out", out, "--device", "cpu", "--task", task]
sys.exit(main(argv))
"""


def test_compact_results_equal_the_full_ones(monkeypatch):
    """`predict`'s compact results (the semantic label map a band of rows at a time, instance
    masks as RLE chunk by chunk) equal the argmax of the official class scores and the RLE of
    the official masks, on both semantic paths and with several bands and chunks."""
    from pycocotools import mask as mask_util

    outputs = _outputs(num_queries=8, size=(6, 9))
    mask_cls = outputs["pred_logits"][0].double()  # float64: no argmax tie from rounding
    low = outputs["pred_masks"][0].double()  # [Q, h, w]
    resize = inference.ToOutputSize(padded_size=(24, 36), image_size=(21, 30), output_size=(47, 61))
    # the separable weights are F.interpolate's: input j, a line of ones at row (column) j,
    # becomes column j of the weights in every column (row) of the output
    rows = torch.eye(6, dtype=torch.float64)[:, :, None].expand(6, 6, 9)  # [6, h, w]
    torch.testing.assert_close(resize(rows)[:, :, 0].T, resize.axis_weights(6, 0).double())
    cols = torch.eye(9, dtype=torch.float64)[:, None, :].expand(9, 6, 9)  # [9, h, w]
    torch.testing.assert_close(resize(cols)[:, 0, :].T, resize.axis_weights(9, 1).double())
    monkeypatch.setattr(inference, "FULL_RES_BUDGET", 8 * 61 * 5)  # bands of 5 rows, 8 maps
    assert len(resize.row_bands(8)) == 10
    before = inference.semantic_labels(mask_cls, low, resize, before=True)
    assert torch.equal(before, inference.semantic_inference(mask_cls, resize(low)).argmax(0))
    padded = torch.nn.functional.interpolate(low[None], size=(24, 36), mode="bilinear")[0]
    official_after = inference.sem_seg_postprocess(
        inference.semantic_inference(mask_cls, padded), (21, 30), 47, 61
    )  # [K, H, W]
    after = inference.semantic_labels(mask_cls, low, resize, before=False)
    assert torch.equal(after, official_after.argmax(0))
    assert not torch.equal(before, after)  # the two paths are not the same computation
    monkeypatch.setattr(inference, "FULL_RES_BUDGET", 47 * 61 * 3)  # chunks of 3 masks
    full = inference.instance_inference(mask_cls.float(), low.float(), topk=10, resize=resize)
    rle = inference.instance_inference(
        mask_cls.float(), low.float(), topk=10, resize=resize, as_rle=True
    )
    assert "masks" not in rle and len(rle["rles"]) == 10
    assert torch.equal(rle["scores"], full["scores"]) and torch.equal(rle["labels"], full["labels"])
    for r, m in zip(rle["rles"], full["masks"]):
        decoded = mask_util.decode({**r, "counts": r["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), m.numpy())


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_predict_memory_is_bounded_per_pixel(tmp_path, weights, task):
    """predict adds at most 64 bytes a pixel (3.2 GB for a 50-megapixel photo; measured there:
    3.0 GB in all). Before: every query's mask as floats at full size, killed at 23 GB; the
    semantic and instance tasks held K floats and k bools a pixel."""
    script = tmp_path / "predict.py"
    script.write_text(MEMORY_SCRIPT)
    args = [weights, tmp_path / "photo.png", tmp_path / "out", 64, task]
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = {"panoptic": "photo_panoptic.png", "semantic": "photo_semantic.png",
               "instance": "photo_overlay.png"}[task]  # fmt: skip
    with Image.open(tmp_path / "out" / written) as png:
        assert png.size == (1500, 1000)
    if task == "instance":
        assert (tmp_path / "out" / "instances.json").is_file()


def test_odd_sizes_and_decompression_bombs_in_predict(tmp_path, weights, capsys):
    for name, shape in (("strip.png", (1, 300, 3)), ("tall.png", (5000, 2, 3))):
        Image.fromarray(np.full(shape, 90, np.uint8)).save(tmp_path / name)
        assert run(["predict", tmp_path / name, "--weights", weights, "--out", tmp_path / "o"]) == 0
        with Image.open(tmp_path / "o" / name.replace(".png", "_panoptic.png")) as png:
            assert png.size == shape[1::-1]
    Image.new("L", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 MP of zeros, 200 kB
    capsys.readouterr()
    assert (
        run(["predict", tmp_path / "bomb.png", "--weights", weights, "--out", tmp_path / "o"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bomb.png: image too large to decode" in err


# ---------------------------------------------------------------- one line, not a traceback


def run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    err = err[err.find("m2f-lite: error: ") :]  # after train's progress bar, if any
    assert err.startswith("m2f-lite: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    data = make_shapes(tmp_path / "data", n_train=4, n_val=2, size=48)
    for image in (data / "images" / "train").glob("*.png"):
        image.write_bytes(image.read_bytes()[:100])  # truncated: whichever a worker reads first
    args = tiny_args(data, tmp_path / "run", "data.num_workers=2", "solver.max_iter=2")
    assert run(["train", "shapes_tiny", *args]) == 2
    _one_line(capsys, f"{data / 'images' / 'train'}", ": corrupt or truncated image")


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(tmp_path, weights, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["predict", "x.png", "--weights", weights, "--out", a_file], "--out"),
        (["eval", weights, "--json", tmp_path], "is a folder"),
        (["eval", weights, "--json", tmp_path / "nonexistent" / "m.json"], "no such folder"),
        (["eval", weights, "--json", a_file / "m.json"], "not a folder"),
        (["train", "shapes_tiny", f"--output_dir={a_file}"], "output_dir"),
    ]
    for argv, needle in cases:
        assert run(argv) == 2, argv
        _one_line(capsys, needle)
    assert not (tmp_path / "nonexistent").exists()  # no folder made


def test_malformed_json_for_eval_files_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": [')
    (tmp_path / "png").mkdir()
    argv = ["eval-files", "panoptic", "--gt-json", bad, "--gt-dir", tmp_path / "png"]
    assert run([*argv, "--pred-json", bad, "--pred-dir", tmp_path / "png"]) == 2
    _one_line(capsys, f"{bad}: malformed JSON at line 1")
    assert run(["eval-files", "instance", "--gt-json", bad, "--results", bad]) == 2
    _one_line(capsys, f"{bad}: malformed JSON at line 1")


def test_a_segment_id_that_is_not_a_number_names_file_and_field(tmp_path):
    meta = shapes_meta()
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 4, "width": 4}],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "1.png",
                "segments_info": [{"id": "abc", "category_id": meta.dataset_ids[0]}],
            }
        ],
        "categories": [
            {"id": d, "name": n, "isthing": int(t)}
            for d, n, t in zip(meta.dataset_ids, meta.classes, meta.is_thing)
        ],
    }
    field = r"annotations\[0\]\.segments_info\[0\]\.id"
    with pytest.raises(
        DatasetError, match=rf"p\.json: {field}: expected an integer segment id, got 'abc'"
    ):
        parse_panoptic_json(data, meta, tmp_path / "p.json")


def test_resuming_beyond_max_iter_says_so(tmp_path, capsys):
    data = make_shapes(tmp_path / "data", n_train=4, n_val=2, size=48)
    args = tiny_args(data, tmp_path / "run", "solver.max_iter=2", "solver.checkpoint_period=2")
    assert run(["train", "shapes_tiny", *args]) == 0
    capsys.readouterr()
    assert run(["train", "shapes_tiny", *args, "--solver.max_iter=1", "--resume"]) == 2
    _one_line(capsys, "saved at iteration 2, beyond solver.max_iter=1")


# ---------------------------------------------------------------- hostile and truncated weights


class _Payload:
    """Unpickling this runs ``os.system``: the file that a weights loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_weight_files(root: Path, marker: Path) -> dict[str, Path]:
    import io
    import pickle

    root.mkdir()
    plain = pickle.dumps({"model": {"w": np.zeros((3, 3), np.float32)}})
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(100)}}, buffer)
    files = {
        "hostile.pkl": pickle.dumps({"model": {"w": _Payload(marker)}}),
        "truncated.pkl": plain[: len(plain) // 2],
        "truncated.pth": buffer.getvalue()[: len(buffer.getvalue()) // 2],
        "hostile.pth": pickle.dumps({"model": {"w": _Payload(marker)}}),  # a legacy torch file
        "garbage.pth": b"not a weights file " * 10,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    torch.save({"model": _Payload(marker), "config": {}}, root / "hostile_zip.pt")  # valid CRCs
    return {p.name: p for p in root.iterdir()}


def test_hostile_or_truncated_weights_are_one_line_in_every_command(tmp_path, capsys):
    """`convert`, `train --weights`, `eval` and `predict` on six bad files: exit 2, one line that
    names the file, never torch's advice to set weights_only=False, never the payload run."""
    marker = tmp_path / "PAYLOAD_RAN"
    data = make_shapes(tmp_path / "data", n_train=2, n_val=1, size=48)
    for name, path in _bad_weight_files(tmp_path / "bad", marker).items():
        commands = [
            ["convert", path, tmp_path / f"{name}.converted.pt"],
            ["train", "shapes_tiny", *tiny_args(data, tmp_path / f"run_{name}", f"weights={path}")],
            ["eval", path],
            [
                "predict",
                data / "images" / "val" / "000000.png",
                "--weights",
                path,
                "--out",
                tmp_path / f"pred_{name}",
            ],
        ]
        for argv in commands:
            assert run(argv) == 2, (name, argv[0])
            err = _one_line(capsys, str(path))
            assert "weights_only=False" not in err and "set to `False`" not in err, err
        assert not (tmp_path / f"{name}.converted.pt").exists()
    assert not marker.exists()


# ---------------------------------------------------------------- odd image sizes in the data


def _make_one_image_odd(root: Path, shape: tuple[int, int]) -> None:
    """Train image 0 of a shapes dataset becomes an ``h x w`` strip of one stuff segment,
    consistently in every file (image, panoptic PNG and JSON, semantic PNG, instances JSON)."""
    import json

    from m2f_lite.metrics.panoptic_format import write_panoptic_png

    h, w = shape
    pan = json.loads((root / "panoptic_train.json").read_text())
    image, ann = pan["images"][0], pan["annotations"][0]
    segment = next(s for s in ann["segments_info"] if s["category_id"] > 100)  # a stuff class
    segment.update(area=h * w, bbox=[0, 0, w, h])
    ann["segments_info"] = [segment]
    image.update(height=h, width=w)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(
        root / "images" / "train" / image["file_name"]
    )
    write_panoptic_png(root / "panoptic_train" / ann["file_name"], np.full((h, w), segment["id"]))
    (root / "panoptic_train.json").write_text(json.dumps(pan))
    semantic = np.array(Image.open(root / "semantic_train" / image["file_name"]))
    label = int(np.bincount(semantic[semantic != 255].ravel()).argmax())  # any valid class id
    Image.fromarray(np.full((h, w), label, np.uint8)).save(
        root / "semantic_train" / image["file_name"]
    )
    inst = json.loads((root / "instances_train.json").read_text())
    inst["images"][0].update(height=h, width=w)
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != image["id"]]
    (root / "instances_train.json").write_text(json.dumps(inst))


@pytest.mark.parametrize("shape", [(1, 300), (5000, 2)])
def test_odd_image_sizes_in_data_check_and_train(tmp_path, capsys, shape):
    """A 1x300 or 5000x2 image in the training split: `data check` passes it and `train` runs
    (the LSJ crop pads it; the mask targets keep their one pixel row or column)."""
    data = make_shapes(tmp_path / "data", n_train=2, n_val=1, size=48)
    _make_one_image_odd(data, shape)
    assert run(["data", "check", data]) == 0, capsys.readouterr()
    args = tiny_args(data, tmp_path / "run", "solver.max_iter=2", "solver.ims_per_batch=2")
    assert run(["train", "shapes_tiny", *args]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "run" / "model_final.pt").is_file()


def test_a_decompression_bomb_in_the_data_is_one_line_in_data_check_and_train(tmp_path, capsys):
    """200 megapixels of zeros (200 kB as a PNG) in the training split: `data check` reports the
    file, `train` stops with one line naming it; neither decodes it."""
    data = make_shapes(tmp_path / "data", n_train=2, n_val=1, size=48)
    bomb = sorted((data / "images" / "train").glob("*.png"))[0]
    Image.new("RGB", (20000, 10000)).save(bomb)
    assert run(["data", "check", data]) == 1
    report = capsys.readouterr()
    assert f"{bomb}: image too large to decode" in report.out + report.err
    args = tiny_args(data, tmp_path / "run", "solver.max_iter=2", "solver.ims_per_batch=2")
    assert run(["train", "shapes_tiny", *args]) == 2
    _one_line(capsys, str(bomb), "too large to decode")
