"""Fuzz: a few hundred mutated dataset files and photos, seeded (issue 17).

Every case must end in a correct result or a :class:`DatasetError` (the one line the command line
prints), never another exception and never a hang (``signal.alarm`` stops a case after 10 s).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_run import make_shapes, tiny_config

from m2f_lite import checkpoint as ckpt
from m2f_lite.data.build import build_dataset
from m2f_lite.data.files import DatasetError
from m2f_lite.data.synthetic import shapes_meta
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.predictor import Predictor

OUTCOMES = {"ok": 0, "DatasetError": 0}  # both must occur: the cases reach the checks
MODES = ("L", "P", "RGBA", "I;16", "1", "LA", "F", "I")


def _bytes_mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """Truncated, bit-flipped, emptied and garbage versions of a file's bytes."""
    out = [data[: rng.randrange(len(data))] for _ in range(3)]
    for _ in range(4):
        b = bytearray(data)
        for _ in range(rng.choice((1, 4, 32))):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    out += [b"", bytes(rng.randrange(256) for _ in range(64))]
    return out


def _image_mutations(path: Path, rng: random.Random) -> list[bytes]:
    """Other modes and sizes of the same picture, saved as PNG."""
    with Image.open(path) as img:
        img.load()
    out = []
    for mode in MODES:
        buf = io.BytesIO()
        img.convert(mode).save(buf, format="TIFF" if mode in ("F", "I") else "PNG")
        out.append(buf.getvalue())
    for size in ((1, 1), (img.width + 1, img.height), (3, 700), (700, 3)):
        buf = io.BytesIO()
        img.resize(size).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _json_mutations(text: str, rng: random.Random) -> list[bytes]:
    """Truncated JSON, and values of the wrong type or missing keys."""
    out = [text[: rng.randrange(len(text))].encode() for _ in range(3)]
    odd_values = ["abc", None, -1, 1.5, [], {}, True, 10**12]
    for _ in range(12):
        data = json.loads(text)
        ann = rng.choice(data["annotations"])
        target = rng.choice([ann, *ann.get("segments_info", []), rng.choice(data["images"])])
        key = rng.choice(sorted(target))
        if rng.random() < 0.3:
            del target[key]
        else:
            target[key] = rng.choice(odd_values)
        out.append(json.dumps(data).encode())
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _run_case(fn) -> None:
    """``fn()`` must return or raise DatasetError, within 10 s."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        fn()
        OUTCOMES["ok"] += 1
    except DatasetError as e:
        assert "\n" not in str(e), str(e)
        OUTCOMES["DatasetError"] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("fuzz") / "data", n_train=2, n_val=2, size=32)


def _read_split(cfg, split: str) -> None:
    dataset = build_dataset(cfg, split, train=split == "train")
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"]
        assert image.ndim == 3 and image.shape[0] == 3  # [3, H, W]
        for target_mask in sample.get("masks", []):
            assert target_mask.shape == image.shape[-2:]


def _mutate_and_read(path: Path, variants: list[bytes], read) -> int:
    original = path.read_bytes()
    try:
        for variant in variants:
            path.write_bytes(variant)
            _run_case(read)
    finally:
        path.write_bytes(original)
    return len(variants)


@pytest.mark.parametrize("dataset", ["shapes", "shapes_semantic", "shapes_instance"])
def test_readers_on_mutated_files(shapes, tmp_path, dataset):
    rng = random.Random(f"fuzz-{dataset}")
    classes = "model.num_classes=4" if dataset == "shapes_instance" else "model.num_classes=7"
    cfg = tiny_config(shapes, tmp_path / "run", f"data.dataset={dataset}", classes)
    split = "val"
    annotation = {
        "shapes": shapes / "panoptic_val.json",
        "shapes_instance": shapes / "instances_val.json",
    }.get(dataset)
    n = 0
    for image in sorted((shapes / "images" / split).glob("*.png"))[:2]:
        variants = _bytes_mutations(image.read_bytes(), rng) + _image_mutations(image, rng)
        n += _mutate_and_read(image, variants, lambda: _read_split(cfg, split))
    label_dir = {"shapes": "panoptic_val", "shapes_semantic": "semantic_val"}.get(dataset)
    if label_dir:
        label = sorted((shapes / label_dir).glob("*.png"))[0]
        variants = _bytes_mutations(label.read_bytes(), rng) + _image_mutations(label, rng)
        n += _mutate_and_read(label, variants, lambda: _read_split(cfg, split))
    if annotation:
        n += _mutate_and_read(
            annotation,
            _json_mutations(annotation.read_text(), rng),
            lambda: _read_split(cfg, split),
        )
    assert n >= 30


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    cfg = tiny_config(Path("unused"), Path("unused"))
    torch.manual_seed(0)
    path = ckpt.save_checkpoint(
        tmp_path_factory.mktemp("w") / "m.pt",
        model=build_model(cfg),
        config=cfg,
        extra={"meta": dataclasses.asdict(shapes_meta())},
    )
    return Predictor.from_checkpoint(path, device="cpu")


def test_predict_on_mutated_photos(shapes, tmp_path, predictor):
    rng = random.Random("fuzz-predict")
    image = sorted((shapes / "images" / "val").glob("*.png"))[0]
    buf = io.BytesIO()
    with Image.open(image) as img:
        img.convert("RGB").save(buf, format="JPEG")
    variants = []
    for data in (image.read_bytes(), buf.getvalue()):
        variants += _bytes_mutations(data, rng)
    variants += _image_mutations(image, rng)
    photo = tmp_path / "photo"

    def predict() -> None:
        result = predictor(photo, tasks=("panoptic",))
        ids, _ = result["panoptic_seg"]
        assert tuple(ids.shape) == result["image"].shape[:2]

    for variant in variants:
        photo.write_bytes(variant)
        _run_case(predict)
    assert len(variants) >= 30


def test_the_fuzz_reached_both_outcomes():
    """Runs after the cases above (file order): some mutations are refused, some read."""
    assert sum(OUTCOMES.values()) >= 200 and OUTCOMES["ok"] >= 20, OUTCOMES
