"""The chapters' helpers (m2f_lite.book): mode, sources shown from the package, the training cache."""

from __future__ import annotations

from pathlib import Path

import ipywidgets
import matplotlib.pyplot as plt
import pytest
import torch

from m2f_lite import book
from m2f_lite.matcher import HungarianMatcher


def test_setup_modes_and_budget(monkeypatch, capsys):
    monkeypatch.setenv("M2F_BOOK_MODE", "full")
    ctx = book.setup(seed=3)
    assert not ctx.quick and ctx.budget(quick=1, full=2) == 2
    assert "mode: full · seed: 3" in capsys.readouterr().out
    monkeypatch.setenv("M2F_BOOK_MODE", "quick")
    assert book.setup(verbose=False).budget(quick=1, full=2) == 1
    monkeypatch.setenv("M2F_BOOK_MODE", "fast")
    with pytest.raises(ValueError, match="M2F_BOOK_MODE='fast'"):
        book.setup()


def test_work_dir_is_the_clone_else_a_folder_of_the_books_own(tmp_path, monkeypatch):
    monkeypatch.delenv("M2F_BOOK_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo = Path(__file__).resolve().parents[1]
    assert book.find_repository(repo / "book") == repo
    assert book.work_dir(repo / "book") == repo
    alone = tmp_path / "notebooks"  # a chapter opened alone (Colab): not the notebook's folder
    alone.mkdir()
    assert book.find_repository(alone) is None
    assert book.work_dir(alone) == tmp_path / "cache" / "m2f_lite" / "book"
    monkeypatch.setenv("M2F_BOOK_DIR", str(tmp_path / "mine"))
    assert book.work_dir(repo) == tmp_path / "mine"


def test_setup_says_where_a_lone_chapter_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M2F_BOOK_DIR", str(tmp_path / "book_files"))
    ctx = book.setup()
    assert ctx.root == tmp_path / "book_files"
    assert f"data and cache: {tmp_path / 'book_files'}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written yet, and never into the cwd


def test_shapes_made_by_two_chapters_at_once_is_one_complete_dataset(tmp_path, monkeypatch):
    """Two kernels (nbval -n 2) asking for the dataset at the same moment: the loser of the race
    keeps the winner's dataset, and no staging folder is left behind."""
    import threading

    monkeypatch.setattr(book, "SHAPES_ARGS", {"n_train": 3, "n_val": 2, "size": 32, "seed": 0})
    results, errors = [], []

    def make():
        try:
            results.append(book.ensure_shapes(tmp_path))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path / "data" / "shapes"] * 2
    assert (tmp_path / "data" / "shapes" / ".complete").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shapes"]


def test_benchmark_results_ship_with_the_package():
    repo = Path(__file__).resolve().parents[1]
    assert book.benchmark_results() == (repo / "benchmarks" / "RESULTS.md").read_text()


def test_show_source_reads_the_package_and_cuts_where_asked():
    whole = book.show_source(HungarianMatcher.forward).data
    assert whole.startswith("# m2f_lite.matcher.HungarianMatcher.forward\n")
    assert "def forward(" in whole
    cut = book.show_source(HungarianMatcher.forward, start="def forward", end=")").data
    assert len(cut.splitlines()) < len(whole.splitlines())
    with pytest.raises(
        ValueError, match=r"no line of HungarianMatcher\.forward contains 'nowhere'"
    ):
        book.show_source(HungarianMatcher.forward, start="nowhere")


def test_explorer_redraws_when_a_control_moves():
    calls = []

    def draw(k):
        calls.append(k)
        fig, ax = plt.subplots()
        ax.plot(range(k))
        return fig

    slider = ipywidgets.IntSlider(value=2, min=1, max=5)
    box = book.explorer(draw, k=slider)
    first = box.children[-1].value
    slider.value = 4
    assert calls == [2, 4] and box.children[-1].value != first


def test_train_cached_trains_once_and_loads_after(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(book, "SHAPES_ARGS", {"n_train": 6, "n_val": 2, "size": 64, "seed": 0})
    ctx = book.BookContext(device=torch.device("cpu"), quick=True, seed=0, root=tmp_path)
    small = ["data.image_size=64", "data.min_size_test=64", "data.max_size_test=64",
             "solver.ims_per_batch=2", "model.num_queries=10"]  # fmt: skip
    model, cfg, meta = book.train_cached(ctx, small, max_iter=2)
    out = capsys.readouterr().out
    assert "training shapes_tiny for 2 iterations" in out and "trained in" in out
    assert Path(cfg.output_dir).parent == ctx.cache_dir and not model.training
    assert cfg.model.num_queries == 10 and meta.classes[0] == "circle"
    again, cfg2, _ = book.train_cached(ctx, small, max_iter=2)
    assert capsys.readouterr().out == "" and cfg2.output_dir == cfg.output_dir  # loaded
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    _, other, _ = book.train_cached(ctx, small, max_iter=3)  # another recipe, another run
    assert other.output_dir != cfg.output_dir
