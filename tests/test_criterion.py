"""The set criterion: equal to HF transformers' Mask2FormerLoss, and the properties the paper relies on."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m2f_lite.config import get_config
from m2f_lite.criterion import SetCriterion, build_criterion, pad_target_masks
from m2f_lite.matcher import HungarianMatcher
from m2f_lite.point_sampling import importance_sampled_points, point_sample

K = 4  # classes
P = 64  # points per mask: small, so the tests stay fast


def make_prediction(
    batch: int, queries: int, size: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.randn(batch, queries, K + 1, generator=g).requires_grad_(),
        "pred_masks": (3 * torch.randn(batch, queries, size, size, generator=g)).requires_grad_(),
    }


def make_outputs(batch=2, queries=6, size=8, num_aux=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    outputs = make_prediction(batch, queries, size, g)
    outputs["aux_outputs"] = [make_prediction(batch, queries, size, g) for _ in range(num_aux)]
    return outputs


def make_target(num: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "labels": torch.randint(0, K, (num,), generator=g),
        "masks": torch.rand(num, size, size, generator=g) > 0.6,
    }


def empty_target(size: int = 32) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, size, size, dtype=torch.bool),
    }


def make_criterion(**kwargs) -> SetCriterion:
    point_matching = kwargs.pop("point_matching", True)
    matcher = HungarianMatcher(num_points=P, point_matching=point_matching)
    return SetCriterion(num_classes=K, matcher=matcher, num_points=P, **kwargs)


def test_losses_equal_hf_transformers_mask2former_loss(monkeypatch):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    outputs = make_outputs(num_aux=2)
    targets = [make_target(3, seed=1), make_target(2, seed=2)]
    # Record every random draw: both implementations draw their points with torch.rand, in the
    # official order and shapes (matcher: [1, P, 2] per image; loss: [M, 3P, 2] then [M, P/4, 2]),
    # so the same seed gives both the same points; the recording shows that it did.
    draws: list[torch.Tensor] = []
    real_rand = torch.rand

    def recording_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(torch, "rand", recording_rand)

    torch.manual_seed(0)
    ours = make_criterion()(outputs, targets)
    our_draws, draws[:] = list(draws), []

    hf = Mask2FormerLoss(
        Mask2FormerConfig(
            num_labels=K, train_num_points=P
        ),  # official loss settings are HF's defaults
        weight_dict={"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
    )
    torch.manual_seed(0)
    theirs = hf(
        masks_queries_logits=outputs["pred_masks"],
        class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"].float() for t in targets],
        class_labels=[t["labels"] for t in targets],
        auxiliary_predictions=[
            {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
            for a in outputs["aux_outputs"]
        ],
    )
    assert len(our_draws) == len(draws) == 3 * (2 + 2)  # 3 predictions × (2 images + 2 loss draws)
    for mine, hf_draw in zip(our_draws, draws):
        assert torch.equal(mine, hf_draw)
    # HF names the class term "loss_cross_entropy"; the official (and we) "loss_ce". HF averages the
    # mask count over processes only through `accelerate` (ignoring a plain torch.distributed run),
    # the official through torch.distributed: with one process both give the batch's count.
    assert len(theirs) == len(ours) == 9
    for name, value in ours.items():
        hf_value = theirs[name.replace("loss_ce", "loss_cross_entropy")]
        torch.testing.assert_close(value, hf_value, atol=1e-5, rtol=0)


def test_total_is_the_weighted_sum_of_the_terms():
    criterion = make_criterion(class_weight=2.0, mask_weight=5.0, dice_weight=3.0)
    losses = criterion(make_outputs(num_aux=3), [make_target(3), make_target(1, seed=1)])
    assert set(losses) == {
        f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")
    }
    expected = sum(
        {"ce": 2.0, "mask": 5.0, "dice": 3.0}[name.split("_")[1]] * value
        for name, value in losses.items()
    )
    torch.testing.assert_close(criterion.total(losses), expected)
    assert criterion.weight("loss_dice_2") == 3.0 and criterion.weight("loss_ce") == 2.0


def test_without_deep_supervision_only_the_final_prediction_is_supervised():
    losses = make_criterion(deep_supervision=False)(
        make_outputs(num_aux=3), [make_target(2), make_target(1)]
    )
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


@pytest.mark.parametrize("point_loss", [True, False])
def test_gradients_reach_every_auxiliary_output(point_loss):
    outputs = make_outputs(num_aux=3)
    criterion = make_criterion(point_loss=point_loss, point_matching=point_loss)
    criterion.total(criterion(outputs, [make_target(3), make_target(2, seed=1)])).backward()
    for prediction in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            grad = prediction[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_perfect_predictions_give_near_zero_losses(monkeypatch):
    # Points at pixel centres, where bilinear sampling returns the pixel itself, so that a sampled
    # target is exactly 0 or 1 (a point between pixels of a boundary gets a soft label, whose
    # cross-entropy is never 0: that is the loss's floor, not an error of the prediction).
    size = 16
    real_rand = torch.rand

    def pixel_centres(*shape, device=None, **kwargs):
        return ((torch.randint(0, size, shape) + 0.5) / size).to(device)

    target = make_target(3, size=size, seed=5)
    target["masks"][:, 0, 0] = True  # no empty mask
    logits = torch.full((1, 5, K + 1), -20.0)
    logits[0, :, K] = 20.0  # the unmatched queries say "no object"
    masks = torch.full((1, 5, size, size), -20.0)
    for j, q in enumerate([4, 1, 2]):
        logits[0, q, target["labels"][j]], logits[0, q, K] = 20.0, -20.0
        masks[0, q] = 40.0 * target["masks"][j].float() - 20.0
    outputs = {"pred_logits": logits, "pred_masks": masks}
    monkeypatch.setattr(torch, "rand", pixel_centres)
    losses = make_criterion()(outputs, [target])
    monkeypatch.setattr(torch, "rand", real_rand)
    assert losses["loss_mask"] < 1e-6 and losses["loss_dice"] < 1e-6 and losses["loss_ce"] < 1e-6
    # on full masks (the ablation) no point lands between pixels: near zero without patching
    full = make_criterion(point_loss=False, point_matching=False)(outputs, [target])
    assert full["loss_mask"] < 1e-6 and full["loss_dice"] < 1e-6
    # and an imperfect prediction is far from zero
    outputs["pred_masks"] = -masks
    assert (
        make_criterion(point_loss=False, point_matching=False)(outputs, [target])["loss_mask"] > 1.0
    )


def test_full_mask_loss_upsamples_the_matched_predictions():
    outputs = make_outputs(num_aux=0)
    targets = [make_target(3, seed=1), make_target(2, seed=2)]
    criterion = make_criterion(point_loss=False, point_matching=False)
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)  # deterministic without points
    logits, labels = [], []
    for b, (rows, cols) in enumerate(indices):
        up = F.interpolate(outputs["pred_masks"][b, rows][:, None], size=(32, 32), mode="bilinear")
        logits.append(up.flatten(1))
        labels.append(targets[b]["masks"][cols].flatten(1).float())
    logits, labels = torch.cat(logits), torch.cat(labels)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / 5
    p = logits.sigmoid()
    dice = (1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)).sum() / 5
    torch.testing.assert_close(losses["loss_mask"], bce)
    torch.testing.assert_close(losses["loss_dice"], dice)


def test_images_without_targets_get_only_the_class_loss():
    outputs = make_outputs(num_aux=1)
    criterion = make_criterion()
    losses = criterion(outputs, [empty_target(), empty_target()])
    for name, value in losses.items():
        assert torch.isfinite(value), name
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_dice_0"] == 0
    all_no_object = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), torch.full((2, 6), K))
    torch.testing.assert_close(losses["loss_ce"], all_no_object)  # weights all 0.1: the mean
    criterion.total(losses).backward()
    assert torch.equal(outputs["pred_masks"].grad, torch.zeros_like(outputs["pred_masks"]))
    assert outputs["pred_logits"].grad.abs().sum() > 0
    # one image with targets, one without
    mixed = criterion(make_outputs(num_aux=0), [make_target(2), empty_target()])
    assert all(torch.isfinite(v) for v in mixed.values()) and mixed["loss_mask"] > 0


def test_no_object_weight_enters_the_class_loss_as_the_official():
    criterion = make_criterion(no_object_weight=0.1)
    outputs = make_outputs(batch=1, num_aux=0)
    target = make_target(2)
    torch.manual_seed(0)
    losses = criterion(outputs, [target])
    torch.manual_seed(0)  # the matcher draws its points first: the same matching again
    rows, cols = criterion.matcher(outputs, [target])[0]
    classes = torch.full((6,), K)
    classes[rows] = target["labels"][cols]
    per_query = F.cross_entropy(outputs["pred_logits"][0], classes, reduction="none")
    weights = torch.where(classes == K, 0.1, 1.0)
    torch.testing.assert_close(losses["loss_ce"], (weights * per_query).sum() / weights.sum())


def test_importance_sampling_keeps_the_most_uncertain_candidates(monkeypatch):
    draws = []
    real_rand = torch.rand
    monkeypatch.setattr(
        torch, "rand", lambda *a, **k: draws.append(real_rand(*a, **k)) or draws[-1]
    )
    logits = 4 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    points = importance_sampled_points(
        logits, num_points=40, oversample_ratio=3, importance_sample_ratio=0.75
    )
    candidates, fresh = draws  # [3, 120, 2] uniform candidates, then [3, 10, 2] uniform points
    assert (
        points.shape == (3, 40, 2) and candidates.shape == (3, 120, 2) and fresh.shape == (3, 10, 2)
    )
    assert torch.equal(points[:, 30:], fresh)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # [3, 120]
    chosen = -point_sample(logits, points[:, :30])[:, 0].abs()  # [3, 30]
    threshold = uncertainty.topk(30, dim=1).values[:, -1:]
    assert (chosen >= threshold).all()  # the 30 most uncertain of the 120 candidates
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        importance_sampled_points(
            logits, num_points=4, oversample_ratio=3, importance_sample_ratio=1.5
        )


def test_loss_in_bfloat16_autocast_is_float32_and_finite():
    outputs = make_outputs(num_aux=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = {k: v.bfloat16() for k, v in outputs.items() if k != "aux_outputs"}
        losses = make_criterion()(bf16, [make_target(2), make_target(1)])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_targets_must_be_padded_like_the_images():
    outputs = make_outputs(batch=1, size=8, num_aux=0)
    unpadded = {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 24, dtype=torch.bool)}
    with pytest.raises(ValueError, match="pad_target_masks"):
        make_criterion()(outputs, [unpadded])
    (padded,) = pad_target_masks([unpadded], (32, 32))
    assert padded["masks"].shape == (1, 32, 32) and padded["masks"].sum() == 32 * 24
    assert torch.isfinite(make_criterion()(outputs, [padded])["loss_mask"])
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(num_classes=K + 1, matcher=HungarianMatcher())(outputs, [padded])


def test_build_criterion_reads_the_loss_config():
    cfg = get_config(
        "shapes_tiny", ["loss.point_loss=false", "loss.point_matching=false", "loss.dice_weight=4"]
    )
    criterion = build_criterion(cfg)
    assert criterion.num_classes == cfg.model.num_classes == 7
    assert criterion.num_points == cfg.loss.num_points == 1024
    assert not criterion.point_loss and not criterion.matcher.point_matching
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 4.0}
    assert criterion.matcher.cost_dice == 4.0 and float(
        criterion.empty_weight[-1]
    ) == pytest.approx(0.1)


# ---- DDP: num_masks is the average over processes ------------------------------------------------


def test_a_single_process_group_changes_nothing(tmp_path):
    outputs, targets = make_outputs(num_aux=1), [make_target(3), make_target(2, seed=1)]
    torch.manual_seed(0)
    alone = make_criterion()(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        grouped = make_criterion()(outputs, targets)
    finally:
        dist.destroy_process_group()
    for name in alone:
        torch.testing.assert_close(grouped[name], alone[name], rtol=0, atol=0)


def _two_process_worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    targets = [make_target(3, seed=1)] if rank == 0 else [make_target(1, seed=2)]  # 4 masks in all
    outputs = make_outputs(batch=1, num_aux=0, seed=rank)
    criterion = make_criterion()
    torch.manual_seed(0)
    local = criterion(outputs, targets)  # before the group exists: normalised by this rank's count
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert criterion.num_masks(targets, torch.device("cpu")) == 2.0  # (3 + 1) / 2 processes
        torch.manual_seed(0)
        grouped = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    scale = len(targets[0]["labels"]) / 2.0  # local count / global average
    torch.testing.assert_close(grouped["loss_mask"], local["loss_mask"] * scale)
    torch.testing.assert_close(grouped["loss_dice"], local["loss_dice"] * scale)
    torch.testing.assert_close(grouped["loss_ce"], local["loss_ce"])  # a mean over queries


def test_two_processes_normalise_by_the_global_average_mask_count(tmp_path):
    mp.spawn(_two_process_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
