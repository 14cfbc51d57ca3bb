"""The chapter 6 exercise checks accept right answers and reject typical wrong ones, with a hint."""

from __future__ import annotations

import itertools

import pytest
import torch

from m2f_lite.exercises import ch06
from m2f_lite.matcher import pairwise_dice
from m2f_lite.point_sampling import point_sample


def test_ex1_number_of_loss_terms():
    ch06.check_ex1(30)
    with pytest.raises(AssertionError, match="learnable queries"):
        ch06.check_ex1(27)
    with pytest.raises(AssertionError, match="three terms"):
        ch06.check_ex1(10)
    with pytest.raises(AssertionError, match="expected an int"):
        ch06.check_ex1("30")


def _dice_by_pairs(logits, targets):
    """Pair by pair, as the paper writes the dice cost (independent of the package's matrix form)."""
    probs = logits.sigmoid()
    return torch.tensor(
        [[1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1) for t in targets] for p in probs]
    )  # [Q, N]


def test_ex2_dice_cost():
    ch06.check_ex2(_dice_by_pairs)  # the check compares with pairwise_dice itself

    def transposed(logits, targets):
        return pairwise_dice(logits, targets).T

    def without_smoothing(logits, targets):
        probs = logits.sigmoid()
        return 1 - 2 * probs @ targets.T / (probs.sum(-1)[:, None] + targets.sum(-1)[None, :])

    def on_logits(logits, targets):
        return 1 - (2 * logits @ targets.T + 1) / (logits.sum(-1)[:, None] + targets.sum(-1) + 1)

    with pytest.raises(AssertionError, match=r"\[Q, N\]"):
        ch06.check_ex2(transposed)
    with pytest.raises(AssertionError, match=r"\+1 smoothing"):
        ch06.check_ex2(without_smoothing)
    with pytest.raises(AssertionError, match="sigmoid"):
        ch06.check_ex2(on_logits)
    with pytest.raises(AssertionError, match="raised NotImplementedError"):
        ch06.check_ex2(lambda logits, targets: (_ for _ in ()).throw(NotImplementedError("todo")))


def brute_force(cost):
    q, n = cost.shape
    options = torch.tensor(list(itertools.permutations(range(q), n)), dtype=torch.int64)
    totals = cost[options, torch.arange(n)].sum(1)
    return options[totals.argmin()], torch.arange(n)


def test_ex3_matching():
    ch06.check_ex3(brute_force)
    ch06.check_ex3(lambda cost: brute_force(cost.T.contiguous().T))  # any layout works

    def greedy(cost):  # cheapest remaining pair first: one-to-one, but not optimal
        cost = cost.clone()
        rows, cols = [], []
        for _ in range(cost.shape[1]):
            i, j = divmod(int(cost.argmin()), cost.shape[1])
            rows.append(i)
            cols.append(j)
            cost[i, :] = float("inf")
            cost[:, j] = float("inf")
        return torch.tensor(rows), torch.tensor(cols)

    def column_argmin(cost):  # may give one prediction two targets
        return cost.argmin(0), torch.arange(cost.shape[1])

    with pytest.raises(AssertionError, match="minimum is"):
        ch06.check_ex3(greedy)
    with pytest.raises(AssertionError, match="two targets"):
        ch06.check_ex3(column_argmin)


def own_sampler(mask_logits, num_points, oversample_ratio, importance_sample_ratio):
    # written here, not the package's importance_sampled_points, which the check compares with
    m = mask_logits.shape[0]
    candidates = torch.rand(m, int(num_points * oversample_ratio), 2)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # [M, kP]
    keep = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(keep, dim=1).indices
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(m, num_points - keep, 2)], dim=1)


def test_ex4_importance_sampling():
    state = torch.random.get_rng_state()
    ch06.check_ex4(own_sampler)
    assert torch.equal(torch.random.get_rng_state(), state)  # the check left the RNG alone

    def most_certain(mask_logits, num_points, oversample_ratio, importance_sample_ratio):
        m = mask_logits.shape[0]
        candidates = torch.rand(m, int(num_points * oversample_ratio), 2)
        scores = point_sample(mask_logits, candidates)[:, 0].abs()  # certainty, not uncertainty
        keep = int(importance_sample_ratio * num_points)
        top = scores.topk(keep, dim=1).indices
        chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
        return torch.cat([chosen, torch.rand(m, num_points - keep, 2)], dim=1)

    def no_random_part(mask_logits, num_points, oversample_ratio, importance_sample_ratio):
        return own_sampler(mask_logits, num_points, oversample_ratio, 1.0)

    with pytest.raises(AssertionError, match="smallest"):
        ch06.check_ex4(most_certain)
    with pytest.raises(AssertionError, match="drawn uniformly"):
        ch06.check_ex4(no_random_part)
    with pytest.raises(AssertionError, match=r"\[M, P, 2\]"):
        ch06.check_ex4(lambda logits, p, o, r: torch.rand(p, 2))
