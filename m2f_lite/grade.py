"""``m2f-lite grade SUBMISSION.ipynb [...]``: grade students' notebooks with the chapters' checks.

For each submission (a chapter of the student edition, ``m2f_lite.student``, filled in):

1. the notebook runs in a fresh temporary folder (its working directory, ``HOME`` and ``TMPDIR``)
   in its own kernel (nbclient), each cell under a time limit, without network (proxies to a
   closed port, ``HF_HUB_OFFLINE=1``); a cell that raises is recorded and the run goes on, a
   cell that runs too long is interrupted (the kernel is replaced if it does not stop);
2. then every check of its chapter (``m2f_lite.exercises.EXERCISES``) runs in the same kernel on
   the names the student's cells defined, each under the same limit (at least
   ``CHECK_TIMEOUT``), with a fresh copy of the check module (a notebook that monkeypatches ``m2f_lite.exercises`` changes nothing);
3. a score table, one row per exercise (exercise, title, points, max_points, passed, message: the
   check's message when it failed), is written as ``OUT/<notebook>.json`` and ``.csv``, and all
   submissions together as ``OUT/scores.csv``.

The student's code may not write, rename or delete anything outside its temporary folder,
start programs or signal other processes: an audit hook (PEP 578), installed in the kernel
before the first cell, refuses it with a ``PermissionError`` (which the notebook sees as an
error in that cell). This protects against mistakes and ordinary file operations, not against a
determined attacker (``ctypes`` goes around it): grade untrusted code in a container. The
temporary folder is removed afterwards.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from m2f_lite.exercises import EXERCISES, Exercise, chapter_of_notebook

# Runs first in the student's kernel (``_guard``: with the temporary folder).
GUARD = r"""
import os as _os, sys as _sys

def _m2f_guard(root):
    allowed = (root, "/dev/null", "/dev/shm")
    realpath, fspath, join = _os.path.realpath, _os.fspath, _os.path.join

    def resolve(path, dir_fd=None):
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if dir_fd is not None and dir_fd >= 0 and not _os.path.isabs(path):
            path = join(_os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(join(_os.getcwd(), path))

    def check(path, dir_fd=None):
        if path is None or isinstance(path, int):  # a file descriptor: checked when opened
            return
        where = resolve(path, dir_fd)
        if not any(where == a or where.startswith(a.rstrip("/") + "/") for a in allowed):
            raise PermissionError(
                f"m2f-lite grade: {where} is outside the grading folder; a submission may "
                "only change files in its own folder"
            )

    writes = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    # event -> the index of its dir_fd argument (None: it has none)
    one = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3,
           "os.utime": 3, "os.mkfifo": 2, "os.mknod": 3, "os.truncate": None,
           "os.setxattr": None, "os.removexattr": None, "os.chflags": None,
           "os.lchflags": None, "os.lchmod": None, "shutil.rmtree": None,
           "shutil.chown": None}
    both = {"os.rename", "os.replace", "shutil.move"}  # moving a file away deletes it there
    two = {"os.link", "shutil.copyfile", "shutil.copytree", "shutil.copymode",
           "shutil.copystat"}
    kills = {"os.kill", "os.killpg"}  # a signal to another process (the grader, say)
    programs = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "os.startfile", "pty.spawn"}

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode and any(m in mode for m in "wax+")) or (mode is None and flags & writes):
                check(path)
        elif event in one:
            at = one[event]
            check(args[0], args[at] if at is not None and at < len(args) else None)
        elif event in both:
            check(args[0], args[2] if len(args) > 2 else None)
            check(args[1], args[3] if len(args) > 3 else None)
        elif event in two:
            check(args[1], args[3] if len(args) > 3 and event == "os.link" else None)
        elif event == "os.symlink":
            check(args[1], args[2])
        elif event == "sqlite3.connect" and args and args[0] != ":memory:":
            check(args[0])
        elif event in programs or (event in kills and args[0] not in (0, _os.getpid())):
            raise PermissionError(f"m2f-lite grade: {event} is not allowed while grading")

    _sys.addaudithook(hook)

"""


def _guard(root: Path) -> str:
    return GUARD + f"\n_m2f_guard({str(root.resolve())!r})\ndel _m2f_guard\n"


CHECK = r"""
import json as _m2f_json, runpy as _m2f_runpy
_m2f_check = _m2f_runpy.run_path({module!r})["check_ex{number}"]
try:
    _m2f_check({answer})
    _m2f_result = {{"passed": True, "message": ""}}
except Exception as _m2f_error:
    _m2f_result = {{"passed": False, "message": f"{{type(_m2f_error).__name__}}: {{_m2f_error}}"}}
print({marker!r} + _m2f_json.dumps(_m2f_result), flush=True)
"""


CHECK_TIMEOUT = 120  # seconds, at least, for a check: the first imports torch and the package


@dataclass
class Score:
    exercise: str  # "5.2"
    title: str
    points: float
    max_points: float
    passed: bool
    message: str


def _environment(root: Path) -> dict[str, str]:
    """The kernel's environment: no network, every cache and home folder inside ``root``."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    for key in ("http_proxy", "https_proxy", "all_proxy"):
        env[key] = env[key.upper()] = closed
    for key in ("HOME", "TMPDIR", "MPLCONFIGDIR", "IPYTHONDIR", "XDG_CACHE_HOME"):
        env[key] = str(root / key.lower())
        (root / key.lower()).mkdir()
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PIP_NO_INDEX"] = "1"
    return env


def _chapter(nb, path: Path, chapter: int | None) -> int:
    if chapter is not None:
        return chapter
    meta = nb.metadata.get("m2f_lite", {})
    if "chapter" in meta:
        return int(meta["chapter"])
    return chapter_of_notebook(path.name)


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _error_of(cell) -> str | None:
    for output in cell.get("outputs", []):
        if output.output_type == "error":
            return f"{output.ename}: {output.evalue}"
    return None


class _Kernel:
    """One kernel running cells with a time limit; replaced when it dies or does not stop."""

    def __init__(self, nb, root: Path, timeout: float):
        from nbclient import NotebookClient

        self.client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            allow_errors=True,
            # past the limit: interrupt, and record an error instead of waiting again
            interrupt_on_timeout=True,
            error_on_timeout={"ename": "Timeout", "evalue": f"over {timeout} s", "traceback": []},
            resources={"metadata": {"path": str(root)}},
        )
        self.nb, self.root, self.env = nb, root, _environment(root)
        self.alive = False

    def start(self, guard: str) -> None:
        self.client.km = self.client.create_kernel_manager()
        self.client.start_new_kernel(env=self.env, cwd=str(self.root))
        self.client.start_new_kernel_client()
        self.alive = True
        self.run(guard)

    def run(self, source: str):
        """Run ``source``; returns (the cell, what went wrong or None)."""
        from nbclient.exceptions import DeadKernelError
        from nbformat.v4 import new_code_cell

        cell = new_code_cell(source)
        self.nb.cells.append(cell)
        start = time.monotonic()
        try:
            self.client.execute_cell(cell, len(self.nb.cells) - 1)
        except DeadKernelError:
            self.stop()
            return cell, "the kernel died (the notebook ended its own process)"
        if time.monotonic() - start >= self.client.timeout:  # interrupted by nbclient
            if not self._responds():  # it ignored the interrupt: a fresh kernel takes over
                self.stop()
            return cell, f"timed out after {self.client.timeout:g} s"
        return cell, _error_of(cell)

    def _responds(self) -> bool:
        """After an interrupt: True once the kernel runs a cell again and its output comes back
        to that cell (the interrupted cell's late messages are drained first)."""
        from nbclient.exceptions import CellTimeoutError, DeadKernelError
        from nbformat.v4 import new_code_cell

        timeout, self.client.timeout = self.client.timeout, 5
        token = secrets.token_hex(8)
        try:
            for _ in range(2):
                cell = new_code_cell(f"print({token!r})")
                self.client.execute_cell(cell, 0)
                if token in _stream_text(cell):
                    return True
            return False
        except (CellTimeoutError, DeadKernelError):
            return False
        finally:
            self.client.timeout = timeout

    def stop(self) -> None:
        from nbclient.util import run_sync

        if self.alive:
            self.alive = False
            try:
                self.client.kc.stop_channels()
                run_sync(self.client.km.shutdown_kernel)(now=True)
            except Exception:  # a kernel that is already gone: nothing left to stop
                pass


def grade_notebook(
    path: Path, *, chapter: int | None = None, timeout: float = 300
) -> tuple[list[Score], list[dict]]:
    """Run ``path`` and every check of its chapter; returns (scores, the cells that failed)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    chapter = _chapter(nb, path, chapter)
    module = Path(__file__).parent / "exercises" / f"ch{chapter:02d}.py"
    problems: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="m2f-grade-"))
    kernel = _Kernel(nbformat.v4.new_notebook(), root, timeout)
    try:
        kernel.start(_guard(root))
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if not kernel.alive:  # it died or did not stop: the rest runs in a fresh one
                kernel.start(_guard(root))
            _, problem = kernel.run(cell.source)
            if problem:
                problems.append({"cell": index, "error": problem})
        scores = [_check(kernel, ex, module) for ex in EXERCISES[chapter]]
    finally:
        kernel.stop()
        shutil.rmtree(root, ignore_errors=True)
    return scores, problems


def _check(kernel: _Kernel, ex: Exercise, module: Path) -> Score:
    marker = f"M2F-GRADE-{secrets.token_hex(8)} "
    source = CHECK.format(module=str(module), number=ex.number, answer=ex.answer, marker=marker)
    if not kernel.alive:
        kernel.start(_guard(kernel.root))
    limit, kernel.client.timeout = kernel.client.timeout, max(kernel.client.timeout, CHECK_TIMEOUT)
    try:
        cell, problem = kernel.run(source)
    finally:
        kernel.client.timeout = limit
    result = {"passed": False, "message": problem or "the check printed no result"}
    for line in _stream_text(cell).splitlines():
        if line.startswith(marker):
            result = json.loads(line[len(marker) :])
    if problem and "timed out" in problem:
        result = {"passed": False, "message": f"the check {problem}"}
    points = ex.points if result["passed"] else 0
    return Score(ex.name, ex.title, points, ex.points, result["passed"], result["message"])


def write_scores(scores: list[Score], problems: list[dict], out: Path, name: str) -> None:
    """``out/name.json`` (scores, total, failing cells) and ``out/name.csv`` (one exercise a row)."""
    out.mkdir(parents=True, exist_ok=True)
    total = sum(s.points for s in scores)
    report = {
        "notebook": name,
        "total": total,
        "max_total": sum(s.max_points for s in scores),
        "exercises": [asdict(s) for s in scores],
        "cell_errors": problems,
    }
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(scores[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)


def add_grade_command(sub: argparse._SubParsersAction) -> None:
    """The ``grade`` sub-command of ``m2f-lite`` (``m2f_lite.cli``)."""
    g = sub.add_parser("grade", help="grade students' notebooks with the chapters' checks")
    g.add_argument("notebooks", nargs="+", metavar="SUBMISSION.ipynb")
    g.add_argument("--chapter", type=int, help="default: the notebook's metadata or file name")
    g.add_argument("--out", default="grades", help="folder for the score tables (grades)")
    g.add_argument("--timeout", type=float, default=300, help="seconds per cell (300)")
    g.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = []
    for name in args.notebooks:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook")
        scores, problems = grade_notebook(path, chapter=args.chapter, timeout=args.timeout)
        write_scores(scores, problems, out, path.stem)
        total, best = sum(s.points for s in scores), sum(s.max_points for s in scores)
        print(f"{path}: {total:g}/{best:g}")
        for s in scores:
            why = "" if s.passed else f"  {s.message.splitlines()[0][:100] if s.message else ''}"
            print(f"  {s.exercise:>5}  {s.points:g}/{s.max_points:g}  {s.title}{why}")
        for p in problems:
            print(f"  cell {p['cell']}: {p['error'][:100]}", file=sys.stderr)
        rows += [{"notebook": path.stem, **asdict(s)} for s in scores]
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"score tables in {out}/")
