"""The training loop on a tiny shapes dataset: it learns, accumulates gradients, logs and evaluates."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tiny_run import make_shapes, tiny_config

from m2f_lite import engine
from m2f_lite.criterion import build_criterion
from m2f_lite.data.build import build_dataset, collate
from m2f_lite.distributed import Runtime
from m2f_lite.modeling.mask2former import build_model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_loss_goes_down_on_a_fixed_batch(tmp_path, shapes):
    # two training images, no augmentation, batch 2: every step sees the same batch
    small = make_shapes(tmp_path / "two", n_train=2, n_val=2)
    cfg = tiny_config(small, tmp_path / "run", "data.mapper=none", "solver.max_iter=25", "solver.base_lr=1e-3",
                      "solver.clip_value=0", "solver.checkpoint_period=100")  # fmt: skip
    result = engine.train(cfg)
    losses = [r["loss"] for r in _records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 25 and result["iteration"] == 25
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def _gradients(model, criterion, batches, grad_accum: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine.forward_backward(
        model, criterion, batches, scaler, rt=Runtime(), dtype=None, grad_accum=grad_accum
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accum_equals_the_big_batch(shapes, tmp_path):
    # Full-mask losses (no random points) make the two computations comparable. The criterion
    # divides the mask losses by the masks of its (micro-)batch, and the class loss is a weighted
    # mean over its queries: accumulating two micro-batches with the same number of masks gives
    # exactly the big batch's gradient. (Frozen BatchNorm: trainable BN's batch statistics would
    # differ between the batch and its halves.)
    cfg = tiny_config(
        shapes,
        tmp_path,
        "loss.point_loss=false",
        "loss.point_matching=false",
        "model.backbone_norm=frozen_bn",
    )
    torch.manual_seed(0)
    model, criterion = build_model(cfg), build_criterion(cfg)
    ds = build_dataset(cfg, "train", train=False)
    samples = [ds[i] for i in range(4)]
    n = min(len(s["labels"]) for s in samples)
    for s in samples:  # the same number of masks in every image
        s["labels"], s["masks"] = s["labels"][:n], s["masks"][:n]
    big = _gradients(model, criterion, iter([collate(samples)]), grad_accum=1)
    accumulated = _gradients(
        model, criterion, iter([collate(samples[:2]), collate(samples[2:])]), grad_accum=2
    )
    assert big.keys() == accumulated.keys() and len(big) > 50
    # float rounding of a different summation order, measured against the largest gradient (some
    # are zero up to rounding: a conv bias before a one-channel-per-group GroupNorm)
    atol = 1e-6 * max(float(g.abs().max()) for g in big.values())
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-4, atol=atol, msg=k)

    # In general (unequal mask counts) the accumulated gradient is the mean of the micro-batches'.
    samples[0]["labels"], samples[0]["masks"] = samples[0]["labels"][:1], samples[0]["masks"][:1]
    first = _gradients(model, criterion, iter([collate(samples[:2])]), grad_accum=1)
    second = _gradients(model, criterion, iter([collate(samples[2:])]), grad_accum=1)
    accumulated = _gradients(
        model, criterion, iter([collate(samples[:2]), collate(samples[2:])]), grad_accum=2
    )
    for k in first:
        torch.testing.assert_close(
            accumulated[k], (first[k] + second[k]) / 2, rtol=1e-4, atol=atol, msg=k
        )


def test_train_logs_plots_checkpoints_and_evaluates(shapes, tmp_path):
    out = tmp_path / "run"
    result = engine.train(
        tiny_config(shapes, out, "solver.max_iter=4", "solver.eval_period=2", "solver.log_period=2")
    )
    assert {p.name for p in out.iterdir()} >= {
        "log.jsonl",
        "loss.png",
        "config.json",
        "model_0000002.pt",
        "model_final.pt",
    }
    records = _records(out)
    train = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train] == [2, 4]
    for r in train:
        assert set(r) >= {
            "loss",
            "loss_ce",
            "loss_mask",
            "loss_dice",
            "lr",
            "time",
            "data_time",
            "memory_mb",
            "grad_norm",
        }
    evals = [r for r in records if "eval" in r]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert set(evals[-1]["eval"]) == {"PQ", "AP", "mIoU"}
    assert result["metrics"]["panoptic_seg"]["PQ"] == evals[-1]["eval"]["PQ"]
    assert result["checkpoint"] == str(out / "model_final.pt") and result["interrupted"] is None
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_the_three_tasks_and_restores_train_mode(shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path)
    model = build_model(cfg).train()
    metrics = engine.evaluate(cfg, model, progress=False)
    assert model.training
    assert set(metrics) == {"panoptic_seg", "segm", "sem_seg"}
    assert 0.0 <= metrics["sem_seg"]["mIoU"] <= 100.0
    only_semantic = tiny_config(
        shapes, tmp_path, "inference.panoptic_on=false", "inference.instance_on=false"
    )
    assert set(engine.evaluate(only_semantic, model, progress=False)) == {"sem_seg"}


def test_sampler_gives_the_same_images_for_any_split_of_the_batch():
    from m2f_lite.sampler import GlobalBatchSampler

    def images(world: int, accum: int, steps: int = 3) -> list[set]:
        per_step = []
        streams = [iter(GlobalBatchSampler(size=10, global_batch=4, world_size=world, rank=r, grad_accum=accum, seed=1))
                   for r in range(world)]  # fmt: skip
        for _ in range(steps):
            per_step.append({item for s in streams for _ in range(accum) for item in next(s)})
        return per_step

    reference = images(1, 1)
    assert images(2, 1) == reference and images(1, 2) == reference and images(2, 2) == reference
    assert all(len(step) == 4 for step in reference)
    resumed = iter(GlobalBatchSampler(size=10, global_batch=4, seed=1, start_iter=2))
    assert set(next(resumed)) == reference[2]
    first_epoch = list(
        itertools.islice(iter(GlobalBatchSampler(size=10, global_batch=2, seed=1)), 5)
    )
    assert sorted(i for batch in first_epoch for i, _ in batch) == list(range(10))  # a permutation
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(size=10, global_batch=3, world_size=2)
