"""What every chapter's first cell calls: device, seeds, budget and figure style, in one place.

A chapter begins with::

    from m2f_lite import book
    ctx = book.setup()          # prints one line: device, mode, seed
    steps = ctx.budget(quick=40, full=2000)

Quick mode (CPU: the book build, CI, a laptop) keeps every chapter within two minutes on two cores;
full mode (a GPU, e.g. Colab) runs the same cells with bigger numbers. ``M2F_BOOK_MODE=quick|full``
overrides the choice. The chapters never branch on the device themselves.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_URL = "https://github.com/m2f-book/m2f-book"
SHAPES_ARGS = {"n_train": 500, "n_val": 100, "size": 128, "seed": 0}  # the book's running example


@dataclass(frozen=True)
class BookContext:
    device: torch.device
    quick: bool
    seed: int
    root: Path  # the repository (or, on Colab, the working directory): data/ and .cache/ live here

    def budget(self, *, quick, full):
        """``quick`` on CPU, ``full`` on a GPU: the one place a chapter's sizes depend on the mode."""
        return quick if self.quick else full

    @property
    def shapes_root(self) -> Path:
        return ensure_shapes(self.root)

    @property
    def cache_dir(self) -> Path:
        path = self.root / ".cache" / "m2f_lite"
        path.mkdir(parents=True, exist_ok=True)
        return path


def find_root(start: Path | None = None) -> Path:
    """The repository root (the folder holding ``pyproject.toml``), else the working directory."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "m2f_lite").is_dir():
            return folder
    return here


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the legacy global RNG that notebooks may use)
    torch.manual_seed(seed)


def set_figure_style() -> None:
    """White backgrounds (readable in the book's dark mode too), a readable default size."""
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.facecolor": "white",
            "axes.facecolor": "white",
            "savefig.facecolor": "white",
            "figure.dpi": 100,
            "figure.figsize": (7.0, 3.5),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "image.interpolation": "nearest",
            "animation.embed_limit": 30.0,  # MB, for FuncAnimation(...).to_jshtml()
        }
    )


def ensure_shapes(root: Path) -> Path:
    """The synthetic shapes dataset under ``root/data/shapes``, generated on first use (seconds)."""
    out = root / "data" / "shapes"
    if not (out / ".complete").exists():
        from m2f_lite.data import synthetic

        synthetic.generate(out, **SHAPES_ARGS)
        (out / ".complete").touch()
    return out


def setup(seed: int = 0, *, verbose: bool = True) -> BookContext:
    """Pick the device, seed everything, choose the budget and set the figure style."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = os.environ.get("M2F_BOOK_MODE", "").lower()
    if mode not in ("", "quick", "full"):
        raise ValueError(f"M2F_BOOK_MODE={mode!r}: expected 'quick' or 'full'")
    quick = mode == "quick" or (mode == "" and device.type == "cpu")
    seed_everything(seed)
    set_figure_style()
    ctx = BookContext(device=device, quick=quick, seed=seed, root=find_root())
    if verbose:
        print(f"device: {device.type} · mode: {'quick' if quick else 'full'} · seed: {seed}")
    return ctx


def show_source(obj, *, start: str | None = None, end: str | None = None):
    """The package's own source of ``obj`` (function, class or method), for display in a chapter.

    ``start``/``end`` cut the listing to the lines from the first one containing ``start`` (default:
    the first line) to the first one from there containing ``end`` (default: the last line), both
    included, to focus on part of a long function.
    The listing is read from the installed package, so a chapter can never drift from the code.
    """
    import inspect
    import textwrap

    from IPython.display import Code

    lines = inspect.getsource(obj).splitlines()
    first, last = 0, len(lines) - 1
    if start is not None:
        first = next((i for i, line in enumerate(lines) if start in line), None)
        if first is None:
            raise ValueError(f"show_source: no line of {obj.__qualname__} contains {start!r}")
    if end is not None:
        last = next((i for i, line in enumerate(lines[first:], first) if end in line), None)
        if last is None:
            raise ValueError(f"show_source: no line of {obj.__qualname__} after line {first} contains {end!r}")
    lines = lines[first : last + 1]
    module = inspect.getmodule(obj).__name__
    header = f"# {module}.{obj.__qualname__}"
    return Code(header + "\n" + textwrap.dedent("\n".join(lines)), language="python")
