"""The student edition (``m2f_lite.student``, ``make student``): no solution anywhere, the
exercises numbered the same everywhere, nbgrader assignments that nbgrader accepts.

How the student notebooks are known to run under nbval (``--nbval-lax``): a stub returns None
and its check call is commented out, so no cell of an unfilled notebook raises;
``test_no_live_check_call_in_the_student_notebooks`` asserts that for every chapter, and the
rest of each notebook is the chapter itself, which ``make test`` runs under nbval. (Checked once
by hand too: ``pytest --nbval-lax _build/student/notebooks/01_tasks_and_data.ipynb``.)
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from m2f_lite import student
from m2f_lite.exercises import EXERCISES, chapter_module

CHAPTERS = student.chapter_notebooks()
ROOT = Path(__file__).resolve().parent.parent


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def solution_only_lines(nb: nbformat.NotebookNode) -> set[str]:
    """Lines between ``{solution-start}`` and ``{solution-end}``, at least 25 characters long,
    that occur nowhere else in the chapter, not even inside another line (a stub's commented
    check): found by a scan of their own, not the module's."""
    inside, solution, rest = False, [], []
    for cell in nb.cells:
        for line in cell.source.splitlines():
            if "{solution-start}" in line or "{solution-end}" in line:
                inside = "{solution-start}" in line
                continue
            (solution if inside else rest).append(line.strip())
    rest_text = "\n".join(rest)
    return {line for line in solution if len(line) >= 25 and line not in rest_text}


def _text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells)


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_student_notebook_has_no_solution_and_keeps_the_stubs(chapter):
    nb = _read(CHAPTERS[chapter])
    secret = solution_only_lines(nb)
    assert len(secret) >= len(EXERCISES[chapter])  # the scan found the solutions
    text = _text(student.student_notebook(nb, chapter))
    assert "solution-start" not in text and "solution-end" not in text
    assert not [line for line in secret if line in text]
    for ex in EXERCISES[chapter]:
        assert f":label: {ex.label}\n" in text
        assert f"# {ex.call}  # uncomment to check" in text  # the stub's check, commented


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_no_live_check_call_in_the_student_notebooks(chapter):
    nb = student.student_notebook(_read(CHAPTERS[chapter]), chapter)
    for cell in nb.cells:
        if cell.cell_type == "code":
            for line in cell.source.splitlines():
                assert not re.match(r"\s*[^#\s].*check_ex\d", line), line


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_exercises_are_numbered_per_chapter_everywhere(chapter):
    """Heading "Exercise 5.2: title" <-> label ch05-ex2 <-> ch05.check_ex2, in the exercise's
    text, the stub and the solution; prose says "Exercise 5.2", never a bare number."""
    nb = _read(CHAPTERS[chapter])
    text = _text(nb)
    headings = re.findall(r"^### Exercise (\d+)\.(\d+): (.+)$", text, re.M)
    assert headings == [(str(chapter), str(e.number), e.title) for e in EXERCISES[chapter]]
    assert re.findall(r":label: (ch\d\d-ex\d+)", text) == [e.label for e in EXERCISES[chapter]]
    assert text.count(":nonumber:") == len(EXERCISES[chapter])  # no global "Exercise 39"
    module = chapter_module(chapter)
    assert sorted(n for n in dir(module) if re.fullmatch(r"check_ex\d+", n)) == [
        f"check_ex{e.number}" for e in EXERCISES[chapter]
    ]
    blocks = student.solution_blocks(nb)
    for ex in EXERCISES[chapter]:
        statement = next(c.source for c in nb.cells if f":label: {ex.label}\n" in c.source)
        assert f"`{ex.call}`" in statement.replace("\n", " ") or ex.call in statement
        code = "\n".join(c.source for c in blocks[ex.label] if c.cell_type == "code")
        assert ex.call in code  # the solution defines the names the stub does, and checks them
    for ref in re.findall(r"[Ee]xercise[s]? \d+(?!\.\d)\b", text):
        pytest.fail(f"a bare exercise number in chapter {chapter}: {ref!r}")
    for ref in re.findall(r"\{ref\}`Exercise (\d+)\.(\d+) <ch(\d\d)-ex(\d+)>`", text):
        assert int(ref[0]) == int(ref[2]) and ref[1] == ref[3], ref


def test_no_two_exercises_alike():
    statements = []
    for path in CHAPTERS.values():
        for cell in _read(path).cells:
            if "```{exercise}" in cell.source:
                body = cell.source.split(":nonumber:", 1)[1]
                statements.append(re.sub(r"ch\d\d", "chNN", body.strip()))
    assert len(set(statements)) == len(statements) == sum(map(len, EXERCISES.values()))


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def _html_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text())
    return "".join(parser.parts)


def _plain(line: str) -> str | None:
    """A solution line as its rendered text: code as is; prose without its markup (None when
    math or a role would change it)."""
    if re.search(r"[$\\{}]", line):
        return None
    return line.replace("`", "").replace("*", "")


def _search_terms(index: Path, page: str | None = None) -> set[str]:
    """The words of Sphinx's search index (of one page: ``page``, e.g. "book/01_tasks_and_data")."""
    text = index.read_text()
    data = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    if page is None:
        return set(data["terms"])
    doc = data["docnames"].index(page)
    pages = {w: d if isinstance(d, list) else [d] for w, d in data["terms"].items()}
    return {w for w, docs in pages.items() if doc in docs}


def _solution_words(nb, student_text: str) -> set[str]:
    """Words of the solutions' prose that the student edition (``student_text``, its other pages,
    the package source its pages show) never uses, stemmed as Sphinx's search index does."""
    from sphinx.search.en import SearchEnglish

    stem = SearchEnglish({}).stem
    blocks = student.solution_blocks(nb)
    prose = " ".join(c.source for b in blocks.values() for c in b if c.cell_type == "markdown")
    pages = [(ROOT / "book" / n).read_text() for n in ("intro.md", "references.md")]
    pages += [p.read_text() for p in (ROOT / "m2f_lite").rglob("*.py")]  # pages show the source
    used = " ".join([student_text, *pages]).lower()
    words = {stem(w) for w in re.findall(r"\b[a-z]{7,}\b", prose)}
    return words - {stem(w) for w in re.findall(r"\b[a-z]+\b", used)}


def test_student_html_has_no_solution(tmp_path):
    """jupyter-book on chapter 1 (unexecuted, to stay cheap): no solution line in the pages, no
    solution-only word in the search index; the stubs are there, the download is the student
    notebook."""
    notebooks = student.write_notebooks(tmp_path, [1])
    src = student.write_book_source(tmp_path, notebooks, execute=False)
    out = student.build_html(src, tmp_path, strict=False)
    nb = _read(CHAPTERS[1])
    page = _html_text(out / "book" / "01_tasks_and_data.html")
    assert "def my_decode_ids(rgb): ...  # your code" in page  # code survives the extraction
    assert "Exercise 1.1: Decode a panoptic PNG" in page
    lines = [_plain(line) for line in solution_only_lines(nb)]
    assert not [line for line in lines if line and line in page]
    words = _solution_words(nb, _text(_read(notebooks[1])))
    terms = _search_terms(out / "searchindex.js", "book/01_tasks_and_data")
    assert words and not words & terms
    from sphinx.search.en import SearchEnglish

    stem = SearchEnglish({}).stem
    assert {stem("uncomment"), stem("overflow")} & terms  # the page's own words are indexed
    download = _read(out / "_sources" / "book" / "01_tasks_and_data.ipynb")
    assert _text(download) == _text(_read(notebooks[1]))
    intro = (src / "book" / "intro.md").read_text()
    assert "student edition" in intro and "<!-- student-edition -->" not in intro


BUILT = ROOT / "_build" / "student" / "_build" / "html"


@pytest.mark.student_build
def test_make_student_output_has_no_solution():
    """The full ``make student`` build (``make student`` runs this test after building; the
    cheap build above stands in for it in ``make test``): every page and the search index."""
    assert (BUILT / "searchindex.js").is_file(), f"{BUILT}: run `make student` first"
    books = {c: _read(p) for c, p in CHAPTERS.items()}
    edition = "\n".join(_text(student.student_notebook(nb, c)) for c, nb in books.items())
    package = "\n".join(p.read_text() for p in (ROOT / "m2f_lite").rglob("*.py"))
    for chapter, path in CHAPTERS.items():
        page = _html_text(BUILT / "book" / f"{path.stem}.html")
        lines = [_plain(line) for line in solution_only_lines(books[chapter])]
        lines = [line for line in lines if line and line not in package]  # pages show its source
        assert not [line for line in lines if line in page], path.name
        words = _solution_words(books[chapter], edition)
        terms = _search_terms(BUILT / "searchindex.js", f"book/{path.stem}")
        assert not words & terms, (path.name, words & terms)


def _nbgrader(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "nbgrader"), *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.xdist_group("kernels")
def test_nbgrader_generate_assignment_and_autograde(tmp_path):
    """nbgrader on chapter 1's exercise section (the whole chapter works the same, slower)."""
    pytest.importorskip("nbgrader")
    nb = _read(CHAPTERS[1])
    first = next(i for i, c in enumerate(nb.cells) if "## Exercises" in c.source)
    nb.cells = [nbformat.v4.new_code_cell("import numpy as np\nimport torch"), *nb.cells[first:]]
    source = student.nbgrader_notebook(nb, 1)
    graded = [c for c in source.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert [c.metadata.nbgrader["points"] for c in graded] == [1, 1, 1, 1]
    course = tmp_path / "course"
    (course / "source" / "ch01").mkdir(parents=True)
    nbformat.write(source, course / "source" / "ch01" / "ex.ipynb")
    (course / "nbgrader_config.py").write_text(student.NBGRADER_CONFIG)
    _nbgrader("generate_assignment", "ch01", cwd=course)
    release = _read(course / "release" / "ch01" / "ex.ipynb")
    text = _text(release)
    assert "raise NotImplementedError()" in text and "ch01.check_ex3(**target_counts)" in text
    kept = re.compile(r"def .*:$|.*check_ex\d")  # the signature and the check stay visible
    secret = [line for line in solution_only_lines(nb) if not kept.match(line)]
    assert secret and not [line for line in secret if line in text]
    assert "### BEGIN SOLUTION" not in text
    for cell in release.cells:  # the student solves exercise 1.3 only
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "ex1_3_answer":
            cell.source = 'target_counts = {"panoptic": 6, "instance": 4, "semantic": 5}'
    (course / "submitted" / "alice" / "ch01").mkdir(parents=True)
    nbformat.write(release, course / "submitted" / "alice" / "ch01" / "ex.ipynb")
    _nbgrader("autograde", "ch01", cwd=course)
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission("ch01", "alice")
        scores = {g.name: g.score for nb in submission.notebooks for g in nb.grades}
        assert (submission.score, submission.max_score) == (1, 4)
    assert scores == {"ex1_1_check": 0, "ex1_2_check": 0, "ex1_3_check": 1, "ex1_4_check": 0}
    shutil.rmtree(course)


def test_instructor_page_lists_every_exercise():
    page = (ROOT / "book" / "instructors.md").read_text()
    stars = {1: "★ predict", 2: "★★ compute", 3: "★★★ implement"}
    for exercises in EXERCISES.values():
        for ex in exercises:
            row = f"| {{ref}}`{ex.name} <{ex.label}>` | {ex.title} | {stars[ex.difficulty]} | "
            assert row + f"{ex.minutes} | {ex.points} | `{ex.call}` |" in page, ex.label
    assert "book/instructors" in (ROOT / "_toc.yml").read_text()
