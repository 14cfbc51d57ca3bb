"""Post-processing for the three tasks on outputs built so that the answer is known."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2f_lite.config import InferenceConfig
from m2f_lite.data.meta import DatasetMeta
from m2f_lite.inference import (
    instance_inference,
    panoptic_inference,
    postprocess,
    postprocess_from_config,
    sem_seg_postprocess,
    semantic_inference,
)

PERSON, CAR, SKY = 0, 1, 2
IS_THING = [True, True, False]


def cls_logits(label: int, strength: float, k: int = 3) -> torch.Tensor:
    """Logits ``[K+1]`` with ``strength`` on ``label`` (``k`` = no object), 0 elsewhere."""
    x = torch.zeros(k + 1)
    x[label] = strength
    return x


def block(y0, y1, x0, x1, shape=(8, 8)) -> torch.Tensor:
    """Mask logits: +10 inside the block, -10 outside."""
    m = torch.full(shape, -10.0)
    m[y0:y1, x0:x1] = 10.0
    return m


def test_semantic_inference_is_the_probability_weighted_sum_of_masks():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])  # [Q, K+1]
    masks = torch.tensor([[[20.0, -20.0]], [[0.0, 20.0]]])  # [Q, 1, 2]: sigmoids 1, 0 and 0.5, 1
    sem = semantic_inference(probs.log(), masks)  # [K, 1, 2]
    torch.testing.assert_close(sem[:, 0, 0], torch.tensor([0.6 + 0.1, 0.3 + 0.1]))
    torch.testing.assert_close(sem[:, 0, 1], torch.tensor([0.2, 0.2]))


def _panoptic_case():
    queries = [
        (cls_logits(PERSON, 10.0), block(0, 4, 0, 4)),  # kept: segment 1
        (cls_logits(PERSON, 2.0), block(4, 8, 0, 4)),  # score e²/(e²+3) = 0.71 < 0.8: dropped
        (cls_logits(3, 10.0), block(4, 8, 0, 4)),  # "no object": dropped
        (cls_logits(SKY, 8.0), block(0, 4, 4, 8)),  # kept: segment 2
        (cls_logits(SKY, 8.0), block(4, 8, 4, 8)),  # same stuff class: merged into segment 2
        (cls_logits(CAR, 9.0), block(0, 1, 0, 7)),  # wins 3 of its 7 pixels: < 0.8, dropped
    ]
    return torch.stack([q[0] for q in queries]), torch.stack([q[1] for q in queries])


def test_panoptic_inference_thresholds_overlap_and_stuff_merge():
    mask_cls, mask_pred = _panoptic_case()
    ids, segments = panoptic_inference(mask_cls, mask_pred, is_thing=IS_THING)
    expected = torch.zeros(8, 8, dtype=torch.int32)
    expected[0:4, 0:4] = 1
    expected[:, 4:8] = 2
    expected[0, 4:7] = 0  # won by the dropped car query: stays void (sky keeps 13/16 >= 0.8)
    assert ids.dtype == torch.int32
    torch.testing.assert_close(ids, expected)
    assert segments == [
        {"id": 1, "isthing": True, "category_id": PERSON, "area": 16},
        {"id": 2, "isthing": False, "category_id": SKY, "area": 29},
    ]
    # a lower object threshold keeps the 0.71 person query; a lower overlap threshold the car
    ids, segments = panoptic_inference(
        mask_cls, mask_pred, is_thing=IS_THING, object_mask_threshold=0.5, overlap_threshold=0.3
    )
    assert [s["category_id"] for s in segments] == [PERSON, PERSON, SKY, CAR]
    assert (ids[4:8, 0:4] == 2).all() and (ids[0, 4:7] == 4).all()


def test_panoptic_inference_with_nothing_kept_is_all_void():
    mask_cls = torch.stack([cls_logits(3, 10.0), cls_logits(PERSON, 0.1)])
    ids, segments = panoptic_inference(mask_cls, torch.randn(2, 5, 6), is_thing=IS_THING)
    assert segments == [] and ids.shape == (5, 6) and (ids == 0).all()
    with pytest.raises(ValueError, match="is_thing has 2 entries"):
        panoptic_inference(mask_cls, torch.randn(2, 5, 6), is_thing=[True, False])


def panoptic_reference(mask_cls, mask_pred, is_thing, object_mask_threshold, overlap_threshold):
    """The official procedure, one query at a time (the loop the vectorised version replaces)."""
    k = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(k) & (scores > object_mask_threshold)
    masks = mask_pred[keep].sigmoid()
    ids = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    info, stuff = [], {}
    if masks.shape[0] == 0:
        return ids, info
    winner = (scores[keep].view(-1, 1, 1) * masks).argmax(0)
    for q, cls in enumerate(labels[keep].tolist()):
        won = winner == q
        mask = won & (masks[q] >= 0.5)
        area, original = won.sum().item(), (masks[q] >= 0.5).sum().item()
        if (
            area == 0
            or original == 0
            or mask.sum().item() == 0
            or area / original < overlap_threshold
        ):
            continue
        if not is_thing[cls] and cls in stuff:
            ids[mask] = stuff[cls]
            continue
        new_id = len(info) + 1
        if not is_thing[cls]:
            stuff[cls] = new_id
        ids[mask] = new_id
        info.append({"id": new_id, "isthing": is_thing[cls], "category_id": cls})
    return ids, info


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_inference_equals_the_query_loop(seed):
    g = torch.Generator().manual_seed(seed)
    mask_cls = 3 * torch.randn(12, 6, generator=g)  # [Q, K+1]
    # 6 random regions, two queries on each (conflicts, overlap drops and stuff merges happen)
    region = F.interpolate(torch.randn(1, 6, 4, 4, generator=g), size=(14, 15), mode="bilinear")[
        0
    ].argmax(0)
    own = region[None] == (torch.arange(12) % 6)[:, None, None]  # [Q, H, W]
    mask_pred = 6 * own - 3 + 2 * torch.randn(12, 14, 15, generator=g)
    is_thing = [True, False, True, False, False]
    for obj, overlap in ((0.3, 0.8), (0.5, 0.5), (0.8, 0.8)):
        ids, info = panoptic_inference(
            mask_cls,
            mask_pred,
            is_thing=is_thing,
            object_mask_threshold=obj,
            overlap_threshold=overlap,
        )
        ref_ids, ref_info = panoptic_reference(mask_cls, mask_pred, is_thing, obj, overlap)
        torch.testing.assert_close(ids, ref_ids)
        assert [{k: v for k, v in s.items() if k != "area"} for s in info] == ref_info
        assert [s["area"] for s in info] == [(ref_ids == s["id"]).sum().item() for s in ref_info]


def test_instance_inference_topk_masks_and_scores():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.04, 0.06, 0.9]])  # [Q, K+1], K = 2
    inside = math.log(3.0)  # sigmoid = 0.75
    mask_pred = torch.full((3, 4, 4), -5.0)
    mask_pred[0, :2] = inside  # 8 pixels at 0.75
    mask_pred[1, :, :1] = inside  # 4 pixels
    # query 2 predicts nothing (mask empty): its score is 0
    out = instance_inference(probs.log(), mask_pred, topk=4)
    # the 4 best (query, class) pairs: (0,0) .7, (1,1) .5, (0,1) .2, (1,0) .1 ((2, ·) excluded)
    assert out["labels"].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(out["masks"], torch.stack([mask_pred[q] > 0 for q in (0, 1, 0, 1)]))
    torch.testing.assert_close(
        out["scores"], torch.tensor([0.7, 0.5, 0.2, 0.1]) * 0.75, rtol=1e-5, atol=0
    )
    empty = instance_inference(probs.log()[2:], mask_pred[2:], topk=1)
    assert (
        empty["labels"].tolist() == [1]
        and empty["scores"].item() == 0.0
        and not empty["masks"].any()
    )
    # with panoptic on, only thing classes remain
    things = instance_inference(
        probs.log(), mask_pred, topk=4, is_thing=[True, False], panoptic_on=True
    )
    assert things["labels"].tolist() == [0, 0]
    assert instance_inference(probs.log(), mask_pred, topk=100)["labels"].shape == (
        6,
    )  # Q × K < topk
    with pytest.raises(ValueError, match="needs is_thing"):
        instance_inference(probs.log(), mask_pred, panoptic_on=True)


def test_sem_seg_postprocess_crops_then_resizes_bilinearly():
    padded = torch.full((1, 3, 4), 99.0)  # the padding (99) must be cropped away
    padded[0, :2, :2] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = sem_seg_postprocess(padded, (2, 2), 4, 4)
    # align_corners=False: output pixel i samples (i + 0.5) / 2 - 0.5, clamped to the edge
    along_x, along_y = torch.tensor([0, 0.25, 0.75, 1]), torch.tensor([0, 0.5, 1.5, 2])
    torch.testing.assert_close(out[0], along_y[:, None] + along_x[None, :])


def _outputs(batch=2, q=5, k=3, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": 3 * torch.randn(batch, q, k + 1, generator=g),
        "pred_masks": 3 * torch.randn(batch, q, h, w, generator=g),
    }


def test_postprocess_sizes_tasks_and_batch_independence():
    outputs = _outputs()  # masks at 4x6 -> padded input 16x24
    image_sizes, orig_sizes = [(16, 20), (12, 24)], [(32, 40), (9, 18)]
    results = postprocess(
        outputs,
        image_sizes,
        orig_sizes,
        semantic=True,
        instance=True,
        panoptic=True,
        is_thing=IS_THING,
        object_mask_threshold=0.3,
    )
    for res, (h, w) in zip(results, orig_sizes):
        assert res["sem_seg"].shape == (3, h, w)
        assert res["panoptic_seg"][0].shape == (h, w)
        assert res["instances"]["masks"].shape[1:] == (h, w)
        assert set(res["instances"]["labels"].tolist()) <= {PERSON, CAR}  # panoptic on: things only
    single = postprocess(
        {k: v[1:] for k, v in outputs.items()},
        image_sizes[1:],
        orig_sizes[1:],
        semantic=True,
        instance=True,
        panoptic=True,
        is_thing=IS_THING,
        object_mask_threshold=0.3,
    )
    torch.testing.assert_close(single[0]["sem_seg"], results[1]["sem_seg"])
    torch.testing.assert_close(single[0]["panoptic_seg"][0], results[1]["panoptic_seg"][0])
    only_semantic = postprocess(
        outputs,
        image_sizes,
        orig_sizes,
        semantic=True,
        instance=False,
        panoptic=False,
        is_thing=IS_THING,
    )
    assert [set(r) for r in only_semantic] == [{"sem_seg"}, {"sem_seg"}]
    assert only_semantic[0]["sem_seg"].shape == (3, 32, 40)
    with pytest.raises(ValueError, match="2 images in outputs but 1 image_sizes"):
        postprocess(
            outputs,
            image_sizes[:1],
            orig_sizes[:1],
            semantic=True,
            instance=False,
            panoptic=False,
            is_thing=IS_THING,
        )


def test_semantic_after_or_before_resizing():
    """Semantic-only configs resize the K class maps; with instance/panoptic on, the Q mask logits."""
    outputs = _outputs(batch=1)
    args = ([(16, 24)], [(16, 24)])  # no padding, no resize: both orders give the same numbers
    after = postprocess(
        outputs, *args, semantic=True, instance=False, panoptic=False, is_thing=IS_THING
    )
    before = postprocess(
        outputs,
        *args,
        semantic=True,
        instance=False,
        panoptic=False,
        is_thing=IS_THING,
        postprocess_before_inference=True,
    )
    torch.testing.assert_close(after[0]["sem_seg"], before[0]["sem_seg"])
    resized = ([(16, 24)], [(20, 30)])  # a resize does not commute with the sigmoid: they differ
    after = postprocess(
        outputs, *resized, semantic=True, instance=False, panoptic=False, is_thing=IS_THING
    )
    before = postprocess(
        outputs,
        *resized,
        semantic=True,
        instance=False,
        panoptic=False,
        is_thing=IS_THING,
        postprocess_before_inference=True,
    )
    assert not torch.allclose(after[0]["sem_seg"], before[0]["sem_seg"])
    upsampled = F.interpolate(
        outputs["pred_masks"], size=(16, 24), mode="bilinear", align_corners=False
    )[0]
    expected = semantic_inference(
        outputs["pred_logits"][0], sem_seg_postprocess(upsampled, (16, 24), 20, 30)
    )
    torch.testing.assert_close(before[0]["sem_seg"], expected)


def test_postprocess_from_config_reads_tasks_and_thresholds():
    meta = DatasetMeta(
        name="toy", classes=["person", "car", "sky"], is_thing=IS_THING, dataset_ids=[1, 3, 10]
    )
    cfg = InferenceConfig(instance_on=False, object_mask_threshold=0.3)
    outputs = _outputs(batch=1)
    res = postprocess_from_config(outputs, [(16, 24)], [(16, 24)], cfg, meta)
    assert set(res[0]) == {"sem_seg", "panoptic_seg"}
    direct = postprocess(
        outputs,
        [(16, 24)],
        [(16, 24)],
        semantic=True,
        instance=False,
        panoptic=True,
        is_thing=IS_THING,
        object_mask_threshold=0.3,
    )
    torch.testing.assert_close(res[0]["panoptic_seg"][0], direct[0]["panoptic_seg"][0])
