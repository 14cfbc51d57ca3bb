"""Every chapter, run as Colab runs it: alone, from an installed package (``make test-nb``).

"Launch -> Colab" opens one notebook with no clone of the repository beside it; its set-up cell
installs ``m2f_lite[book]`` and everything else must come from the installed package. This script
does the same on this machine, outside the repository:

1. builds a wheel of the package from a copy of its sources (``pip wheel``, no build
   isolation: no download);
2. installs it with the ``book`` extra into a fresh virtual environment in a temporary folder
   (torch from the machine's pip cache or disk), plus nbval;
3. checks that the chapters' install requirement keeps a torch that is already installed
   (``pip install --dry-run --report``, as on Colab, which ships its own, newer torch);
4. copies each chapter notebook alone into an empty folder and executes it there under nbval
   (``--nbval-lax``: the cells tagged ``nbval-check-output`` compare their outputs), with the
   working directory outside the repository, no ``PYTHONPATH`` and ``M2F_BOOK_DIR`` in the
   temporary folder (the chapter says where its files go);
5. writes each chapter's time to ``timings.json`` in the temporary folder and prints them; the
   temporary folder is removed when every chapter passed (``--work DIR`` keeps it).

Usage: ``python tests/standalone.py [--work DIR] [--jobs 2] [--full NOTEBOOK ...] [NOTEBOOK ...]``
(``--full``: those chapters once more with ``M2F_BOOK_MODE=full``, the sizes of a GPU).
Exit status: nbval's (0 when every cell passes), 1 when the dry run would replace torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the chapters need beyond the book extra to be *tested* (Colab needs neither)
TEST_REQUIREMENTS = ["pytest", "pytest-xdist", "nbval"]


def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def build_wheel(work: Path) -> Path:
    """A wheel built from a copy of the sources (the files git tracks or would track), as pip
    builds one from the repository's URL; the clone itself gets no ``build/`` folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    source = work / "src"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a deleted file git still tracks is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)  # a link is copied as its content
    dist = work / "dist"
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        dist,
        source,
    )
    (wheel,) = dist.glob("m2f_lite-*.whl")
    return wheel


# Run by the project's .venv's python: the distributions torch and torchvision need (extras
# followed) and, for each, the paths under site-packages that belong to it.
_TORCH_FILES = r"""
import importlib.metadata as md, json, re, sys
from packaging.requirements import Requirement
seen, todo, paths = set(), [("torch", ()), ("torchvision", ())], set()
while todo:
    name, extras = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    if (key, extras) in seen:
        continue
    seen.add((key, extras))
    for f in dist.files or []:
        top = f.parts[0]
        if top != ".." and not top.endswith(".pth") and top != "__pycache__":
            paths.add(top)
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in ("", *extras)
        ):
            todo.append((req.name, tuple(sorted(req.extras))))
print(json.dumps(sorted(paths)))
"""


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    done = subprocess.run([str(python), "-c", code], check=True, text=True, capture_output=True)
    return Path(done.stdout.strip())


def make_venv(work: Path) -> Path:
    """A fresh venv that holds torch and torchvision (and what they need) only, as Colab's stack
    holds them already. They are linked from the project's ``.venv`` when it has them (seconds,
    where pip needs minutes to copy the 5 GB CUDA build again), else installed by pip."""
    venv = work / "venv"
    sh(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    project = REPO / ".venv" / "bin" / "python"
    if not project.exists():
        sh(python, "-m", "pip", "install", "-q", "torch", "torchvision")
        return python
    found = subprocess.run(
        [str(project), "-c", _TORCH_FILES], check=True, text=True, capture_output=True
    )
    source, target = _site_packages(project), _site_packages(python)
    names = json.loads(found.stdout)
    for name in names:
        if (source / name).exists() and not (target / name).exists():
            (target / name).symlink_to(source / name)
    print(f"linked {len(names)} paths of torch, torchvision and their requirements from .venv")
    return python


def chapters_requirement() -> str:
    """The requirement string of the chapters' set-up cell (the same in every chapter)."""
    found = set()
    for notebook in sorted((REPO / "book").glob("[0-9][0-9]_*.ipynb")):
        source = "".join(json.loads(notebook.read_text())["cells"][1]["source"])
        found.update(re.findall(r'REQUIREMENT = "([^"]+)"', source))
    if len(found) != 1:
        raise SystemExit(f"the chapters' set-up cells disagree on the requirement: {found}")
    return found.pop()


def dry_run_keeps_torch(python: Path, wheel: Path, work: Path) -> bool:
    """``pip install --dry-run`` of the chapters' requirement, the wheel standing in for its git
    URL, in the venv that has torch: True when pip would install no other torch (its report is
    ``dry_run.json``)."""
    name = chapters_requirement().split("@")[0].strip()  # "m2f_lite[book]"
    extras = name[name.index("[") :] if "[" in name else ""
    report = work / "dry_run.json"
    sh(python, "-m", "pip", "install", "-q", "--dry-run", "--report", report, f"{wheel}{extras}")
    names = sorted(
        item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]
    )
    print(f"pip install --dry-run {name} would install: {', '.join(names)}")
    return not {"torch", "torchvision"} & set(names)


def run_chapters(
    python: Path, work: Path, notebooks: list[Path], jobs: int, env: dict, mode: str
) -> int:
    """nbval over each notebook alone in its own empty folder under ``work/chapters-MODE``;
    adds each chapter's seconds to ``work/timings.json``."""
    env = {**env, "M2F_BOOK_MODE": mode}
    root = work / f"chapters-{mode}"
    for notebook in notebooks:
        folder = root / notebook.stem
        folder.mkdir(parents=True)
        shutil.copy(notebook, folder / notebook.name)  # the notebook alone, nothing beside it
    junit = work / f"junit-{mode}.xml"
    start = time.perf_counter()
    status = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--nbval-lax",
            "--nbval-current-env",
            f"--junitxml={junit}",
            *(["-n", str(jobs), "--dist", "loadfile"] if jobs > 1 else []),
            ".",
        ],
        cwd=root,
        env=env,
    ).returncode
    wall = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for case in ET.parse(junit).iter("testcase"):
        name = Path(case.get("file") or case.get("classname", "").replace(".", "/")).stem
        chapter = next(
            (n.stem for n in notebooks if n.stem in (case.get("classname") or name)), name
        )
        seconds[chapter] = seconds.get(chapter, 0.0) + float(case.get("time", 0))
    file = work / "timings.json"
    timings = json.loads(file.read_text()) if file.exists() else {}
    timings[mode] = {
        "wall_seconds": round(wall, 1),
        "jobs": jobs,
        "chapters": {k: round(v, 1) for k, v in sorted(seconds.items())},
    }
    file.write_text(json.dumps(timings, indent=2))
    print(f"chapters run alone from the installed wheel, {mode} mode ({jobs} at a time), seconds:")
    for chapter, s in timings[mode]["chapters"].items():
        print(f"  {chapter:40s} {s:6.1f}")
    print(f"  {'(wall clock)':40s} {wall:6.1f}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: book/NN_*.ipynb")
    parser.add_argument("--work", type=Path, help="a new folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--full",
        nargs="*",
        default=[],
        metavar="NOTEBOOK",
        type=Path,
        help="notebooks to run again in full mode (M2F_BOOK_MODE=full: the GPU "
        "sizes), proving that code path on the CPU",
    )
    args = parser.parse_args(argv)
    notebooks = [n.resolve() for n in args.notebooks] or sorted(
        (REPO / "book").glob("[0-9][0-9]_*.ipynb")
    )
    if args.work is not None:
        args.work.mkdir(parents=True)  # a new folder: refuses one that exists
    work = (args.work or Path(tempfile.mkdtemp(prefix="m2f_standalone_"))).resolve()
    print(f"standalone chapters in {work}")
    wheel = build_wheel(work)
    python = make_venv(work)
    if not dry_run_keeps_torch(python, wheel, work):
        print("error: the book extra would replace the installed torch", file=sys.stderr)
        return 1
    sh(python, "-m", "pip", "install", "-q", f"{wheel}[book]", *TEST_REQUIREMENTS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # one kernel per core
        M2F_BOOK_DIR=str(work / "book_files"),
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(work / "home"),  # nothing into the user's home either
    )
    (work / "home").mkdir()
    status = run_chapters(python, work, notebooks, args.jobs, env, "quick")
    if args.full:
        full = [n.resolve() for n in args.full]
        status = run_chapters(python, work, full, args.jobs, env, "full") or status
    if args.work is None and status == 0:  # a temporary folder of 0.6 GB: kept only on failure
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
