"""Checkpoints: atomic writes, verification on load, weights_only loading, RNG states, key reports."""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import tiny_config
from torch import nn

from m2f_lite import checkpoint as ckpt
from m2f_lite.atomic_io import atomic_file, atomic_write_bytes, atomic_write_text
from m2f_lite.config import apply_overrides, get_config
from m2f_lite.modeling.mask2former import build_model


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(Path("data/shapes"), Path("runs/x"))


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3).tolist()  # noqa: NPY002


def test_round_trip_with_weights_only_and_rng_restored(tmp_path, cfg, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 64, 64))["pred_logits"].sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path / "a.pt", model=model, config=cfg, iteration=3, optimizer=opt, sampler={"position": 6})  # fmt: skip
    expected = _draws()  # the draws that follow the saved state
    _draws()
    state = ckpt.load_checkpoint(path)  # torch.load(weights_only=True) inside
    ckpt.set_rng_state(state["rng"])
    assert _draws() == expected
    assert state["iteration"] == 3 and state["sampler"] == {"position": 6}
    assert ckpt.checkpoint_config(state, path) == cfg
    fresh = build_model(cfg)
    ckpt.load_model_state(fresh, state["model"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = ckpt.atomic_save({"model": {"w": torch.ones(2)}, "config": {}}, tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (pickling a lambda fails inside torch.save)
        ckpt.atomic_save({"model": lambda: 0}, path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_writes_replace_whole_files_or_nothing(tmp_path, durable):
    path = atomic_write_bytes(tmp_path / "sub" / "a.json", b"old", durable=durable)
    with pytest.raises(RuntimeError, match="mid-write"), atomic_file(path, durable=durable) as f:
        f.write(b"half of the new")
        raise RuntimeError("mid-write")
    assert path.read_bytes() == b"old" and list(path.parent.iterdir()) == [path]
    assert atomic_write_text(path, "new é", durable=durable).read_text("utf-8") == "new é"


def test_corrupt_and_truncated_files_are_detected(tmp_path, cfg, model):
    path = ckpt.save_checkpoint(tmp_path / "good.pt", model=model, config=cfg)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:  # flip one byte inside the first tensor's storage
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    # the local header (30 bytes) holds the name and extra-field lengths at bytes 26 and 28
    name_len, extra_len = (int.from_bytes(data[info.header_offset + i : info.header_offset + i + 2], "little") for i in (26, 28))  # fmt: skip
    offset = info.header_offset + 30 + name_len + extra_len + 10  # a byte of tensor data
    flipped = bytearray(data)
    flipped[offset] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="CRC-32 mismatch"):
        ckpt.load_checkpoint(tmp_path / "flipped.pt")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "config": {}, "x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        ckpt.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_a_plain_state_dict_is_not_a_checkpoint(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "sd.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"not an m2f_lite checkpoint.*convert"):
        ckpt.load_checkpoint(tmp_path / "sd.pt")


def test_mismatched_weights_are_reported_by_key(cfg, model):
    state = dict(model.state_dict())
    key = "transformer_decoder.class_embed.weight"
    state[key] = torch.zeros(3, 3)
    del state["transformer_decoder.query_feat.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model_state(build_model(cfg), state, source="w.pt")
    message = str(err.value)
    assert f"{key}: checkpoint (3, 3) vs model {tuple(model.state_dict()[key].shape)}" in message
    assert "missing: transformer_decoder.query_feat.weight" in message
    assert "unexpected: extra.weight" in message and message.startswith("w.pt does not fit")


def test_resume_config_check_allows_only_safe_fields():
    saved = get_config("shapes_tiny")
    safe = get_config(
        "shapes_tiny", ["solver.max_iter=10", "output_dir=elsewhere", "solver.eval_period=3"]
    )
    assert len(ckpt.check_resume_config(saved, safe, path="c.pt")) == 3
    changed = get_config(
        "shapes_tiny", ["model.num_queries=3", "solver.base_lr=1.0", "solver.max_iter=10"]
    )
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_resume_config(saved, changed, path="c.pt")
    message = str(err.value)
    assert "refusing to resume" in message and "model.num_queries: 20 -> 3" in message
    assert "solver.base_lr" in message and "solver.max_iter" not in message.split("Fields")[0]


def test_latest_checkpoint_prefers_final_then_the_largest_iteration(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for it in (500, 1500, 1000):
        (tmp_path / ckpt.checkpoint_name(it)).write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "model_0001500.pt"
    (tmp_path / "model_final.pt").write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "model_final.pt"


def test_initial_weights_whole_model_or_backbone(tmp_path, cfg, model):
    whole = ckpt.save_checkpoint(tmp_path / "whole.pt", model=model, config=cfg)
    target = build_model(cfg)
    assert ckpt.load_weights(target, whole) == "model"
    assert torch.equal(
        target.transformer_decoder.query_feat.weight, model.transformer_decoder.query_feat.weight
    )
    # a timm-style ResNet state dict (ImageNet weights) goes to the backbone, FrozenBN as official
    frozen = apply_overrides(cfg, {"model.backbone_norm": "frozen_bn"})
    timm_sd = {
        k.removeprefix("body."): v for k, v in build_model(frozen).backbone.state_dict().items()
    }
    torch.save(timm_sd, tmp_path / "resnet18.pth")
    target = build_model(frozen)
    assert ckpt.load_weights(target, tmp_path / "resnet18.pth") == "backbone"
    assert torch.equal(target.backbone.body.conv1.weight, timm_sd["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        ckpt.load_weights(target, tmp_path / "nope.pth")


def test_unwrap_removes_wrappers():
    inner = nn.Linear(1, 1)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = inner

    assert ckpt.unwrap(Wrapper()) is inner
