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


def test_find_root_is_the_repository_from_any_subfolder(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    assert book.find_root(repo / "book") == repo
    assert book.find_root(tmp_path) == tmp_path  # elsewhere (Colab): the working directory


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


def test_train_cached_trains_once_and_loads_after(tmp_path, capsys):
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
