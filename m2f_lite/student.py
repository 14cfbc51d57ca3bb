"""The student edition of the book, and nbgrader assignments made from the same chapters.

``python -m m2f_lite.student`` (``make student``) writes, under ``_build/student/``:

- ``notebooks/NN_*.ipynb``: every chapter with its solutions *removed*: the markdown between
  ``{solution-start}`` and ``{solution-end}`` and the code cells inside go, the exercise and the
  stub the student fills in stay (a stub returns None and its check call is commented out, so
  an unfilled notebook runs from top to bottom, under nbval too);
- ``_build/html/``: those notebooks built with jupyter-book, executed (``--no-execute`` to skip),
  each page with its ``.ipynb`` download button; no solution in the pages or the search index;
- ``nbgrader/source/chNN/NN_*.ipynb`` (``--nbgrader``): nbgrader source notebooks, one
  assignment per chapter: after each stub a solution cell (``### BEGIN SOLUTION`` ...
  ``### END SOLUTION``, the book's solution) and an autograded test cell that calls the chapter's
  own check, with the exercise's points (``m2f_lite.exercises.EXERCISES``).

Instructors: ``cd _build/student/nbgrader && nbgrader generate_assignment ch05`` releases
chapter 5; ``nbgrader autograde ch05`` grades the submissions. Without nbgrader,
``m2f-lite grade SUBMISSION.ipynb`` (``m2f_lite.grade``) grades a notebook of the student edition.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from m2f_lite.exercises import EXERCISES, Exercise

ROOT = Path(__file__).resolve().parent.parent  # the repository: book/, _config.yml, _toc.yml
START = re.compile(r"```\{solution-start\}[^\n]*\n(?:[^\n`][^\n]*\n)*?```[ \t]*(?:\n|$)")
END = re.compile(r"```\{solution-end\}[^\n]*\n```[ \t]*(?:\n|$)")
LINK_BLOCK = re.compile(r"<!-- student-edition -->.*?<!-- /student-edition -->\n?", re.S)
STUDENT_INTRO = """\
```{note}
This is the **student edition**: every exercise keeps its statement, its stub and its check, and
no solution. Download a chapter with the download button at the top of its page (`.ipynb`), fill
in the stubs and uncomment the checks; `m2f_lite.exercises.chNN` holds them.
```
"""


def chapter_notebooks(book: Path = ROOT / "book") -> dict[int, Path]:
    """``{chapter: book/NN_topic.ipynb}`` for the chapters that have exercises."""
    paths = {int(p.name[:2]): p for p in sorted(book.glob("[01][0-9]_*.ipynb"))}
    return {n: paths[n] for n in EXERCISES if n in paths}


def _split(nb: nbformat.NotebookNode) -> list[tuple[str, nbformat.NotebookNode]]:
    """Every cell's pieces, each tagged "keep" or "solution", in order. A markdown cell may hold
    the end of one solution and the start of the next exercise; code cells are whole."""
    pieces, inside = [], False
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            pieces.append(("solution" if inside else "keep", cell))
            continue
        text, pos = cell.source, 0
        while pos <= len(text):
            match = (END if inside else START).search(text, pos)
            stop = match.start() if match else len(text)
            if text[pos:stop].strip():
                part = copy.deepcopy(cell)
                part.source = text[pos:stop].strip("\n")
                pieces.append(("solution" if inside else "keep", part))
            if not match:
                break
            inside, pos = not inside, match.end()
    if inside:
        raise ValueError("a {solution-start} without its {solution-end}")
    return pieces


def solution_blocks(nb: nbformat.NotebookNode) -> dict[str, list[nbformat.NotebookNode]]:
    """``{exercise label: the cells of its solution}`` (markdown parts and code cells)."""
    blocks: dict[str, list] = {}
    labels = iter(re.findall(r"```\{solution-start\}\s*(\S+)", _all_markdown(nb)))
    previous = "keep"
    for kind, cell in _split(nb):
        if kind == "solution" and previous != "solution":
            current = blocks.setdefault(next(labels), [])
        if kind == "solution":
            current.append(cell)
        previous = kind
    return blocks


def _all_markdown(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def student_notebook(nb: nbformat.NotebookNode, chapter: int) -> nbformat.NotebookNode:
    """The chapter without its solutions: cells and parts of cells between ``{solution-start}``
    and ``{solution-end}`` are removed, the rest is kept as it is (outputs stay stripped)."""
    out = copy.deepcopy(nb)
    out.cells = [cell for kind, cell in _split(out) if kind == "keep"]
    out.metadata["m2f_lite"] = {"chapter": chapter, "edition": "student"}
    return out


def stub_cells(nb: nbformat.NotebookNode, chapter: int) -> dict[int, int]:
    """``{exercise number: index of its stub}``: the first code cell after the exercise."""
    stubs, pending = {}, None
    for i, cell in enumerate(nb.cells):
        found = re.search(rf":label: ch{chapter:02d}-ex(\d+)\n", cell.source)
        if cell.cell_type == "markdown" and found:
            pending = int(found.group(1))
        elif cell.cell_type == "code" and pending is not None:
            stubs[pending], pending = i, None
    return stubs


# --- nbgrader ------------------------------------------------------------------------------


def _nbgrader(cell: nbformat.NotebookNode, grade_id: str, *, points: int | None) -> None:
    meta = {"grade_id": grade_id, "schema_version": 3, "task": False}
    if points is None:  # a solution cell: the student writes here
        meta |= {"grade": False, "locked": False, "solution": True}
    else:  # an autograded test cell
        meta |= {"grade": True, "locked": True, "points": points, "solution": False}
    cell.metadata["nbgrader"] = meta


def _is_check_call(node: ast.stmt, ex: Exercise) -> bool:
    return isinstance(node, ast.Expr) and f".check_ex{ex.number}(" in ast.unparse(node)


def _is_stub_def(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.FunctionDef)
        and len(node.body) == 1
        and isinstance(node.body[0], ast.Expr)
        and getattr(node.body[0].value, "value", None) is Ellipsis
    )


def _solution_source(code: str, ex: Exercise) -> str:
    """The book's solution as an nbgrader solution cell. A function answer keeps its ``def``
    line visible and puts its body in the solution region; other code is a region of its own;
    the check calls are left to the test cell."""
    lines = code.splitlines()
    out, region = [], []

    def flush():
        if region:
            out.extend(["### BEGIN SOLUTION", *region, "### END SOLUTION"])
            region.clear()

    for node in ast.parse(code).body:
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        text = lines[start - 1 : node.end_lineno]
        if _is_check_call(node, ex):
            continue
        if isinstance(node, ast.FunctionDef) and node.name in ex.names:
            flush()
            body = node.body[0].lineno - start
            indent = " " * node.body[0].col_offset
            out.extend(text[:body])
            out.extend([f"{indent}### BEGIN SOLUTION", *text[body:], f"{indent}### END SOLUTION"])
        else:
            region.extend(text)
    flush()
    return "\n".join(out).strip("\n")


def _stub_without_def(code: str, ex: Exercise) -> str:
    """The stub cell less the stub ``def`` and the commented check: what else it does (an
    import, a figure) stays."""
    lines = code.splitlines()
    drop = set()
    for node in ast.parse(code).body:
        if _is_stub_def(node) and node.name in ex.names:
            drop.update(range(node.lineno - 1, node.end_lineno))
    kept = [
        line
        for i, line in enumerate(lines)
        if i not in drop and not re.match(rf"\s*# .*check_ex{ex.number}\(", line)
    ]
    return "\n".join(kept).strip("\n")


def nbgrader_notebook(nb: nbformat.NotebookNode, chapter: int) -> nbformat.NotebookNode:
    """An nbgrader source notebook: the student edition, and after each stub a solution cell
    (the book's solution between ``### BEGIN SOLUTION`` / ``### END SOLUTION``) and a test cell
    (``chNN.check_exK(...)``, the exercise's points)."""
    solutions = solution_blocks(nb)
    out = student_notebook(nb, chapter)
    stubs = stub_cells(out, chapter)
    cells = list(out.cells)
    for ex in sorted(EXERCISES[chapter], key=lambda e: -e.number):  # back to front
        index = stubs[ex.number]
        code = "\n\n".join(c.source for c in solutions[ex.label] if c.cell_type == "code")
        answer = nbformat.v4.new_code_cell(_solution_source(code, ex))
        answer.id = f"ex{chapter}-{ex.number}-answer"
        _nbgrader(answer, f"ex{chapter}_{ex.number}_answer", points=None)
        test = nbformat.v4.new_code_cell(
            f"# Exercise {ex.name}: the check, autograded ({ex.points} point"
            f"{'s' if ex.points != 1 else ''})\n"
            f"from m2f_lite.exercises import ch{chapter:02d}\n\n{ex.call}"
        )
        test.id = f"ex{chapter}-{ex.number}-check"
        _nbgrader(test, f"ex{chapter}_{ex.number}_check", points=ex.points)
        rest = _stub_without_def(cells[index].source, ex)
        new = [answer, test]
        if rest:
            cells[index].source = rest
            new = [cells[index], *new]
        cells[index : index + 1] = new
    out.cells = cells
    return out


NBGRADER_CONFIG = """\
c = get_config()  # noqa: F821 (nbgrader's config file)
c.CourseDirectory.root = "."
c.Execute.timeout = 600  # seconds per cell: a chapter trains small models on a CPU
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}
"""


# --- the edition ---------------------------------------------------------------------------


def write_notebooks(out: Path, chapters: list[int] | None = None) -> dict[int, Path]:
    """The student notebooks under ``out/notebooks``; returns ``{chapter: path}``."""
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    written = {}
    for chapter, path in chapter_notebooks().items():
        if chapters and chapter not in chapters:
            continue
        nb = student_notebook(nbformat.read(path, as_version=4), chapter)
        written[chapter] = out / "notebooks" / path.name
        nbformat.write(nb, written[chapter])
    return written


def write_nbgrader(out: Path, chapters: list[int] | None = None) -> Path:
    """An nbgrader course folder ``out/nbgrader``: ``source/chNN/NN_*.ipynb`` and its config."""
    course = out / "nbgrader"
    for chapter, path in chapter_notebooks().items():
        if chapters and chapter not in chapters:
            continue
        target = course / "source" / f"ch{chapter:02d}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nbgrader_notebook(nbformat.read(path, as_version=4), chapter), target)
    (course / "nbgrader_config.py").write_text(NBGRADER_CONFIG)
    return course


def _toc(files: set[str]) -> dict:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = []
    for part in toc.get("parts", []):
        chapters = [c for c in part.get("chapters", []) if c.get("file") in files]
        if chapters:
            parts.append({**part, "chapters": chapters})
    return {**toc, "parts": parts}


def write_book_source(out: Path, notebooks: dict[int, Path], *, execute: bool) -> Path:
    """A jupyter-book folder ``out/source`` for the student edition: its own config and table
    of contents (the chapters, the references; no instructor page), the student notebooks."""
    import yaml

    src = out / "source"
    if src.exists():
        shutil.rmtree(src)
    (src / "book").mkdir(parents=True)
    for path in notebooks.values():
        shutil.copy(path, src / "book" / path.name)
    for name in ("references.bib", "references.md"):
        shutil.copy(ROOT / "book" / name, src / "book" / name)
    shutil.copytree(ROOT / "book" / "figures", src / "book" / "figures")
    intro = LINK_BLOCK.sub(STUDENT_INTRO, (ROOT / "book" / "intro.md").read_text())
    (src / "book" / "intro.md").write_text(intro)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["title"] = f"{config['title']} (student edition)"
    config["execute"]["execute_notebooks"] = "force" if execute else "off"
    config.pop("launch_buttons", None)  # Colab would open the repository's solved chapters
    config["html"] = {**config.get("html", {}), "use_repository_button": False}
    config["html"]["use_issues_button"] = False
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    files = {f"book/{p.stem}" for p in notebooks.values()} | {"book/references"}
    (src / "_toc.yml").write_text(yaml.safe_dump(_toc(files), sort_keys=False))
    return src


def build_html(src: Path, out: Path, *, strict: bool = True) -> Path:
    """``jupyter-book build`` of the student edition; returns ``out/_build/html``."""
    jb = Path(sys.executable).parent / "jupyter-book"
    command = [str(jb), "build", str(src), "--path-output", str(out), "--all"]
    command += ["-W", "-n", "--keep-going"] if strict else []
    subprocess.run(command, check=True)
    return out / "_build" / "html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m2f_lite.student", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "student")
    parser.add_argument("--chapters", type=int, nargs="*", help="default: all")
    parser.add_argument("--no-html", action="store_true", help="the notebooks only")
    parser.add_argument("--no-execute", action="store_true", help="build the HTML unexecuted")
    parser.add_argument("--nbgrader", action="store_true", help="also the nbgrader sources")
    args = parser.parse_args(argv)
    notebooks = write_notebooks(args.out, args.chapters)
    print(f"{len(notebooks)} student notebooks in {args.out / 'notebooks'}")
    if args.nbgrader:
        print(f"nbgrader course folder: {write_nbgrader(args.out, args.chapters)}")
    if not args.no_html:
        src = write_book_source(args.out, notebooks, execute=not args.no_execute)
        print(f"student edition: {build_html(src, args.out) / 'index.html'}")


if __name__ == "__main__":
    main()
