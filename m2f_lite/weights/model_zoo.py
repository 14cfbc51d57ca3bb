"""The official Mask2Former checkpoints, as data: what each scored, where it is, how to reproduce it.

Every row comes from the official ``MODEL_ZOO.md`` (facebookresearch/Mask2Former): the backbone,
the single-scale result on the validation split, and the ``.pkl`` on dl.fbaipublicfiles.com.
``name`` is the m2f_lite preset the checkpoint belongs to. The model zoo reports the hardware
("8 NVIDIA V100 GPUs", "Swin-L models are trained with 16 NVIDIA V100 GPUs") but no training
times, so ``train_time`` stays empty: nothing here is a guess.

``get_entry(name)``, ``download_weights(name, root)`` (official .pkl -> m2f_lite .pt) and
``commands(name)`` (the shell commands that reproduce a row) read this table.
"""

from __future__ import annotations

import re
import shlex
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m2f_lite.presets import PRESETS

GPU_TYPE = "NVIDIA V100"  # MODEL_ZOO.md: "Big Basin servers with 8 NVIDIA V100 GPUs & NVLink"
URL_ROOT = "https://dl.fbaipublicfiles.com/maskformer/mask2former"
TASK_METRIC = {"panoptic": "PQ", "instance": "AP", "semantic": "mIoU"}


@dataclass(frozen=True)
class ZooEntry:
    """One official checkpoint: ``paper`` is MODEL_ZOO.md's single-scale ``metric`` (val split)."""

    name: str  # the m2f_lite preset name, e.g. "coco_panoptic_r50"
    preset: str
    task: str  # "panoptic" | "instance" | "semantic"
    dataset: str  # "coco" | "ade20k" | "cityscapes"
    backbone: str  # as MODEL_ZOO.md writes it: "R50", "Swin-L (IN21k)", ...
    metric: str  # "PQ" | "AP" | "mIoU"
    paper: float
    url: str  # the official model_final_<md5 prefix>.pkl
    gpus: int  # GPUs of the official run (GPU_TYPE)
    train_time: str  # as reported; "" when the sources do not say
    pretrained: str = ""  # MODEL.WEIGHTS of the official YAML: the ImageNet backbone to start from
    note: str = ""


# MODEL.WEIGHTS of the official YAMLs. Only R-50.pkl has a published URL (MODEL_ZOO.md); the others
# are local files that the official tools/ make from the Swin (or ResNet-101) releases.
_R50_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
_BACKBONES = {  # preset suffix -> (MODEL_ZOO.md's backbone column, MODEL.WEIGHTS of the YAML)
    "r50": ("R50", "R-50.pkl"),
    "r101": ("R101", "R-101.pkl"),
    "swin_t": ("Swin-T", "swin_tiny_patch4_window7_224.pkl"),
    "swin_s": ("Swin-S", "swin_small_patch4_window7_224.pkl"),
    "swin_b": ("Swin-B", "swin_base_patch4_window12_384.pkl"),
    "swin_l": ("Swin-L (IN21k)", "swin_large_patch4_window12_384_22k.pkl"),
}
_SWIN_CFG = {"swin_t": "swin_tiny", "swin_s": "swin_small", "swin_b": "swin_base_384"}

# (preset, official config name, md5 prefix, value); the config name is the URL's folder.
_ROWS: list[tuple[str, str, str, float]] = [
    ("coco_panoptic_r50", "maskformer2_R50_bs16_50ep", "94dc52", 51.9),
    ("coco_panoptic_r101", "maskformer2_R101_bs16_50ep", "b807bd", 52.6),
    ("coco_panoptic_swin_t", "", "9fd0ae", 53.2),
    ("coco_panoptic_swin_s", "", "a407fd", 54.6),
    ("coco_panoptic_swin_b", "", "9d7f02", 55.1),
    ("coco_panoptic_swin_l", "maskformer2_swin_large_IN21k_384_bs16_100ep", "f07440", 57.8),
    ("coco_instance_r50", "maskformer2_R50_bs16_50ep", "3c8ec9", 43.7),
    ("coco_instance_r101", "maskformer2_R101_bs16_50ep", "eba159", 44.2),
    ("coco_instance_swin_t", "", "86143f", 45.0),
    ("coco_instance_swin_s", "", "1e7f22", 46.3),
    ("coco_instance_swin_b", "", "f6e0f6", 46.7),
    ("coco_instance_swin_l", "maskformer2_swin_large_IN21k_384_bs16_100ep", "e5f453", 50.1),
    ("ade20k_semantic_r50", "maskformer2_R50_bs16_160k", "500878", 47.2),
    ("ade20k_semantic_r101", "maskformer2_R101_bs16_90k", "0d68be", 47.8),
    ("ade20k_semantic_swin_t", "maskformer2_swin_tiny_bs16_160k", "5274a6", 47.7),
    ("ade20k_semantic_swin_s", "maskformer2_swin_small_bs16_160k", "011c6d", 51.3),
    ("ade20k_semantic_swin_b", "maskformer2_swin_base_384_bs16_160k_res640", "503e96", 52.4),
    ("ade20k_semantic_swin_l", "maskformer2_swin_large_IN21k_384_bs16_160k_res640", "6b4a3a", 56.1),
    ("ade20k_panoptic_r50", "maskformer2_R50_bs16_160k", "5c90d4", 39.7),
    ("ade20k_panoptic_swin_l", "maskformer2_swin_large_IN21k_384_bs16_160k", "e0c58e", 48.1),
    ("cityscapes_panoptic_r50", "", "4ab90c", 62.1),
    ("cityscapes_panoptic_r101", "", "04d286", 62.4),
    ("cityscapes_panoptic_swin_t", "", "ceba0f", 63.9),
    ("cityscapes_panoptic_swin_s", "", "23efb7", 64.8),
    ("cityscapes_panoptic_swin_b", "", "fa840f", 66.1),
    ("cityscapes_panoptic_swin_l", "", "064788", 66.6),
    ("cityscapes_instance_r50", "", "01a8ed", 37.4),
    ("cityscapes_instance_r101", "", "c2b8c8", 38.5),
    ("cityscapes_instance_swin_t", "", "6a63f8", 39.7),
    ("cityscapes_instance_swin_s", "", "974824", 41.8),
    ("cityscapes_instance_swin_b", "", "7a3b6d", 42.0),
    ("cityscapes_instance_swin_l", "", "dfa862", 43.7),
    ("cityscapes_semantic_r50", "", "cc1b1f", 79.4),
    ("cityscapes_semantic_r101", "", "257ce8", 80.1),
    ("cityscapes_semantic_swin_t", "", "2d58d4", 82.1),
    ("cityscapes_semantic_swin_s", "", "fa26ae", 82.6),
    ("cityscapes_semantic_swin_b", "", "1c6b65", 83.3),
    ("cityscapes_semantic_swin_l", "", "17c1ee", 83.3),
]
_NOTES = {
    "ade20k_semantic_swin_l": "multi-scale + flip: 57.3 (MODEL_ZOO.md); 640x640 crops",
    "ade20k_semantic_swin_b": "640x640 crops",
    "coco_panoptic_swin_l": "200 queries, 100 epochs",
    "coco_instance_swin_l": "200 queries, 100 epochs",
}


def _config_name(preset: str, dataset: str) -> str:
    """The official config name where it follows the pattern (COCO Swin-T/S/B, all of Cityscapes)."""
    arch = preset.split("_", 2)[2]
    schedule = "bs16_90k" if dataset == "cityscapes" else "bs16_50ep"
    if arch in ("r50", "r101"):
        return f"maskformer2_{arch.upper()}_{schedule}"
    if dataset == "cityscapes" and arch in ("swin_b", "swin_l"):
        return (
            f"maskformer2_{'swin_base' if arch == 'swin_b' else 'swin_large'}_IN21k_384_{schedule}"
        )
    return f"maskformer2_{_SWIN_CFG[arch]}_{schedule}"


def _entry(preset: str, config: str, md5: str, value: float) -> ZooEntry:
    dataset, task, arch = preset.split("_", 2)
    backbone, pretrained = _BACKBONES[arch]
    if dataset == "cityscapes" and arch == "swin_b":  # Cityscapes has only the IN-21k Swin-B
        backbone, pretrained = "Swin-B (IN21k)", "swin_base_patch4_window12_384_22k.pkl"
    config = config or _config_name(preset, dataset)
    return ZooEntry(
        name=preset,
        preset=preset,
        task=task,
        dataset=dataset,
        backbone=backbone,
        metric=TASK_METRIC[task],
        paper=value,
        url=f"{URL_ROOT}/{dataset}/{task}/{config}/model_final_{md5}.pkl",
        gpus=16 if arch == "swin_l" else 8,
        train_time="",
        pretrained=pretrained,
        note=_NOTES.get(preset, ""),
    )


ZOO: dict[str, ZooEntry] = {row[0]: _entry(*row) for row in _ROWS}
# the rows of the paper's headline claims (abstract), and one per Cityscapes task
HEADLINE = (
    "coco_panoptic_r50 coco_panoptic_swin_l coco_instance_r50 coco_instance_swin_l ade20k_semantic_r50"
    " ade20k_semantic_swin_l cityscapes_panoptic_r50 cityscapes_instance_r50 cityscapes_semantic_r50"
).split()


def get_entry(name: str) -> ZooEntry:
    """The official checkpoint of preset ``name``; a KeyError lists the names that have one."""
    if name not in ZOO:
        raise KeyError(f"no official checkpoint for {name!r}; the model zoo has: {', '.join(ZOO)}")
    return ZOO[name]


def md5_prefix(url_or_path: str | Path) -> str | None:
    """The md5 prefix an official file name carries (``model_final_94dc52.pkl`` -> ``94dc52``)."""
    m = re.fullmatch(r"model_final_([0-9a-f]{6})\.pkl", Path(str(url_or_path)).name)
    return m.group(1) if m else None


def download_weights(
    name: str | ZooEntry,
    root: str | Path = "weights",
    *,
    url: str | None = None,
    opener: Callable = urllib.request.urlopen,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Fetch the official ``.pkl`` of ``name`` into ``root`` and convert it: ``root/<name>.pt``.

    The download resumes and is atomic (``m2f_lite.data.download.download_file``); the file's MD5
    must start with the prefix its official name carries (MODEL_ZOO.md's integrity check). The
    conversion is ``m2f-lite convert`` (``m2f_lite.weights.convert.convert_main``) with the entry's
    preset, which refuses weights that do not fit it. ``url`` replaces the entry's (a mirror, or a
    ``file://`` URL). An existing ``root/<name>.pt`` is returned as is.
    """
    from m2f_lite.data.download import DownloadError, download_file, md5sum
    from m2f_lite.weights.convert import convert_main

    entry = name if isinstance(name, ZooEntry) else get_entry(name)
    root = Path(root)
    dst = root / f"{entry.name}.pt"
    if dst.exists():
        log(f"{dst}: already converted")
        return dst
    url = url or entry.url
    pkl = root / "official" / f"{entry.name}-{url.rsplit('/', 1)[-1]}"
    download_file(url, pkl, opener=opener, log=log, progress=progress)
    prefix = md5_prefix(url)
    if prefix is not None and not md5sum(pkl).startswith(prefix):
        pkl.unlink()
        raise DownloadError(f"{url}: the file's MD5 does not start with {prefix}; removed it")
    if prefix is not None:
        log(f"{pkl.name}: its MD5 starts with {prefix}, as its official name says")
    report = convert_main(str(pkl), str(dst), source="detectron2", preset=entry.preset)
    log(f"{dst}: converted from {pkl.name} ({report})")
    return dst


def commands(
    name: str, *, data_root: str = "data", weights_root: str = "weights"
) -> dict[str, str]:
    """The shell commands that reproduce a row: ``data``, ``weights``, ``eval``, ``train``, and
    ``expected`` (what the official run used). One command per line."""
    e = get_entry(name)
    pt = f"{weights_root}/{e.name}.pt"
    data = [f"m2f-lite data download {e.dataset} --root {data_root}"]
    if e.dataset in ("coco", "cityscapes"):  # ADE20K semantic needs no derived files
        data.append(f"m2f-lite data prepare {e.dataset} --root {data_root}")
    # downloads ROOT/official/<name>-model_final_*.pkl, checks its md5 prefix, converts to ROOT/<name>.pt
    weights = [f"m2f-lite weights {e.name} --root {weights_root}"]
    pretrained = f"{weights_root}/{e.pretrained}"
    if e.pretrained == "R-50.pkl":
        fetch = f"curl -L --create-dirs -o {pretrained} {_R50_URL}"
    else:  # no published URL: the official tools/ convert the backbone release
        fetch = f"test -f {pretrained}  # made by the official tools/ from the backbone's release"
    launcher = "torchrun --nproc_per_node=8"
    if e.gpus > 8:  # two 8-GPU machines: run this on both, with HOST = the first one
        launcher = f"torchrun --nnodes={e.gpus // 8} --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500"
    train = f"{launcher} -m m2f_lite.cli train {e.preset} --weights={pretrained}"
    evaluate = f"m2f-lite eval {pt}"
    if data_root != "data":  # the presets read data/<dataset folder>
        folder = PRESETS[e.preset]["data.root"].removeprefix("data/")
        override = f" --data.root={shlex.quote(f'{data_root}/{folder}')}"
        train, evaluate = train + override, evaluate + override
    from m2f_lite.config import get_config

    s = get_config(e.preset).solver
    expected = (
        f"{e.metric} {e.paper} on {e.dataset} val (single scale); official run: {e.gpus} x "
        f"{GPU_TYPE}, {s.max_iter} iterations at batch {s.ims_per_batch}; training time: "
        + (e.train_time or "not reported by the official model zoo")
    )
    return {
        "data": "\n".join(data),
        "weights": "\n".join(weights),
        "eval": evaluate,
        "train": f"{fetch}\n{train}",
        "expected": expected,
    }
