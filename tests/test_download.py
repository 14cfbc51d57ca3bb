"""Download (resume, atomic, checksums), extraction safety and prepare, on local files only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import fake_cityscapes, fake_coco

from m2f_lite.cli import main as cli_main
from m2f_lite.config import get_config
from m2f_lite.data import download as dl
from m2f_lite.data.build import build_dataset
from m2f_lite.data.cityscapes import cityscapes_panoptic
from m2f_lite.data.files import rgb2id
from m2f_lite.data.prepare import prepare

# pycocotools calls np.array(..., copy=False) on an object without the copy keyword (numpy 2)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
)

PAYLOAD = bytes(range(256)) * 40  # 10 KiB
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int = 200, fail_after: int | None = None):
        super().__init__(data)
        self.status, self.fail_after = status, fail_after

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(
            n if self.fail_after is None else min(n, self.fail_after - self.tell()) or 1
        )


class FakeServer:
    """An opener serving ``files[url]``, honouring Range (206) unless ``ranges=False``."""

    def __init__(
        self, files: dict[str, bytes], *, ranges: bool = True, fail_after: int | None = None
    ):
        self.files, self.ranges, self.fail_after, self.requests = files, ranges, fail_after, []

    def __call__(self, request):
        self.requests.append(request)
        data, rng = self.files[request.full_url], request.get_header("Range")
        if rng and self.ranges:
            return FakeResponse(data[int(rng.split("=")[1].rstrip("-")) :], status=206)
        return FakeResponse(data, fail_after=self.fail_after)


def test_download_file_url_verifies_and_renames(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = dl.download_file(src.as_uri(), tmp_path / "out" / "a.bin", md5=MD5, log=lambda m: None)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "out" / "a.bin.part").exists()
    logs = []
    dl.download_file(
        "http://unused", dest, md5=MD5, opener=None, log=logs.append
    )  # present: not fetched
    assert "already present" in logs[0]


def test_checksum_mismatch_is_refused(tmp_path):
    server = FakeServer({"http://x/a.zip": PAYLOAD})
    with pytest.raises(dl.DownloadError, match="MD5"):
        dl.download_file(
            "http://x/a.zip", tmp_path / "a.zip", md5="0" * 32, opener=server, log=lambda m: None
        )
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part is left


def test_interrupted_download_resumes_with_range(tmp_path):
    url, dest = "http://x/a.zip", tmp_path / "a.zip"
    with pytest.raises(dl.DownloadError, match="resume"):
        dl.download_file(
            url,
            dest,
            md5=MD5,
            opener=FakeServer({url: PAYLOAD}, fail_after=4096),
            log=lambda m: None,
        )
    part = tmp_path / "a.zip.part"
    assert part.stat().st_size == 4096 and not dest.exists()
    server = FakeServer({url: PAYLOAD})
    dl.download_file(url, dest, md5=MD5, opener=server, log=lambda m: None)
    assert server.requests[0].get_header("Range") == "bytes=4096-"
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    # a server without Range support: the download starts again, and is still correct
    dest.unlink()
    part.write_bytes(PAYLOAD[:100])
    dl.download_file(
        url, dest, md5=MD5, opener=FakeServer({url: PAYLOAD}, ranges=False), log=lambda m: None
    )
    assert dest.read_bytes() == PAYLOAD


def test_unverified_files_say_so(tmp_path):
    logs = []
    dl.download_file(
        "http://x/a", tmp_path / "a", opener=FakeServer({"http://x/a": PAYLOAD}), log=logs.append
    )
    assert "unverified" in logs[-1]


def test_extract_refuses_escaping_members_and_corrupt_archives(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(dl.DownloadError, match="outside"):
        dl.extract(evil, tmp_path / "x")
    assert not (tmp_path / "outside.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as t:
        info = tarfile.TarInfo("a")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(dl.DownloadError, match="links"):
        dl.extract(link, tmp_path / "y")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(dl.DownloadError):
        dl.extract(bad, tmp_path / "z")


def test_official_sources_are_listed():
    urls = {r.name: r for _, rs in dl.SOURCES.values() for r in rs}
    assert urls["train2017.zip"].url == "http://images.cocodataset.org/zips/train2017.zip"
    assert (
        urls["ADEChallengeData2016.zip"].url
        == "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
    )
    assert all(len(r.md5) == 32 and int(r.md5, 16) >= 0 for r in urls.values())


def _zip(path, files: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path.read_bytes()


def test_download_and_prepare_coco_on_fake_archives(tmp_path, monkeypatch):
    src = tmp_path / "src" / "coco"
    fake_coco(src)
    inner = _zip(
        tmp_path / "panoptic_val2017.zip",
        {
            f"panoptic_val2017/{p.name}": p.read_bytes()
            for p in (src / "panoptic_val2017").iterdir()
        },
    )
    archives = {
        "train2017.zip": _zip(tmp_path / "t.zip", {"train2017/": b""}),
        "val2017.zip": _zip(
            tmp_path / "v.zip",
            {f"val2017/{p.name}": p.read_bytes() for p in (src / "val2017").iterdir()},
        ),
        "annotations_trainval2017.zip": _zip(
            tmp_path / "a.zip",
            {
                "annotations/instances_val2017.json": (
                    src / "annotations/instances_val2017.json"
                ).read_bytes()
            },
        ),
        "panoptic_annotations_trainval2017.zip": _zip(
            tmp_path / "p.zip",
            {
                "annotations/panoptic_val2017.json": (
                    src / "annotations/panoptic_val2017.json"
                ).read_bytes(),
                "annotations/panoptic_val2017.zip": inner,
            },
        ),
    }
    sub, remotes = dl.SOURCES["coco"]
    fakes = [dataclasses.replace(r, md5=hashlib.md5(archives[r.name]).hexdigest()) for r in remotes]
    monkeypatch.setitem(dl.SOURCES, "coco", (sub, fakes))
    server = FakeServer({r.url: archives[r.name] for r in remotes})
    root = tmp_path / "data"
    dl.download("coco", root, opener=server, log=lambda m: None)
    assert len(server.requests) == 4 and (root / "coco" / "val2017" / "000000000001.png").exists()
    dl.download("coco", root, opener=server, log=lambda m: None)
    assert len(server.requests) == 4  # already extracted: nothing fetched again
    prepare("coco", root, log=lambda m: None)
    semseg = root / "coco" / "panoptic_semseg_val2017" / "000000000001.png"
    cfg = get_config("coco_panoptic_r50", [f"data.root={root / 'coco'}", "data.min_size_test=0"])
    s = build_dataset(cfg, "val", train=False)[0]
    assert torch.equal(
        torch.from_numpy(np.asarray(Image.open(semseg)).astype(np.int64)), s["sem_seg"]
    )
    assert sorted(np.unique(np.asarray(Image.open(semseg))).tolist()) == [0, 80, 132, 255]


def test_cityscapes_needs_the_zips_then_prepares_panoptic(tmp_path, capsys):
    root = tmp_path / "data"
    assert cli_main(["data", "download", "cityscapes", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "packageID=1" in err and "register" in err and "gtFine_trainvaltest.zip" in err
    fake_cityscapes(tmp_path / "src")
    root.mkdir(exist_ok=True)
    for name, top in (
        ("gtFine_trainvaltest.zip", "gtFine"),
        ("leftImg8bit_trainvaltest.zip", "leftImg8bit"),
    ):
        _zip(
            root / name,
            {
                str(p.relative_to(tmp_path / "src")): p.read_bytes()
                for p in (tmp_path / "src" / top).rglob("*.png")
            },
        )
    dl.download("cityscapes", root, log=lambda m: None)
    assert cli_main(["data", "prepare", "cityscapes", "--root", str(root)]) == 0
    city = root / "cityscapes"
    data = json.loads((city / "gtFine" / "cityscapes_panoptic_val.json").read_text())
    (ann,) = data["annotations"]
    assert (
        ann["image_id"] == "aachen_000000_000019"
        and ann["file_name"] == "aachen_000000_000019_gtFine_panoptic.png"
    )
    segs = {s["id"]: s for s in ann["segments_info"]}
    assert set(segs) == {7, 23, 24001, 26, 26001, 26002}  # unlabeled and caravan are void
    assert segs[26]["iscrowd"] == 1 and segs[26001]["iscrowd"] == 0 and segs[7]["iscrowd"] == 0
    assert len(data["categories"]) == 19
    pan = rgb2id(
        np.asarray(Image.open(city / "gtFine" / "cityscapes_panoptic_val" / ann["file_name"]))
    )
    assert all(s["area"] == int((pan == i).sum()) for i, s in segs.items())
    s = cityscapes_panoptic(city, "val").get(0, transform=False)
    assert sorted(s["labels"].tolist()) == [
        0,
        10,
        11,
        13,
        13,
    ]  # road, sky, person, car, car (the group is crowd)
    train_ids = np.asarray(Image.open(next((city / "gtFine" / "val").rglob("*labelTrainIds.png"))))
    assert train_ids[0, 0] == 10 and train_ids[-1, 0] == 255
