"""Inference: from Mask2Former's N mask–class pairs to semantic, panoptic and instance results.

The model predicts, per image, Q queries each with a class distribution ``p_q`` over K classes
plus "no object" (``pred_logits`` ``[Q, K+1]``) and a mask logit map ``m_q`` (``pred_masks``
``[Q, H/4, W/4]``). One output serves all three tasks (Sec. 3.4 of the paper, following
MaskFormer's "mask classification" inference); these functions follow the official
``MaskFormer.semantic_inference / panoptic_inference / instance_inference`` and detectron2's
``sem_seg_postprocess`` step by step, thresholds included (not HF's image processor, which
resizes to 384×384 first, thresholds at 0.5 and merges stuff only on request).

Every function here is a pure function of tensors; ``postprocess_from_config`` is the one that
reads an :class:`~m2f_lite.config.InferenceConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from m2f_lite.config import InferenceConfig
    from m2f_lite.data.meta import DatasetMeta

MASK_STRIDE = 4  # pred_masks are at 1/4 of the padded input (the pixel decoder's finest scale)


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``[K, H, W]``: ``Σ_q softmax(p_q)[c] · sigmoid(m_q)(h, w)``.

    The "semantic inference" of MaskFormer: a soft sum of the masks weighted by each query's
    class probability, with the no-object column dropped. ``argmax`` over ``K`` gives the label.

    Args:
        mask_cls: class logits ``[Q, K+1]``.
        mask_pred: mask logits ``[Q, H, W]``.
    """
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]  # [Q, K]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())  # [K, H, W]


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A panoptic id map ``[H, W]`` (int32, 0 = void, segments 1, 2, ...) and its ``segments_info``.

    The official procedure:

    1. each query's score and label are the max and argmax of ``softmax(p_q)`` over all K+1
       columns; keep the queries whose label is not "no object" and whose score is
       ``> object_mask_threshold``;
    2. each pixel goes to the kept query with the largest ``score_q · sigmoid(m_q)``, and keeps
       it only where that query's own ``sigmoid(m_q) >= 0.5`` (else the pixel stays void);
    3. a query becomes a segment if it wins some pixels, and its winning area (argmax only) is at
       least ``overlap_threshold`` × its original area ``|sigmoid(m_q) >= 0.5|``;
    4. stuff queries of one class are merged into the first segment of that class; each thing
       query is its own segment. Ids are given in query order, starting at 1.

    Args:
        mask_cls: class logits ``[Q, K+1]``.
        mask_pred: mask logits ``[Q, H, W]`` (at the output resolution).
        is_thing: ``[K]``, True for thing classes.

    Returns:
        ``(panoptic_seg [H, W] int32, segments_info)``, each segment a dict with ``id``,
        ``category_id`` (contiguous class index), ``isthing`` and ``area`` (pixels; an addition
        to the official keys).
    """
    num_classes = mask_cls.shape[-1] - 1
    if len(is_thing) != num_classes:
        raise ValueError(
            f"is_thing has {len(is_thing)} entries but the logits have {num_classes} classes"
        )
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)  # [Q], [Q]
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)  # [Q]
    cur_scores, cur_classes = scores[keep], labels[keep]  # [Qk]
    cur_masks = mask_pred[keep].sigmoid()  # [Qk, H, W]
    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    if cur_masks.shape[0] == 0:
        return panoptic_seg, []

    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)  # [H, W] index into the kept queries
    on_own_mask = cur_masks.gather(0, winner[None])[0] >= 0.5  # [H, W]
    n = cur_masks.shape[0]
    won_area = torch.bincount(winner.flatten(), minlength=n)  # [Qk] argmax area
    kept_area = torch.bincount(winner[on_own_mask], minlength=n)  # [Qk] argmax area ∩ own mask
    original_area = (cur_masks >= 0.5).flatten(1).sum(1)  # [Qk]

    segment_of_query = torch.zeros(n, dtype=torch.int32)  # 0 = the query's pixels stay void
    segments_info: list[dict[str, Any]] = []
    stuff_segment: dict[int, int] = {}
    for k, (cls, won, kept, orig) in enumerate(
        zip(cur_classes.tolist(), won_area.tolist(), kept_area.tolist(), original_area.tolist())
    ):
        if won == 0 or orig == 0 or kept == 0 or won / orig < overlap_threshold:
            continue
        if not is_thing[cls] and cls in stuff_segment:  # merge stuff of one class
            segment_of_query[k] = stuff_segment[cls]
            continue
        segment_id = len(segments_info) + 1
        if not is_thing[cls]:
            stuff_segment[cls] = segment_id
        segment_of_query[k] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(is_thing[cls]), "category_id": cls})

    segment_of_query = segment_of_query.to(mask_pred.device)
    panoptic_seg = torch.where(on_own_mask, segment_of_query[winner], panoptic_seg)  # [H, W]
    areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments_info) + 1).tolist()
    for info in segments_info:
        info["area"] = areas[info["id"]]
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    topk: int = 100,
    is_thing: Sequence[bool] | None = None,
    panoptic_on: bool = False,
) -> dict[str, torch.Tensor]:
    """Instances: the top-k (query, class) pairs, a binary mask each, scored by class × mask quality.

    The official procedure: take the ``topk`` largest entries of ``softmax(p_q)[c]`` over all
    Q × K (query, class) pairs (no-object dropped; a query may appear with several classes);
    when the model also does panoptic segmentation, keep the thing classes only; each mask is
    ``m_q > 0``, and the score is the class probability times the mean of ``sigmoid(m_q)`` inside
    that mask (``Σ sigmoid · mask / (Σ mask + 1e-6)``).

    Returns:
        ``{"masks": [k, H, W] bool, "scores": [k], "labels": [k]}`` (contiguous class indices).
        Sorted by class probability (the official ``topk(sorted=False)`` leaves the order open;
        COCO AP does not depend on it). ``topk`` larger than Q × K keeps all pairs.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]  # [Q, K]
    scores, flat_index = probs.flatten().topk(min(topk, num_queries * num_classes))  # [k], [k]
    labels = flat_index % num_classes  # [k]
    query = flat_index // num_classes  # [k]
    if panoptic_on:
        if is_thing is None:
            raise ValueError(
                "instance_inference(panoptic_on=True) needs is_thing to keep thing classes"
            )
        thing = torch.as_tensor(list(is_thing), dtype=torch.bool, device=labels.device)
        keep = thing[labels]  # [k]
        scores, labels, query = scores[keep], labels[keep], query[keep]
    logits = mask_pred[query]  # [k, H, W]
    masks = logits > 0  # [k, H, W]
    inside = masks.flatten(1).to(logits.dtype)  # [k, HW]
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)  # [k]
    return {"masks": masks, "scores": scores * mask_scores, "labels": labels}


def sem_seg_postprocess(
    result: torch.Tensor, img_size: tuple[int, int], output_height: int, output_width: int
) -> torch.Tensor:
    """Crop ``[C, H_pad, W_pad]`` to the image's true ``img_size`` (h, w) inside the padded batch,
    then resize bilinearly (``align_corners=False``) to ``(output_height, output_width)``:
    detectron2's ``sem_seg_postprocess``, which undoes padding and the test-time resize."""
    result = result[:, : img_size[0], : img_size[1]]  # [C, h, w]
    return F.interpolate(
        result[None], size=(output_height, output_width), mode="bilinear", align_corners=False
    )[0]  # [C, H, W]


def postprocess(
    outputs: dict[str, torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    orig_sizes: Sequence[tuple[int, int]],
    *,
    semantic: bool,
    instance: bool,
    panoptic: bool,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    topk: int = 100,
    postprocess_before_inference: bool = False,
    padded_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Per-image results from a batch of model outputs, as the official ``MaskFormer.forward`` at test time.

    1. Mask logits ``[B, Q, H/4, W/4]`` are upsampled bilinearly to the padded input size
       (``padded_size``, default 4 × the mask size).
    2. For each image, when ``postprocess_before_inference`` (the official
       ``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``) or panoptic or instance is on, as in every
       official config but semantic-only ones, the mask logits are cropped to the image's true
       size ``image_sizes[i]`` and resized to its original size ``orig_sizes[i]`` before the
       task inference; otherwise the semantic result is cropped and resized after it.

    Args:
        outputs: the model's ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], ...}``.
        image_sizes: ``[B]`` (h, w) of each (resized) image inside the padded batch.
        orig_sizes: ``[B]`` (H, W) of each image as stored on disk (the evaluation size).

    Returns:
        One dict per image with the enabled tasks' results: ``"sem_seg"`` ``[K, H, W]`` class
        scores, ``"panoptic_seg"`` ``(ids [H, W] int32, segments_info)``, ``"instances"``
        ``{"masks" [k, H, W] bool, "scores" [k], "labels" [k]}``.
    """
    mask_cls_all, mask_pred_all = (
        outputs["pred_logits"],
        outputs["pred_masks"],
    )  # [B, Q, K+1], [B, Q, h, w]
    if not (len(image_sizes) == len(orig_sizes) == mask_cls_all.shape[0]):
        raise ValueError(
            f"postprocess: {mask_cls_all.shape[0]} images in outputs but {len(image_sizes)} "
            f"image_sizes and {len(orig_sizes)} orig_sizes"
        )
    if padded_size is None:
        padded_size = (mask_pred_all.shape[-2] * MASK_STRIDE, mask_pred_all.shape[-1] * MASK_STRIDE)
    before = postprocess_before_inference or panoptic or instance
    results = []
    for mask_cls, mask_pred, image_size, (height, width) in zip(
        mask_cls_all, mask_pred_all, image_sizes, orig_sizes
    ):
        # one image at a time: the same numbers as upsampling the batch, a B-th of the memory
        mask_pred = F.interpolate(
            mask_pred[None], size=padded_size, mode="bilinear", align_corners=False
        )[0]  # [Q, Hp, Wp]
        if before:
            mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)  # [Q, H, W]
            mask_cls = mask_cls.to(mask_pred)
        out: dict[str, Any] = {}
        if semantic:
            sem = semantic_inference(mask_cls, mask_pred)  # [K, H, W] (or [K, Hp, Wp])
            out["sem_seg"] = sem if before else sem_seg_postprocess(sem, image_size, height, width)
        if panoptic:
            out["panoptic_seg"] = panoptic_inference(
                mask_cls,
                mask_pred,
                is_thing=is_thing,
                object_mask_threshold=object_mask_threshold,
                overlap_threshold=overlap_threshold,
            )
        if instance:
            out["instances"] = instance_inference(
                mask_cls, mask_pred, topk=topk, is_thing=is_thing, panoptic_on=panoptic
            )
        results.append(out)
    return results


def postprocess_from_config(
    outputs: dict[str, torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    orig_sizes: Sequence[tuple[int, int]],
    cfg: InferenceConfig,
    meta: DatasetMeta,
    *,
    padded_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`postprocess` with the tasks and thresholds of ``cfg`` and the thing classes of ``meta``."""
    return postprocess(
        outputs,
        image_sizes,
        orig_sizes,
        semantic=cfg.semantic_on,
        instance=cfg.instance_on,
        panoptic=cfg.panoptic_on,
        is_thing=meta.is_thing,
        object_mask_threshold=cfg.object_mask_threshold,
        overlap_threshold=cfg.overlap_threshold,
        topk=cfg.topk_per_image,
        postprocess_before_inference=cfg.sem_seg_postprocessing_before_inference,
        padded_size=padded_size,
    )
