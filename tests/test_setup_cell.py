"""The chapters' set-up cell, as Colab runs it: the same in every chapter, quiet when m2f_lite is
there, one line when pip fails (not pip's output, not a CalledProcessError traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.ipynb"))
# what Colab lacks: m2f_lite is not importable, so the cell's install branch runs
NOT_INSTALLED = """\
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "m2f_lite" else _find_spec(name, *a)
"""


def setup_cell(notebook: Path) -> str:
    return "".join(json.loads(notebook.read_text())["cells"][1]["source"])


def install_part(source: str) -> str:
    """The cell up to its first use of the package (``from m2f_lite import book``)."""
    return source[: source.index("from m2f_lite import book")]


def run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


def test_every_chapter_has_the_same_set_up_cell():
    cells = {install_part(setup_cell(n)) for n in CHAPTERS}
    assert len(CHAPTERS) >= 10 and len(cells) == 1
    (cell,) = cells
    assert 'REQUIREMENT = "m2f_lite[book] @ git+https://github.com/' in cell


def test_the_set_up_cell_is_quiet_when_the_package_is_installed(tmp_path):
    done = run(install_part(setup_cell(CHAPTERS[0])), tmp_path)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_a_failing_install_is_one_line(tmp_path):
    """pip cannot install (here: a requirement that does not exist, offline): the cell stops
    with one line naming pip's reason, and runs nothing after it."""
    cell = install_part(setup_cell(CHAPTERS[0]))
    missing = tmp_path / "no_such_project"
    start = cell.index('REQUIREMENT = "') + len('REQUIREMENT = "')
    end = cell.index('"', start)
    cell = cell[:start] + f"m2f_lite[book] @ file://{missing}" + cell[end:]
    done = run(NOT_INSTALLED + cell + "print('after the install')\n", tmp_path)
    assert done.returncode == 1 and "after the install" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pip could not install m2f_lite: "), lines
    assert "Traceback" not in done.stderr
