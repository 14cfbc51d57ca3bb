"""``m2f-lite data download NAME``: fetch the official archives, verify them, extract them.

What is fetched (``--root data`` puts each dataset in its folder under ``data/``):

- ``coco`` -> ``data/coco/``: ``train2017.zip`` (18 GB) and ``val2017.zip`` (778 MB) images,
  ``annotations_trainval2017.zip`` (instances JSON) and ``panoptic_annotations_trainval2017.zip``
  (panoptic JSON + zipped PNGs; ``prepare coco`` unpacks those and makes ``panoptic_semseg_*``).
- ``ade20k`` -> ``data/ADEChallengeData2016/``: ``ADEChallengeData2016.zip`` (SceneParsing, about 1 GB).
- ``cityscapes`` -> ``data/cityscapes/``: needs a login, so it is not fetched; the command prints
  the steps, then verifies and extracts ``gtFine_trainvaltest.zip`` and
  ``leftImg8bit_trainvaltest.zip`` once you have put them in ``data/cityscapes/`` (or ``data/``).

Downloads are resumable (``.part`` file + HTTP Range) and atomic (renamed into place only once
complete and verified); a checksum mismatch is refused and the bad file removed. The MD5 sums
below are not published by the dataset owners; they are the values that independent projects
(torchvision-style loaders, PaddleDetection, gluoncv mirrors) check against and agree on. A file
whose sum is ``None`` is reported as unverified.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download or an archive failed; the message names the URL or the file."""


@dataclass(frozen=True)
class Remote:
    name: str  # the archive's file name
    url: str
    md5: str | None  # None: no trustworthy sum known, the file is reported as unverified
    done: str  # a path (relative to the dataset folder) that exists once it is extracted


SOURCES: dict[str, tuple[str, list[Remote]]] = {  # name -> (folder under --root, archives)
    "coco": ("coco", [
        Remote("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
               "442b8da7639aecaf257c1dceb8ba8c80", "val2017"),
        Remote("annotations_trainval2017.zip",
               "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
               "f4bbac642086de4f52a3fdda2de5fa2c", "annotations/instances_val2017.json"),
        Remote("panoptic_annotations_trainval2017.zip",
               "http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip",
               "4170db65fc022c9c296af880dbca6055", "annotations/panoptic_val2017.json"),
        Remote("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
               "cced6f7f71b7629ddf16f17bbcfab6b2", "train2017"),
    ]),
    "ade20k": ("", [
        Remote("ADEChallengeData2016.zip", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
               "7328b3957e407ddae1d3cbf487f149ef", "ADEChallengeData2016/images"),
    ]),
}

CITYSCAPES = [  # (archive, download page): a free account at cityscapes-dataset.com is required
    Remote("gtFine_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=1", None, "gtFine"),
    Remote("leftImg8bit_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=3", None,
           "leftImg8bit"),
]

CITYSCAPES_STEPS = """Cityscapes needs a (free) account, so m2f-lite cannot download it for you:
  1. register at https://www.cityscapes-dataset.com/register/ and log in;
  2. download gtFine_trainvaltest.zip (241 MB, {0})
     and leftImg8bit_trainvaltest.zip (11 GB, {1}),
     in a browser or with: wget --keep-session-cookies --save-cookies=c.txt --post-data
     'username=USER&password=PASS&submit=Login' https://www.cityscapes-dataset.com/login/ ; then
     wget --load-cookies c.txt --content-disposition '<download page above>';
  3. put both zips in {2}/ and run this command again: it extracts them there;
  4. run `m2f-lite data prepare cityscapes --root {3}` for the train-id and panoptic files."""


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    opener: Callable = urllib.request.urlopen,
    chunk: int = 1 << 20,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest``: resumes a ``dest.part`` left by an interrupted run (HTTP Range),
    verifies ``md5`` when given, and renames into place only then. A complete ``dest`` with the
    right sum is not fetched again. A mismatch deletes the download and raises ``DownloadError``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5:
            log(
                f"{dest.name}: already present{'' if md5 else ' (unverified: no published checksum)'}"
            )
            return dest
        log(f"{dest.name}: present but its MD5 is wrong; downloading again")
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with opener(request) as response:
            status = getattr(response, "status", None) or response.getcode()
            resumed = have > 0 and status == 206
            if have and not resumed:
                log(f"{dest.name}: the server cannot resume; starting again")
            total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            start = have if resumed else 0
            bar = tqdm(
                total=int(total) + start if total else None,
                initial=start,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            )
            with bar, open(part, "ab" if resumed else "wb") as f:
                while block := response.read(chunk):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:  # URLError, HTTPError, connection resets: the .part stays for a resume
        raise DownloadError(f"{url}: download failed ({e}); run the command again to resume") from e
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DownloadError(
                f"{url}: MD5 {got} differs from the expected {md5}; the file was deleted"
            )
    else:
        log(f"{dest.name}: downloaded, unverified (no published checksum)")
    os.replace(part, dest)
    return dest


def _safe_members(names: list[str], archive: Path) -> None:
    """Refuse archive members that would land outside the target folder."""
    for n in names:
        p = PurePosixPath(n.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts:
            raise DownloadError(f"{archive}: refusing to extract {n!r} (outside the target folder)")


def extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .zip or .tar(.gz) into ``dest``; a member escaping ``dest`` is refused."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist(), archive)
                z.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members([m.name for m in members], archive)
                if any(m.issym() or m.islnk() or m.isdev() for m in members):
                    raise DownloadError(f"{archive}: refusing links or devices inside the archive")
                t.extractall(dest, members=members)
        else:
            raise DownloadError(f"{archive}: neither a zip nor a tar archive (truncated download?)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DownloadError(
            f"{archive}: corrupt archive ({e}); delete it and download again"
        ) from e
    return dest


def download(
    name: str,
    root: str | Path = "data",
    *,
    opener: Callable = urllib.request.urlopen,
    keep_archives: bool = True,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Download and extract dataset ``name`` (coco, ade20k, cityscapes) under ``root``."""
    root = Path(root)
    if name == "cityscapes":
        return _cityscapes(root, log)
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}: expected one of coco, ade20k, cityscapes")
    sub, remotes = SOURCES[name]
    folder = root / sub
    for r in remotes:
        if (folder / r.done).exists():
            log(f"{r.name}: already extracted ({folder / r.done})")
            continue
        log(f"{r.name}: downloading {r.url}")
        path = download_file(
            r.url, root / "downloads" / r.name, md5=r.md5, opener=opener, log=log, progress=progress
        )
        log(f"{r.name}: extracting into {folder}")
        extract(path, folder)
        if not keep_archives:
            path.unlink()
    log(
        f"{name}: done, in {folder}"
        + ("; next: m2f-lite data prepare coco" if name == "coco" else "")
    )
    return folder


def _cityscapes(root: Path, log: Callable[[str], None]) -> Path:
    folder = root / "cityscapes"
    found = {
        r.name: next((p for p in (folder / r.name, root / r.name) if p.exists()), None)
        for r in CITYSCAPES
    }
    if all((folder / r.done).is_dir() for r in CITYSCAPES):
        log(f"cityscapes: already extracted in {folder}")
        return folder
    missing = [n for n, p in found.items() if p is None]
    if missing:
        steps = CITYSCAPES_STEPS.format(CITYSCAPES[0].url, CITYSCAPES[1].url, folder, root)
        raise DownloadError(
            f"cityscapes: {', '.join(missing)} not found in {folder} or {root}.\n{steps}"
        )
    for r in CITYSCAPES:
        if not (folder / r.done).is_dir():
            log(f"{r.name}: unverified (no published checksum); extracting into {folder}")
            extract(found[r.name], folder)
    log(f"cityscapes: done, in {folder}; next: m2f-lite data prepare cityscapes --root {root}")
    return folder
