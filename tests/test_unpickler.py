"""The safe unpickler: real ``.pkl`` files of both kinds load, hostile ones of both kinds are refused.

The two kinds, written here the way their makers write them:

- the official ``tools/convert-pretrained-swin-model-to-d2.py``: ``torch.load`` of the Swin
  release, then ``pickle.dump({"model": tensors, "__author__": "third_party", ...})`` (torch
  tensors pickled by pickle itself: ``_rebuild_tensor_v2`` over ``_load_from_bytes`` storages);
- detectron2's model zoo: numpy arrays, at protocol 2 or, by numpy 2, at protocol 5
  (``numpy._core.numeric._frombuffer``).
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from m2f_lite.modeling.backbone import build_backbone
from m2f_lite.weights.backbone import load_pretrained_backbone, timm_to_detectron2_backbone
from m2f_lite.weights.unpickler import read_state_dict

SWIN = {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 1, 1)}
RESNET = {"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)}


def random_backbone(name: str, arch: dict, seed: int):
    backbone = build_backbone(name, **arch).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in backbone.state_dict().items():
            t.copy_(
                torch.rand(t.shape, generator=g) + 0.5
                if key.endswith("running_var")
                else torch.randn(t.shape, generator=g) * 0.2
            )
    return backbone


def features(backbone, x):
    with torch.no_grad():
        return list(backbone(x).values())


def official_swin_pkl(tmp_path, state: dict, protocol: int | None):
    """The official conversion script, step by step: a ``.pth`` release, then its pickle."""
    torch.save({"model": state}, tmp_path / "swin_release.pth")
    obj = torch.load(tmp_path / "swin_release.pth", map_location="cpu")["model"]
    res = {"model": obj, "__author__": "third_party", "matching_heuristics": True}
    path = tmp_path / f"swin_tiny_patch4_window7_224_p{protocol}.pkl"
    with path.open("wb") as f:
        pickle.dump(res, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, None, 5])  # None: pickle's default (the script's)
def test_an_official_swin_pkl_of_torch_tensors_loads(tmp_path, protocol):
    source = random_backbone("swin_tiny", SWIN, seed=0)
    state = timm_to_detectron2_backbone(source.state_dict(), "swin_tiny")
    state |= {"head.weight": torch.zeros(10, 64), "norm.weight": torch.ones(64)}  # the classifier
    # a view (offset and strides into a larger storage) must come back as the same values
    big = torch.randn(3, 20)
    state["patch_embed.proj.bias"] = big[1, 4:12]
    path = official_swin_pkl(tmp_path, state, protocol)
    loaded = read_state_dict(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    target = build_backbone("swin_tiny", **SWIN).eval()
    with torch.no_grad():
        source.body.patch_embed.proj.bias.copy_(big[1, 4:12])
    load_pretrained_backbone(target, str(path))
    x = torch.randn(1, 3, 64, 96)
    for a, b in zip(features(source, x), features(target, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_detectron2_pkl_of_numpy_arrays_loads_at_every_protocol(tmp_path, protocol):
    source = random_backbone("resnet50", RESNET, seed=1)
    official = {
        k: v.numpy()
        for k, v in timm_to_detectron2_backbone(source.state_dict(), "resnet50").items()
    }
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": official, "__author__": "torchvision"}, f, protocol=protocol)
    if protocol == 5:  # numpy >= 2 writes raw buffers through _frombuffer at protocol 5
        assert b"_frombuffer" in path.read_bytes()
    loaded = read_state_dict(path)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in official.items())
    target = build_backbone("resnet50", **RESNET).eval()
    load_pretrained_backbone(target, str(path))
    x = torch.randn(1, 3, 40, 56)
    for a, b in zip(features(source, x), features(target, x)):
        assert torch.equal(a, b)


class _System:
    """Unpickling this runs ``os.system``: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _HostileStorage:
    """A storage whose bytes are a hostile pickle, pickled as torch pickles storages."""

    def __init__(self, marker: str):
        self.payload = pickle.dumps(_System(marker), protocol=2)

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.payload,))


class _TensorOver:
    """``_rebuild_tensor_v2`` over anything, with any backward hooks."""

    def __init__(self, storage, hooks):
        self.storage, self.hooks = storage, hooks

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, (2,), (1,), False, self.hooks))


@pytest.mark.parametrize("protocol", [2, 5])
def test_hostile_numpy_kind_pickles_are_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    arrays = {"stem.conv1.weight": np.zeros((2, 2), np.float32), "x": _System(str(marker))}
    with path.open("wb") as f:
        pickle.dump({"model": arrays}, f, protocol=protocol)
    with pytest.raises(
        pickle.UnpicklingError, match=r"evil\.pkl: refusing to unpickle \w+\.system"
    ):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_hostile_torch_kind_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    storage = torch.arange(2, dtype=torch.float32).storage()  # as pickle sees a tensor's
    cases = {
        # a storage whose torch.save stream runs code: torch.load(weights_only=True) refuses it
        "inner": ({"x": _HostileStorage(str(marker))}, r"weights_only=True\) refused .*system"),
        # a tensor over something that is not a storage
        "not_a_storage": ({"x": _TensorOver(np.zeros(2, np.float32), OrderedDict())}, "ndarray"),
        # a tensor that would carry backward hooks
        "hooks": ({"x": _TensorOver(storage, OrderedDict({0: "hook"}))}, "backward hooks"),
    }
    for name, (model, message) in cases.items():
        path = tmp_path / f"{name}.pkl"
        with path.open("wb") as f:
            pickle.dump({"model": model}, f)
        with pytest.raises(pickle.UnpicklingError, match=message):
            read_state_dict(path)
    # torch functions outside the four allowed ones are refused by name
    path = tmp_path / "torch_load.pkl"
    with path.open("wb") as f:
        pickle.Pickler(f).dump(torch.load)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to unpickle torch\.serialization\.load"
    ):
        read_state_dict(path)
    assert not marker.exists()


def test_the_hostile_storage_would_run_without_the_safe_unpickler(tmp_path):
    """The hostile storage above is real: plain pickle runs its command (so refusing it matters)."""
    marker = tmp_path / "pwned"
    with pytest.raises(RuntimeError, match="magic number"):  # after the command has run
        pickle.load(io.BytesIO(pickle.dumps({"x": _HostileStorage(str(marker))})))
    assert marker.exists()
