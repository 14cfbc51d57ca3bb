"""Checks for the exercises of chapter 6, "Matching and losses".

Each ``check_exN(answer)`` returns None when the answer is right and raises an ``AssertionError``
whose message says what was wrong and gives a hint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from m2f_lite.matcher import pairwise_dice, solve_assignment
from m2f_lite.point_sampling import importance_sampled_points, point_sample


def check_ex1(answer: int) -> None:
    """Ex. 1: the number of loss terms with 9 decoder layers and deep supervision (30)."""
    hints = {
        27: "27 = 3 × 9 forgets the prediction made from the learnable queries before the first "
        "decoder layer (auxiliary prediction 0): there are 9 + 1 predictions.",
        10: "10 is the number of predictions; each gives three terms (loss_ce, loss_mask, loss_dice).",
        9: "9 is the number of layers; there are 9 + 1 predictions, each with three terms.",
        3: "3 terms is without deep supervision; with it, every prediction gets its own three terms.",
        33: "33 counts one prediction too many: the final prediction is the one after layer 9, "
        "not an extra one (9 auxiliary + 1 final).",
    }
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"expected an int, got {type(answer).__name__} {answer!r}"
    )
    assert answer == 30, hints.get(
        answer,
        f"{answer} is not right: count the predictions (one before the first decoder layer, one "
        "after each layer) and the terms per prediction (class, mask BCE, dice).",
    )


def _call(fn: Callable, *args, what: str):
    try:
        return fn(*args)
    except Exception as error:  # the student's code: report, do not crash the check
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


def check_ex2(pairwise_dice_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Ex. 2: ``pairwise_dice(logits [Q, P], targets [N, P]) -> [Q, N]`` equal to the package's
    ``m2f_lite.matcher.pairwise_dice``."""
    g = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(5, 40, generator=g)  # [Q, P]
    targets = (torch.rand(3, 40, generator=g) > 0.5).float()  # [N, P]
    targets[2] = 0.0  # an empty target: the +1 smoothing keeps it finite
    out = _call(pairwise_dice_fn, logits.clone(), targets.clone(), what="your pairwise_dice")
    assert isinstance(out, Tensor), f"expected a Tensor, got {type(out).__name__}"
    if tuple(out.shape) == (3, 5):
        raise AssertionError(
            "the result is [N, Q] = [3, 5]; expected [Q, N] = [5, 3]: rows are predictions, "
            "columns are targets (use probs @ targets.T)"
        )
    assert tuple(out.shape) == (5, 3), (
        f"expected shape [Q, N] = [5, 3] for logits [5, 40] and targets [3, 40], got {tuple(out.shape)}"
    )
    expected = pairwise_dice(logits, targets)
    if torch.allclose(out.float(), expected, atol=1e-5):
        return
    probs = logits.sigmoid()
    inter = 2 * probs @ targets.T
    sums = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    no_smoothing = 1 - inter / sums.clamp_min(1e-12)
    on_logits = 1 - (2 * logits @ targets.T + 1) / (logits.sum(-1)[:, None] + targets.sum(-1) + 1)
    if torch.allclose(out[:, :2].float(), no_smoothing[:, :2], atol=1e-5):
        raise AssertionError(
            "close, but without the +1 smoothing: 1 − (2·Σ p·t + 1) / (Σ p + Σ t + 1) (see the "
            "dice equation); the +1 keeps the loss finite and smooth for empty masks."
        )
    if torch.allclose(out.float(), on_logits, atol=1e-5):
        raise AssertionError("the dice loss uses probabilities p = sigmoid(logits), not the logits")
    worst = (out.float() - expected).abs().max()
    raise AssertionError(
        f"values differ from the dice loss by up to {worst:.3g}: expected 1 − (2·Σ_k p_k t_k + 1) / "
        "(Σ_k p_k + Σ_k t_k + 1) for every (prediction, target) pair, with p = sigmoid(logits)."
    )


def _random_costs() -> list[Tensor]:
    """Cost matrices [Q, N], Q ≥ N, including one where greedy matching is not optimal."""
    g = torch.Generator().manual_seed(3)
    costs = [torch.tensor([[1.0, 2.0], [1.5, 10.0], [5.0, 5.0]])]  # greedy: 0→0 then 2→1: 6 > 3.5
    for q, n in [(3, 3), (5, 2), (6, 4), (4, 1)]:
        costs.append(torch.rand(q, n, generator=g) * 10)
    return costs


def check_ex3(match_fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
    """Ex. 3: a brute-force matcher whose total cost equals the optimum, which the package's
    ``m2f_lite.matcher.solve_assignment`` (scipy's Hungarian solver) finds."""
    for cost in _random_costs():
        q, n = cost.shape
        out = _call(match_fn, cost.clone(), what=f"your matcher on a {q}×{n} cost")
        assert isinstance(out, tuple) and len(out) == 2, (
            f"expected a tuple (rows, cols), got {type(out).__name__}"
        )
        rows, cols = (torch.as_tensor(x).long().flatten() for x in out)
        assert len(rows) == len(cols) == n, (
            f"cost {q}×{n}: expected {n} pairs (one per target), got {len(rows)} rows and "
            f"{len(cols)} cols"
        )
        assert int(rows.min()) >= 0 and int(rows.max()) < q and int(cols.max()) < n, (
            f"cost {q}×{n}: indices out of range (rows must be < {q}, cols < {n})"
        )
        assert sorted(cols.tolist()) == list(range(n)), (
            f"cost {q}×{n}: every target must be matched exactly once, got cols {cols.tolist()}"
        )
        assert len(set(rows.tolist())) == n, (
            f"cost {q}×{n}: a prediction was given two targets (rows {rows.tolist()}): a matching "
            "is one-to-one, which a per-target argmin does not guarantee."
        )
        best_rows, best_cols = solve_assignment(cost)
        best = float(cost[best_rows, best_cols].sum())
        got = float(cost[rows, cols].sum())
        assert got <= best + 1e-6, (
            f"cost {q}×{n}: your matching costs {got:.4f} but the minimum is {best:.4f}. A greedy "
            "choice (cheapest pair first) can force an expensive pair later: try every "
            "assignment (itertools.permutations(range(Q), N))."
        )


def _test_logits() -> Tensor:
    """Four mask logit maps [4, 1, 32, 32]: rectangles of different sizes, positive inside."""
    yy, xx = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    maps = []
    for cx, cy, a, b in [(10, 12, 8, 4), (20, 18, 5, 10), (16, 16, 12, 7), (8, 24, 4, 6)]:
        d = torch.maximum((xx - cx).abs() / a, (yy - cy).abs() / b)  # 1 on the rectangle's edge
        maps.append(2.0 * min(a, b) * (1 - d))  # [32, 32], |logit| grows away from the edge
    return torch.stack(maps)[:, None]  # [4, 1, 32, 32]


def _abs_logit_quantiles(logits: Tensor, points: Tensor) -> Tensor:
    values = point_sample(logits, points)[:, 0].abs().flatten()  # [M·P]
    return torch.quantile(values, torch.tensor([0.25, 0.5, 0.9]))


def check_ex4(sample_fn: Callable[..., Tensor]) -> None:
    """Ex. 4: importance sampling whose points land where the package's do (|logit| quantiles)."""
    logits = _test_logits()
    num_points = 1024
    for oversample, ratio in [(3.0, 0.75), (3.0, 0.0), (2.0, 1.0)]:
        setting = f"oversample_ratio={oversample}, importance_sample_ratio={ratio}"
        with torch.random.fork_rng():  # leave the caller's random state alone
            torch.manual_seed(0)
            points = _call(
                sample_fn, logits.clone(), num_points, oversample, ratio, what="your sampler"
            )
            expected = importance_sampled_points(
                logits,
                num_points=num_points,
                oversample_ratio=oversample,
                importance_sample_ratio=ratio,
            )
        assert isinstance(points, Tensor), f"expected a Tensor, got {type(points).__name__}"
        assert tuple(points.shape) == (4, num_points, 2), (
            f"{setting}: expected points [M, P, 2] = [4, {num_points}, 2] for logits [4, 1, 32, 32], "
            f"got {tuple(points.shape)}"
        )
        assert points.is_floating_point() and bool(((points >= 0) & (points <= 1)).all()), (
            "points must be floats in [0, 1]² (relative (x, y) coordinates, as point_sample expects)"
        )
        got, want = _abs_logit_quantiles(logits, points), _abs_logit_quantiles(logits, expected)
        ok = ((got - want).abs() <= 0.2 * want + 0.3).all()
        if ok:
            continue
        if got[1] > 1.5 * want[1] + 0.3:
            hint = (
                "your points sit where |logit| is larger (more certain) than expected: keep the "
                "candidates with the *smallest* |logit| (uncertainty = −|logit|, topk of it)."
            )
        elif got[2] < 0.7 * want[2]:
            hint = (
                "your points are all near the boundary: only int(importance_sample_ratio · P) "
                "should be chosen by uncertainty, the rest drawn uniformly."
            )
        else:
            hint = (
                "draw int(P · oversample_ratio) uniform candidates, keep the "
                "int(importance_sample_ratio · P) most uncertain, and add uniform points."
            )
        raise AssertionError(
            f"{setting}: the 25/50/90 % quantiles of |logit| at your points are "
            f"{[round(v, 2) for v in got.tolist()]}, expected about "
            f"{[round(v, 2) for v in want.tolist()]}. {hint}"
        )
