"""The model zoo: every entry belongs to a preset of the right dataset and task, its commands parse
with the real ``m2f-lite`` parser, and ``download_weights`` fetches, verifies and converts offline."""

import hashlib
import os
import pickle
import shlex

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2f_lite.cli import build_parser
from m2f_lite.config import get_config
from m2f_lite.data.download import DownloadError
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.presets import PRESETS
from m2f_lite.weights import model_zoo
from m2f_lite.weights.detectron2 import to_detectron2

# cfg.data.dataset -> (zoo dataset, task): what each preset's data says
DATASET_OF_PRESET = {
    "coco_panoptic": ("coco", "panoptic"),
    "coco_instance": ("coco", "instance"),
    "ade20k_semantic": ("ade20k", "semantic"),
    "ade20k_panoptic": ("ade20k", "panoptic"),
    "cityscapes_semantic": ("cityscapes", "semantic"),
    "cityscapes_instance": ("cityscapes", "instance"),
    "cityscapes_panoptic": ("cityscapes", "panoptic"),
}


def test_every_entry_fits_its_preset():
    for name, e in model_zoo.ZOO.items():
        assert e.name == name and e.preset in PRESETS, name
        cfg = get_config(e.preset)
        assert DATASET_OF_PRESET[cfg.data.dataset] == (e.dataset, e.task), name
        assert e.metric == model_zoo.TASK_METRIC[e.task], name
        assert e.url.startswith(f"{model_zoo.URL_ROOT}/{e.dataset}/{e.task}/"), name
        assert model_zoo.md5_prefix(e.url) is not None, name  # the integrity check applies
        swin_l = e.backbone.startswith("Swin-L")
        assert e.gpus == (16 if swin_l else 8), name
        assert ("swin" in cfg.model.backbone) == e.backbone.startswith("Swin"), name
        assert e.pretrained.endswith(".pkl"), name
    assert len({e.url for e in model_zoo.ZOO.values()}) == len(model_zoo.ZOO)


def test_every_official_preset_has_an_entry_and_the_headline_values():
    assert sorted(model_zoo.ZOO) == sorted(p for p in PRESETS if not p.startswith("shapes_"))
    headline = {n: model_zoo.get_entry(n).paper for n in model_zoo.HEADLINE}
    assert headline["coco_panoptic_r50"] == 51.9 and headline["coco_panoptic_swin_l"] == 57.8
    assert headline["coco_instance_r50"] == 43.7 and headline["coco_instance_swin_l"] == 50.1
    assert headline["ade20k_semantic_r50"] == 47.2
    # the 200-query Swin-L recipes are the 200-query presets
    assert get_config("coco_panoptic_swin_l").model.num_queries == 200


def test_bad_name_lists_the_names():
    with pytest.raises(KeyError, match="coco_panoptic_r50") as info:
        model_zoo.get_entry("coco_panoptic_r51")
    assert "coco_panoptic_r51" in str(info.value)
    with pytest.raises(KeyError, match="no official checkpoint"):
        model_zoo.commands("shapes_tiny")


def _parse_m2f(argv: list[str]):
    """Parse an ``m2f-lite`` command line as ``m2f_lite.cli.main`` does; overrides must apply."""
    args, extra = build_parser().parse_known_args(argv)
    assert not extra or getattr(args, "takes_overrides", False), argv
    return args, extra


@pytest.mark.parametrize(
    "name", ["coco_panoptic_r50", "ade20k_semantic_swin_l", "cityscapes_instance_swin_l"]
)
@pytest.mark.parametrize("data_root", ["data", "/datasets"])
def test_commands_are_real_cli_commands(name, data_root):
    e = model_zoo.get_entry(name)
    cmds = model_zoo.commands(name, data_root=data_root)
    assert set(cmds) == {"data", "weights", "eval", "train", "expected"}
    seen = set()
    for key in ("data", "weights", "eval", "train"):
        for line in cmds[key].splitlines():
            argv = shlex.split(line, comments=True)
            if argv[0] == "m2f-lite":
                args, extra = _parse_m2f(argv[1:])
            elif argv[0] == "torchrun":
                assert argv[argv.index("-m") + 1] == "m2f_lite.cli", line
                nproc = next(a for a in argv if a.startswith("--nproc_per_node="))
                nodes = next((a for a in argv if a.startswith("--nnodes=")), "--nnodes=1")
                assert int(nproc.split("=")[1]) * int(nodes.split("=")[1]) == e.gpus, line
                args, extra = _parse_m2f(argv[argv.index("-m") + 2 :])
            else:
                assert argv[0] in ("curl", "test"), line
                continue
            seen.add(args.command)
            if args.command == "data":
                assert args.name == e.dataset and args.root == data_root
            if args.command in ("train", "eval"):
                cfg = get_config(e.preset, extra)  # the overrides are real config keys
                assert cfg.data.root.startswith(f"{data_root}/"), line
            if args.command == "weights":
                assert args.name == name and args.root == "weights"
            if args.command == "eval":
                assert args.model == f"weights/{name}.pt"
    assert seen == {"data", "weights", "eval", "train"}
    assert str(e.paper) in cmds["expected"] and str(e.gpus) in cmds["expected"]


def _official_pkl(path, seed=0):
    """A model-zoo style .pkl (numpy arrays under the official names) of the shapes_tiny model."""
    torch.manual_seed(seed)
    model = build_model(get_config("shapes_tiny", ["model.backbone_norm=frozen_bn"])).eval()
    sd = to_detectron2(model.state_dict(), backbone=PRESETS["shapes_tiny"]["model.backbone"])
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)
    return model


def _entry(url: str) -> model_zoo.ZooEntry:
    return model_zoo.ZooEntry(
        name="shapes_tiny", preset="shapes_tiny", task="panoptic", dataset="shapes",
        backbone="R18", metric="PQ", paper=0.0, url=url, gpus=1, train_time="",
    )  # fmt: skip


def test_download_weights_offline_fetches_verifies_and_converts(tmp_path):
    src = tmp_path / "src" / "staging.pkl"
    src.parent.mkdir()
    model = _official_pkl(src)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    official = src.with_name(f"model_final_{md5[:6]}.pkl")  # the official naming: md5 prefix
    src.rename(official)
    logs = []
    dst = model_zoo.download_weights(
        _entry(official.as_uri()), tmp_path / "weights", log=logs.append, progress=False
    )
    assert dst == tmp_path / "weights" / "shapes_tiny.pt"
    state = torch.load(dst, weights_only=True)
    assert state["config"]["name"] == "shapes_tiny"
    loaded = build_model(get_config("shapes_tiny", ["model.backbone_norm=frozen_bn"]))
    loaded.load_state_dict(state["model"])
    for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # a second call finds the converted file
    again = model_zoo.download_weights(
        _entry("file:///nonexistent/x.pkl"), tmp_path / "weights", log=logs.append
    )
    assert again == dst and "already converted" in logs[-1]


def test_download_weights_refuses_a_file_whose_md5_disagrees_with_its_name(tmp_path):
    src = tmp_path / "model_final_000000.pkl"
    _official_pkl(src)
    with pytest.raises(DownloadError, match="000000"):
        model_zoo.download_weights(
            _entry(src.as_uri()), tmp_path / "w", log=lambda s: None, progress=False
        )
    assert (
        not list((tmp_path / "w").rglob("*.pkl"))
        and not (tmp_path / "w" / "shapes_tiny.pt").exists()
    )


def test_download_weights_by_name_uses_the_entry_url(tmp_path, monkeypatch):
    seen = []

    def fake_download(url, dest, **kwargs):
        seen.append(url)
        raise DownloadError(f"{url}: offline test")

    monkeypatch.setattr("m2f_lite.data.download.download_file", fake_download)
    with pytest.raises(DownloadError, match="offline test"):
        model_zoo.download_weights("coco_panoptic_r50", tmp_path, log=lambda s: None)
    assert seen == [model_zoo.get_entry("coco_panoptic_r50").url]


def test_the_weights_command_downloads_converts_and_names_bad_input(tmp_path, monkeypatch, capsys):
    from m2f_lite.cli import main

    src = tmp_path / "staging.pkl"
    _official_pkl(src)
    official = src.with_name(f"model_final_{hashlib.md5(src.read_bytes()).hexdigest()[:6]}.pkl")
    src.rename(official)
    monkeypatch.setitem(model_zoo.ZOO, "shapes_tiny", _entry(official.as_uri()))
    assert main(["weights", "shapes_tiny", "--root", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "shapes_tiny.pt").is_file()
    assert f"wrote {tmp_path / 'w' / 'shapes_tiny.pt'}" in capsys.readouterr().out

    assert main(["weights", "coco_panoptic_r5O"]) == 2  # a typo: the rows are listed
    assert "not a model zoo row; one of: coco_panoptic_r50" in capsys.readouterr().err

    bad = tmp_path / "model_final_000000.pkl"
    _official_pkl(bad)
    monkeypatch.setitem(model_zoo.ZOO, "shapes_tiny", _entry(bad.as_uri()))
    assert main(["weights", "shapes_tiny", "--root", str(tmp_path / "v")]) == 2  # md5 mismatch
    assert "000000" in capsys.readouterr().err
