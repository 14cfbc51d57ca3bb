"""Hungarian matching: point sampling, optimality, invariances, and the awkward inputs."""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.matcher import (
    HungarianMatcher,
    check_targets,
    finite_cost,
    resize_masks_nearest,
    solve_assignment,
)
from m2f_lite.point_sampling import point_sample, point_sample_binary

K = 5  # classes (the logits have K + 1 columns)


def make_outputs(batch: int, queries: int, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch, queries, K + 1, generator=g),
        "pred_masks": 3 * torch.randn(batch, queries, size, size, generator=g),
    }


def make_target(num: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "labels": torch.randint(0, K, (num,), generator=g),
        "masks": torch.rand(num, size, size, generator=g) > 0.6,
    }


def brute_force_min(cost: torch.Tensor) -> float:
    """The minimum total cost over every one-to-one assignment of min(Q, N) pairs."""
    q, n = cost.shape
    if q >= n:
        return min(
            sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n)
        )
    return min(
        sum(cost[i, p[i]].item() for i in range(q)) for p in itertools.permutations(range(n), q)
    )


def fixed_points(monkeypatch: pytest.MonkeyPatch, seed: int = 123) -> None:
    """Make torch.rand return the same numbers for the same shape, whatever was drawn before."""

    real_rand = torch.rand

    def rand(*size, device=None, generator=None, **kwargs):
        if generator is not None:  # the test's own draws are left alone
            return real_rand(*size, generator=generator, **kwargs)
        g = torch.Generator().manual_seed(seed)
        return real_rand(*size, generator=g, **kwargs).to(device)

    monkeypatch.setattr(torch, "rand", rand)


# ---- point sampling ------------------------------------------------------------------------------


def test_point_sample_binary_equals_grid_sample_on_float_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 13, 17, generator=g) > 0.5
    points = torch.rand(6, 200, 2, generator=g)
    points[0, :5] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    reference = point_sample(masks[:, None].float(), points)[:, 0]  # [N, P]
    torch.testing.assert_close(point_sample_binary(masks, points), reference, atol=2e-6, rtol=0)
    # shared points, and a subset of rows in any order
    shared = point_sample(masks[:, None].float(), points[:1].expand(6, -1, -1))[:, 0]
    torch.testing.assert_close(point_sample_binary(masks, points[0]), shared, atol=2e-6, rtol=0)
    rows = torch.tensor([4, 1, 4])
    sub = point_sample(masks[rows, None].float(), points[:3])[:, 0]
    torch.testing.assert_close(
        point_sample_binary(masks, points[:3], rows=rows), sub, atol=2e-6, rtol=0
    )


def test_point_sample_reads_pixel_centres_exactly():
    masks = torch.zeros(1, 4, 8, dtype=torch.bool)
    masks[0, 2, 5] = True
    centre = torch.tensor([[[(5 + 0.5) / 8, (2 + 0.5) / 4]]])  # (x, y) of pixel row 2, column 5
    assert point_sample_binary(masks, centre).item() == 1.0
    assert point_sample(masks[:, None].float(), centre).item() == 1.0


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (16, 3)])
def test_resize_masks_nearest_equals_interpolate(size):
    masks = torch.rand(3, 32, 24, generator=torch.Generator().manual_seed(1)) > 0.5
    expected = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].bool()
    assert torch.equal(resize_masks_nearest(masks, size), expected)


# ---- the assignment ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 5), (1, 4), (5, 1)])
def test_solve_assignment_is_optimal_on_random_costs(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.randn(*shape, generator=g)
        rows, cols = solve_assignment(cost)
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == min(shape) and len(set(rows.tolist())) == len(
            set(cols.tolist())
        ) == min(shape)
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


def reference_cost(matcher, logits, pred_masks, labels, masks, points):
    """The official cost, pair by pair: grid_sample on float masks, F.binary_cross_entropy_with_logits."""
    probs = logits.softmax(-1)
    pred = point_sample(pred_masks[:, None], points.expand(len(pred_masks), -1, -1))[:, 0]  # [Q, P]
    tgt = point_sample(masks[:, None].float(), points.expand(len(masks), -1, -1))[:, 0]  # [N, P]
    cost = torch.zeros(len(pred), len(tgt))
    for i in range(len(pred)):
        for j in range(len(tgt)):
            bce = F.binary_cross_entropy_with_logits(pred[i], tgt[j])
            p = pred[i].sigmoid()
            dice = 1 - (2 * (p * tgt[j]).sum() + 1) / (p.sum() + tgt[j].sum() + 1)
            cost[i, j] = (
                -matcher.cost_class * probs[i, labels[j]]
                + matcher.cost_mask * bce
                + matcher.cost_dice * dice
            )
    return cost


def test_full_matcher_is_optimal_against_brute_force(monkeypatch):
    fixed_points(monkeypatch)
    matcher = HungarianMatcher(num_points=50)
    outputs = make_outputs(1, 6)
    target = make_target(4)
    points = torch.rand(
        1, 50, 2
    )  # the points the matcher draws (patched: same shape, same numbers)
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_masks"][0], target["labels"], target["masks"]
    )
    expected = reference_cost(
        matcher,
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        target["labels"],
        target["masks"],
        points,
    )
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=1e-5)
    ((rows, cols),) = matcher(outputs, [target])
    assert sorted(cols.tolist()) == [0, 1, 2, 3]
    assert expected[rows, cols].sum().item() == pytest.approx(brute_force_min(expected), abs=1e-4)


def test_full_mask_matching_uses_targets_resized_to_the_prediction():
    matcher = HungarianMatcher(point_matching=False)
    outputs = make_outputs(1, 5, size=8)
    target = make_target(3, size=32)
    logits, pred = outputs["pred_logits"][0], outputs["pred_masks"][0]
    small = F.interpolate(target["masks"][:, None].float(), size=(8, 8), mode="nearest")[:, 0]
    flat = small.flatten(1)
    bce = torch.stack(
        [
            torch.stack([F.binary_cross_entropy_with_logits(p, t) for t in flat])
            for p in pred.flatten(1)
        ]
    )
    probs = pred.flatten(1).sigmoid()
    dice = 1 - (2 * probs @ flat.T + 1) / (probs.sum(1)[:, None] + flat.sum(1)[None] + 1)
    expected = -2 * logits.softmax(-1)[:, target["labels"]] + 5 * bce + 5 * dice
    cost = matcher.cost_matrix(logits, pred, target["labels"], target["masks"])
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=1e-5)


# ---- invariances -----------------------------------------------------------------------------------


def test_batched_matching_equals_per_image_matching():
    matcher = HungarianMatcher(num_points=64)
    outputs = make_outputs(3, 7)
    targets = [make_target(3, seed=1), make_target(5, seed=2), make_target(1, seed=3)]
    torch.manual_seed(0)
    batched = matcher(outputs, targets)
    torch.manual_seed(0)  # the per-image calls draw the same points in the same order
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in outputs.items()}
        ((rows, cols),) = matcher(one, [targets[b]])
        assert torch.equal(rows, batched[b][0]) and torch.equal(cols, batched[b][1])


def test_permuting_queries_permutes_the_assignment():
    matcher = HungarianMatcher(num_points=64)
    outputs = make_outputs(1, 8)
    target = make_target(4)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    permuted = {k: v[:, perm] for k, v in outputs.items()}  # query i of `permuted` is query perm[i]
    torch.manual_seed(0)
    ((rows, cols),) = matcher(outputs, [target])
    torch.manual_seed(0)
    ((rows_p, cols_p),) = matcher(permuted, [target])
    original = dict(zip(cols.tolist(), rows.tolist()))  # target -> query
    assert {j: perm[i].item() for i, j in zip(rows_p.tolist(), cols_p.tolist())} == original


def test_perfect_predictions_are_matched_to_their_targets():
    target = make_target(3, size=16, seed=4)
    target["masks"][:, 0, 0] = True  # no empty mask
    queries = [5, 0, 2]  # query q predicts target j
    logits = torch.full((1, 6, K + 1), -20.0)
    logits[0, :, K] = 20.0  # every other query says "no object"
    masks = torch.full((1, 6, 16, 16), -20.0)
    for j, q in enumerate(queries):
        logits[0, q, target["labels"][j]] = 20.0
        logits[0, q, K] = -20.0
        masks[0, q] = 40.0 * target["masks"][j].float() - 20.0
    for point_matching in (True, False):
        matcher = HungarianMatcher(num_points=256, point_matching=point_matching)
        ((rows, cols),) = matcher({"pred_logits": logits, "pred_masks": masks}, [target])
        assert dict(zip(cols.tolist(), rows.tolist())) == {0: 5, 1: 0, 2: 2}


# ---- awkward inputs ------------------------------------------------------------------------------


def test_images_without_targets_give_empty_indices():
    matcher = HungarianMatcher(num_points=16)
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
    }
    indices = matcher(make_outputs(2, 4), [empty, make_target(2)])
    assert indices[0][0].shape == indices[0][1].shape == (0,)
    assert indices[0][0].dtype == indices[0][1].dtype == torch.int64
    assert len(indices[1][0]) == 2


def test_finite_cost_keeps_the_optimum_among_finite_pairs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.randn(6, 4, generator=g)
        bad = torch.rand(6, 4, generator=g) < 0.3
        cost[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
            torch.randint(0, 3, (int(bad.sum()),), generator=g)
        ]
        rows, cols = solve_assignment(cost)
        # the fewest non-finite pairs possible, then the cheapest finite ones
        fewest = min(
            (
                int(bad[list(p), range(4)].sum()),
                cost[list(p), range(4)][~bad[list(p), range(4)]].sum().item(),
            )
            for p in itertools.permutations(range(6), 4)
        )
        got = (int(bad[rows, cols].sum()), cost[rows, cols][~bad[rows, cols]].sum().item())
        assert got[0] == fewest[0] and got[1] == pytest.approx(fewest[1], abs=1e-5)
    assert torch.isfinite(finite_cost(torch.full((3, 2), float("nan")))).all()


def test_nan_predictions_never_make_the_cost_matrix_infeasible():
    matcher = HungarianMatcher(num_points=32)
    outputs = make_outputs(2, 5)
    outputs["pred_logits"][0, 1] = float("nan")  # a query that diverged
    outputs["pred_masks"][0, 3] = float("inf")
    outputs["pred_logits"][1] = float("nan")  # a whole image that diverged
    targets = [make_target(3, seed=1), make_target(2, seed=2)]
    indices = matcher(outputs, targets)
    rows, cols = indices[0]
    assert sorted(cols.tolist()) == [0, 1, 2]
    assert (
        1 not in rows.tolist() and 3 not in rows.tolist()
    )  # diverged queries only when unavoidable
    assert len(indices[1][0]) == 2


def test_more_targets_than_queries_matches_every_query_and_warns_once():
    matcher = HungarianMatcher(num_points=32)
    outputs = make_outputs(2, 3)
    targets = [make_target(5, seed=1), make_target(4, seed=2)]
    with pytest.warns(UserWarning, match="only 3 queries"):
        indices = matcher(outputs, targets)
    for rows, cols in indices:
        assert rows.tolist() == [0, 1, 2] and len(set(cols.tolist())) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matcher(outputs, targets)  # warned once already


def test_targets_that_do_not_fit_raise_clear_errors():
    outputs = make_outputs(1, 4, size=8)
    with pytest.raises(ValueError, match="pad_target_masks"):
        check_targets(
            outputs,
            [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 32, 20, dtype=torch.bool)}],
        )
    with pytest.raises(ValueError, match=r"labels.*must be in \[0, 5\)"):
        check_targets(
            outputs,
            [{"labels": torch.tensor([5]), "masks": torch.zeros(1, 32, 32, dtype=torch.bool)}],
        )
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        check_targets(outputs, [make_target(1), make_target(1)])
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def test_matching_equals_hf_transformers_matcher():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher

    outputs = make_outputs(2, 6)
    targets = [make_target(3, seed=1), make_target(4, seed=2)]
    hf = Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    torch.manual_seed(0)  # both draw torch.rand(1, P, 2) per image, in the same order
    expected = hf(
        outputs["pred_masks"],
        outputs["pred_logits"],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
    )
    torch.manual_seed(0)
    got = HungarianMatcher(num_points=64)(outputs, targets)
    for (rows, cols), (hf_rows, hf_cols) in zip(got, expected):
        assert torch.equal(rows, hf_rows) and torch.equal(cols, hf_cols)
