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

import contextlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2f_lite.data import synthetic

REPO_URL = "https://github.com/m2f-book/m2f-book"
SHAPES_ARGS = synthetic.SHAPES_ARGS  # the book's running example: 500 + 100 images of 128²


@dataclass(frozen=True)
class BookContext:
    device: torch.device
    quick: bool
    seed: int
    root: Path  # where data/ and .cache/ live: the clone, or a folder of the book's own (work_dir)

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


def find_repository(start: Path | None = None) -> Path | None:
    """The clone of this project that ``start`` (default: the working directory) lies in: the
    folder holding ``pyproject.toml`` beside this package's sources. ``None`` outside one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "m2f_lite" / "book.py").is_file():
            return folder
    return None


def work_dir(start: Path | None = None) -> Path:
    """Where a chapter writes its data and cache: ``$M2F_BOOK_DIR`` if set; else the clone it
    runs in (the ``Makefile`` makes ``data/shapes`` there); else, for a notebook opened alone
    (Colab), ``~/.cache/m2f_lite/book``, a folder of the book's own, never the notebook's."""
    if os.environ.get("M2F_BOOK_DIR"):
        return Path(os.environ["M2F_BOOK_DIR"]).expanduser().resolve()
    repository = find_repository(start)
    if repository is not None:
        return repository
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "m2f_lite" / "book").resolve()


def benchmark_results() -> str:
    """The text of ``benchmarks/RESULTS.md`` (figures with their commands and machines), as the
    installed package holds it (``m2f_lite/assets/RESULTS.md``): chapter 10 reads it on Colab."""
    from importlib.resources import files

    return (files("m2f_lite") / "assets" / "RESULTS.md").read_text(encoding="utf-8")


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
    """The synthetic shapes dataset under ``root/data/shapes``, generated on first use (seconds).

    Generated into a temporary folder beside it and renamed into place: chapters run side by side
    (nbval's two kernels) never read a half-written dataset, and the one that loses the race
    uses the winner's (the same seed: the same files)."""
    import shutil
    import tempfile

    out = root / "data" / "shapes"
    if not (out / ".complete").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=out.parent))
        try:
            synthetic.generate(staging / "shapes", **SHAPES_ARGS)
            (staging / "shapes" / ".complete").touch()
            with contextlib.suppress(OSError):  # another chapter made it first
                (staging / "shapes").rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not (out / ".complete").exists():
            raise FileExistsError(f"{out}: exists but is not a complete shapes dataset; remove it")
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
    ctx = BookContext(device=device, quick=quick, seed=seed, root=work_dir())
    if verbose:
        print(f"device: {device.type} · mode: {'quick' if quick else 'full'} · seed: {seed}")
        if find_repository() is None:  # opened alone (Colab): say where its files go
            print(f"data and cache: {ctx.root} (set M2F_BOOK_DIR to change)")
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
            raise ValueError(
                f"show_source: no line of {obj.__qualname__} after line {first} contains {end!r}"
            )
    lines = lines[first : last + 1]
    module = inspect.getmodule(obj).__name__
    header = f"# {module}.{obj.__qualname__}"
    return Code(header + "\n" + textwrap.dedent("\n".join(lines)), language="python")


def explorer(draw, **controls):
    """A live explorer: ``draw(**values)`` returns a matplotlib figure, redrawn when a control moves.

    ``controls`` are ipywidgets (sliders, dropdowns) named as ``draw``'s arguments. The picture is
    an ``Image`` widget updated through ``observe``: no ``interact`` and no ``Output`` widget, which
    can hang a notebook executed headless (nbclient). Returns the box to display; it is live on
    Colab and in Jupyter, so every chapter also draws a static figure of the same thing after it.
    """
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def png() -> bytes:
        fig = draw(**{name: w.value for name, w in controls.items()})
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    picture = widgets.Image(value=png(), format="png")

    def update(_change) -> None:
        picture.value = png()

    for w in controls.values():
        w.observe(update, names="value")
    return widgets.VBox([*controls.values(), picture])


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on ``lock_file`` (POSIX ``flock``; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent book builds to guard against
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def book_model(ctx: BookContext):
    """The book's trained model, shipped with the package: ``(model, cfg, meta)``.

    ``shapes_book`` trained once by ``engine.train`` (``make book-model``; the command, the metrics
    and the training curve are in ``m2f_lite/assets/shapes_book.json``, see
    :mod:`m2f_lite.book_model`). Nothing trains here: the weights load in a second. ``model`` is
    in eval mode on ``ctx.device``; ``cfg.data.root`` is the chapter's shapes dataset; ``meta`` is
    the dataset's ``DatasetMeta`` (class names, colours).
    """
    from m2f_lite import book_model as shipped

    return shipped.load(ctx.device, data_root=ctx.shapes_root)


def train_cached(
    ctx: BookContext,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    preset: str = "shapes_tiny",
    max_iter: int,
    eval_period: int | None = None,
    progress: bool = False,
):
    """Train ``preset`` with ``overrides`` on the shapes dataset once, cached: ``(model, cfg, meta)``.

    The cache key is a hash of the whole recipe (preset, overrides, ``max_iter``, seed), so a changed
    recipe trains again, an unchanged one loads ``model_final.pt`` from ``ctx.cache_dir``, and an
    interrupted run resumes from its last checkpoint. Evaluation runs every ``eval_period``
    iterations (default: once, at the end); its records are in ``cfg.output_dir/log.jsonl``.
    A lock makes parallel notebook runs (nbval with several workers) train each recipe only once.
    Training prints one line before and one after; ``progress=True`` adds the progress bars
    (off by default: a notebook's stderr would become a warning in the strict book build).
    """
    import hashlib

    from m2f_lite import checkpoint as ckpt
    from m2f_lite.config import apply_overrides, get_config
    from m2f_lite.data.meta import DatasetMeta
    from m2f_lite.engine import train
    from m2f_lite.modeling.mask2former import build_model
    from m2f_lite.train_log import headline

    cfg = get_config(
        preset,
        [
            f"data.root={ctx.shapes_root}",
            f"solver.max_iter={max_iter}",
            f"solver.eval_period={eval_period or max_iter}",
            f"solver.checkpoint_period={max(max_iter // 4, 1)}",
            f"seed={ctx.seed}",
            *overrides,
        ],
    )
    recipe = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k != "root"}  # the same anywhere
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cfg = apply_overrides(cfg, {"output_dir": str(ctx.cache_dir / f"{preset}-{key}")})
    final = Path(cfg.output_dir) / "model_final.pt"
    with _exclusive(Path(f"{cfg.output_dir}.lock")):  # parallel notebook runs train it only once
        if not final.exists():
            print(f"training {preset} for {max_iter} iterations, once: cached in {cfg.output_dir}")
            result = train(cfg, resume=True, progress=progress)
            if result["interrupted"]:  # Ctrl-C / SIGTERM: a checkpoint was saved
                raise KeyboardInterrupt(
                    f"stopped at iteration {result['iteration']}; call again to resume"
                )
            summary = ", ".join(f"{k} {v:.1f}" for k, v in headline(result["metrics"]).items())
            print(f"trained in {result['seconds'] / 60:.1f} min: {summary}")
    state = ckpt.load_checkpoint(final)
    model = build_model(cfg)
    ckpt.load_model_state(model, state["model"], source=str(final))
    return model.to(ctx.device).eval(), cfg, DatasetMeta(**state["meta"])
