"""``m2f-lite grade``: the score tables of a solved, an untouched, a half-solved and a hostile
notebook, and nothing outside the grader's temporary folder harmed.

The notebooks are chapter 1's exercise section (its exercises, stubs and checks, the imports
they need) made from the book as the student edition and as the solutions would fill it: the
whole chapter runs the same way, only slower.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import nbformat
import pytest

from m2f_lite import cli, student
from m2f_lite.exercises import EXERCISES

pytestmark = pytest.mark.xdist_group("kernels")  # each test starts Jupyter kernels
CHAPTER = 1


def exercise_section(chapter: int = CHAPTER) -> nbformat.NotebookNode:
    """The chapter from its "## Exercises" heading on, after a cell with the imports."""
    nb = nbformat.read(student.chapter_notebooks()[chapter], as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "## Exercises" in c.source)
    nb.cells = [nbformat.v4.new_code_cell("import numpy as np\nimport torch"), *nb.cells[first:]]
    return nb


def solved(nb: nbformat.NotebookNode, numbers: set[int]) -> nbformat.NotebookNode:
    """The student edition with the stubs of ``numbers`` replaced by the book's solutions."""
    blocks = student.solution_blocks(nb)
    out = student.student_notebook(nb, CHAPTER)
    stubs = student.stub_cells(out, CHAPTER)
    for ex in EXERCISES[CHAPTER]:
        if ex.number in numbers:
            code = [c.source for c in blocks[ex.label] if c.cell_type == "code"]
            out.cells[stubs[ex.number]].source = "\n\n".join(code)
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """``m2f-lite grade`` on the solved, the untouched and the half-solved notebook."""
    folder = tmp_path_factory.mktemp("submissions")
    nb = exercise_section()
    numbers = {ex.number for ex in EXERCISES[CHAPTER]}
    for name, solved_ones in (("solved", numbers), ("untouched", set()), ("half", {1, 3})):
        nbformat.write(solved(nb, solved_ones), folder / f"{name}.ipynb")
    out = folder / "grades"
    names = [str(folder / f"{n}.ipynb") for n in ("solved", "untouched", "half")]
    assert cli.main(["grade", *names, "--out", str(out), "--timeout", "120"]) == 0
    return out


def _report(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_solved_chapter_gets_full_marks(graded):
    report = _report(graded, "solved")
    assert report["total"] == report["max_total"] == sum(e.points for e in EXERCISES[CHAPTER])
    assert [e["exercise"] for e in report["exercises"]] == ["1.1", "1.2", "1.3", "1.4"]
    assert report["cell_errors"] == []


def test_untouched_student_edition_scores_zero_with_every_message(graded):
    report = _report(graded, "untouched")
    assert report["total"] == 0
    for row in report["exercises"]:
        assert not row["passed"] and row["points"] == 0
        assert row["message"].startswith(("AssertionError", "TypeError")), row


def test_half_solved_gets_the_partial_score(graded):
    report = _report(graded, "half")
    assert [row["passed"] for row in report["exercises"]] == [True, False, True, False]
    assert report["total"] == 2
    with open(graded / "half.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["exercise"] for r in rows] == ["1.1", "1.2", "1.3", "1.4"]
    assert set(rows[0]) == {"exercise", "title", "points", "max_points", "passed", "message"}
    with open(graded / "scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 12  # three notebooks, four exercises each


def test_hostile_notebook_gets_a_clear_score_and_harms_nothing(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "file").write_text("x")
    cells = [
        "while True:\n    pass",  # interrupted after the time limit
        "import sys\nsys.exit(1)",
        f"open({str(outside)!r}, 'w').write('harmed')",
        f"import os\nos.remove({str(outside)!r})",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import os\nos.system('rm -rf {folder}')",
        f"import os\nos.rename({str(outside)!r}, 'stolen.txt')",
        "open('mine.txt', 'w').write('allowed inside its own folder')",
        'target_counts = {"panoptic": 6, "instance": 4, "semantic": 5}',
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["m2f_lite"] = {"chapter": CHAPTER}
    nbformat.write(nb, tmp_path / "hostile.ipynb")
    before = set(Path(tempfile.gettempdir()).glob("m2f-grade-*"))
    out = tmp_path / "grades"
    args = ["grade", str(tmp_path / "hostile.ipynb"), "--out", str(out), "--timeout", "3"]
    assert cli.main(args) == 0
    report = _report(out, "hostile")
    assert [row["passed"] for row in report["exercises"]] == [False, False, True, False]
    assert report["total"] == 1
    errors = {e["cell"]: e["error"] for e in report["cell_errors"]}
    assert "timed out" in errors[0]
    assert errors[1].startswith("SystemExit")
    for cell in (2, 3, 4, 5, 6):
        assert errors[cell].startswith("PermissionError: m2f-lite grade"), errors[cell]
    assert 7 not in errors
    assert outside.read_text() == "keep me"
    assert (folder / "sub" / "file").read_text() == "x"
    assert set(Path(tempfile.gettempdir()).glob("m2f-grade-*")) == before  # removed after


def test_grade_refuses_what_is_not_a_chapter(tmp_path, capsys):
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "notes.ipynb")
    assert cli.main(["grade", str(tmp_path / "notes.ipynb"), "--out", str(tmp_path)]) == 2
    assert "not a chapter's notebook" in capsys.readouterr().err
