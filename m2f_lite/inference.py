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

Memory: the official code upsamples all Q mask logits to the original image size at once,
``[Q, H, W]`` floats: 20 GB for a 50-megapixel photo and 100 queries. Given a
:class:`ToOutputSize`, the task functions take the logits at the model's resolution and bring
them to the output size a chunk of queries at a time (:func:`query_chunks`, at most
``FULL_RES_BUDGET`` floats per chunk), keeping running maxima, sums and bool masks instead. An
image of COCO's size is one chunk: the same arithmetic as the official code, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from m2f_lite.config import InferenceConfig
    from m2f_lite.data.meta import DatasetMeta

MASK_STRIDE = 4  # pred_masks are at 1/4 of the padded input (the pixel decoder's finest scale)
# floats of one chunk of queries at the output size (256 MB): 100 queries of a 640x480 image or 2
# of a 50-megapixel photo
FULL_RES_BUDGET = 2**26


@dataclass(frozen=True)
class ToOutputSize:
    """The official resize of mask logits to the output: bilinear to the padded input size,
    crop the image's true ``image_size`` (h, w), bilinear to ``output_size`` (H, W), as
    ``MaskFormer.forward`` and :func:`sem_seg_postprocess` do."""

    padded_size: tuple[int, int]
    image_size: tuple[int, int]
    output_size: tuple[int, int]

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """``[n, h, w]`` logits at the model's resolution -> ``[n, H, W]`` at the output size."""
        masks = F.interpolate(
            masks[None], size=self.padded_size, mode="bilinear", align_corners=False
        )
        return sem_seg_postprocess(masks[0], self.image_size, *self.output_size)  # [n, H, W]

    def axis_weights(self, size: int, axis: int, *, from_padded: bool = False) -> torch.Tensor:
        """The resize along one axis (0: rows, 1: columns) as a matrix ``[out, size]``: bilinear
        interpolation is separable, each output a weighted sum of two inputs per axis; these are
        ``F.interpolate``'s own weights (it resizes the identity). ``from_padded``: the input is
        at the padded size already (the semantic-only path resizes class scores from there)."""
        eye = torch.eye(size, dtype=torch.float64)[None]  # [1, size, size]: a channel per input
        if not from_padded:  # model resolution -> padded input size
            eye = F.interpolate(
                eye, size=self.padded_size[axis], mode="linear", align_corners=False
            )  # [1, size, padded]
        eye = eye[..., : self.image_size[axis]]  # [1, size, h] the crop of the true image
        eye = F.interpolate(
            eye, size=self.output_size[axis], mode="linear", align_corners=False
        )  # [1, size, out]
        return eye[0].T.contiguous()  # [out, size]

    def row_bands(self, n: int, budget: int | None = None) -> list[slice]:
        """Slices of the output rows, each holding at most ``budget`` floats for ``n`` maps."""
        height, width = self.output_size
        step = max(1, (budget or FULL_RES_BUDGET) // max(n * width, 1))
        return [slice(i, min(i + step, height)) for i in range(0, height, step)]


def query_chunks(num_queries: int, pixels: int, budget: int | None = None) -> list[slice]:
    """Consecutive slices of ``num_queries`` with at most ``budget // pixels`` queries each (one
    at least); ``budget`` defaults to ``FULL_RES_BUDGET``."""
    step = max(1, (budget or FULL_RES_BUDGET) // max(pixels, 1))
    return [slice(i, min(i + step, num_queries)) for i in range(0, num_queries, step)]


def semantic_inference(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, *, resize: ToOutputSize | None = None
) -> torch.Tensor:
    """Per-class scores ``[K, H, W]``: ``Σ_q softmax(p_q)[c] · sigmoid(m_q)(h, w)``.

    The "semantic inference" of MaskFormer: a soft sum of the masks weighted by each query's
    class probability, with the no-object column dropped. ``argmax`` over ``K`` gives the label.

    Args:
        mask_cls: class logits ``[Q, K+1]``.
        mask_pred: mask logits ``[Q, H, W]``; with ``resize``, ``[Q, h, w]`` at the model's
            resolution, brought to ``resize.output_size`` a chunk of queries at a time (the sum
            then runs chunk by chunk: equal to the one-chunk sum up to float rounding).
    """
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]  # [Q, K]
    if resize is None:
        return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())  # [K, H, W]
    height, width = resize.output_size
    sem = None
    for chunk in query_chunks(mask_pred.shape[0], height * width):
        part = torch.einsum("qc,qhw->chw", probs[chunk], resize(mask_pred[chunk]).sigmoid())
        sem = part if sem is None else sem.add_(part)  # [K, H, W]
    return sem


def semantic_labels(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    resize: ToOutputSize,
    *,
    before: bool = True,
    budget: int | None = None,
) -> torch.Tensor:
    """The semantic label map ``[H, W]`` int32, ``argmax`` over the classes of
    :func:`semantic_inference`, at ``resize.output_size``, computed a band of rows at a time:
    memory in proportion to the image, not to ``K`` or ``Q`` times it (``m2f-lite predict
    --task semantic`` on a large photo).

    ``before``: the masks are resized, then summed (``postprocess_before_inference``); else the
    class scores are summed at the padded size, then resized (the semantic-only path). The rows
    of a band come from the separable resize weights (:meth:`ToOutputSize.axis_weights`): equal
    to the scores of the whole-image resize up to float rounding.

    Args:
        mask_cls: class logits ``[Q, K+1]``.
        mask_pred: mask logits ``[Q, h, w]`` at the model's resolution.
    """
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]  # [Q, K]
    if before:
        maps = mask_pred  # [Q, h, w]
    else:  # class scores at the padded size, as semantic_inference after the upsampling
        padded = F.interpolate(
            mask_pred[None], size=resize.padded_size, mode="bilinear", align_corners=False
        )[0]  # [Q, Hp, Wp]
        maps = semantic_inference(mask_cls, padded)  # [K, Hp, Wp]
    rows = resize.axis_weights(maps.shape[-2], 0, from_padded=not before).to(maps)  # [H, h]
    cols = resize.axis_weights(maps.shape[-1], 1, from_padded=not before).to(maps)  # [W, w]
    height, width = resize.output_size
    labels = torch.empty((height, width), dtype=torch.int32, device=maps.device)  # [H, W]
    for band in resize.row_bands(maps.shape[0], budget):
        part = torch.einsum("yh,nhw,xw->nyx", rows[band], maps, cols)  # [n, band, W]
        if before:
            part = torch.einsum("qc,qyx->cyx", probs, part.sigmoid_())  # [K, band, W]
        labels[band] = part.argmax(0)
    return labels


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    resize: ToOutputSize | None = None,
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
        mask_pred: mask logits ``[Q, H, W]`` (at the output resolution); with ``resize``,
            ``[Q, h, w]`` at the model's resolution, brought to ``resize.output_size`` a chunk
            kept query at a time: the winner of a pixel is then a running maximum (an earlier
            query wins a tie, as ``argmax``), the same result bit for bit.
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
    cur_logits = mask_pred[keep]  # [Qk, H, W] (with resize: [Qk, h, w])
    h, w = mask_pred.shape[-2:] if resize is None else resize.output_size
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    n = cur_logits.shape[0]
    if n == 0:
        return panoptic_seg, []

    if resize is None:  # the official: every kept query at once
        cur_masks = cur_logits.sigmoid()  # [Qk, H, W]
        winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)  # [H, W] index into kept queries
        on_own_mask = cur_masks.gather(0, winner[None])[0] >= 0.5  # [H, W]
        original_area = (cur_masks >= 0.5).flatten(1).sum(1)  # [Qk]
    else:  # one kept query at a time at the output size: a running argmax, about 17 bytes a pixel
        device = mask_pred.device
        best = torch.full((h, w), -1.0, device=device)  # [H, W] (scores · sigmoid are >= 0)
        winner = torch.zeros((h, w), dtype=torch.int16, device=device)  # [H, W]
        on_own_mask = torch.zeros((h, w), dtype=torch.bool, device=device)  # [H, W]
        original_area = torch.zeros(n, dtype=torch.long, device=device)  # [Qk]
        for k in range(n):
            mask = resize(cur_logits[k : k + 1])[0].sigmoid_()  # [H, W]
            own = mask >= 0.5  # [H, W]
            original_area[k] = own.sum()
            weighted = mask.mul_(cur_scores[k])  # [H, W] score · sigmoid, as the official product
            better = weighted > best  # [H, W] strictly: an earlier query keeps a tie, as argmax
            torch.where(better, weighted, best, out=best)
            winner.masked_fill_(better, k)
            torch.where(better, own, on_own_mask, out=on_own_mask)
        del best, mask, own, better
        winner = winner.long()  # [H, W]
    won_area = torch.bincount(winner.flatten(), minlength=n)  # [Qk] argmax area
    kept_area = torch.bincount(winner[on_own_mask], minlength=n)  # [Qk] argmax area ∩ own mask

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
    resize: ToOutputSize | None = None,
    as_rle: bool = False,
) -> dict[str, Any]:
    """Instances: the top-k (query, class) pairs, a binary mask each, scored by class × mask quality.

    The official procedure: take the ``topk`` largest entries of ``softmax(p_q)[c]`` over all
    Q × K (query, class) pairs (no-object dropped; a query may appear with several classes);
    when the model also does panoptic segmentation, keep the thing classes only; each mask is
    ``m_q > 0``, and the score is the class probability times the mean of ``sigmoid(m_q)`` inside
    that mask (``Σ sigmoid · mask / (Σ mask + 1e-6)``). With ``resize``, ``mask_pred`` is at the
    model's resolution and the chosen masks are brought to ``resize.output_size`` a chunk at a
    time, kept as bool (``k`` bytes a pixel, not ``Q`` floats). ``as_rle`` (with ``resize``):
    each chunk's masks are encoded as COCO RLE and dropped, the result holding ``"rles"`` (a
    list of ``{"size", "counts"}``) instead of ``"masks"``: about one byte a pixel in all.

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
    if resize is None:
        masks, mask_scores = _instance_masks(mask_pred[query])  # [k, H, W], [k]
    else:
        height, width = resize.output_size
        parts = []
        for chunk in query_chunks(len(query), height * width):
            chunk_masks, chunk_scores = _instance_masks(resize(mask_pred[query[chunk]]))
            if as_rle:  # [n, H, W] bool -> n RLEs: the chunk's masks are freed
                from m2f_lite.metrics.coco_ap import encode_mask

                chunk_masks = [encode_mask(m) for m in chunk_masks.cpu().numpy()]
            parts.append((chunk_masks, chunk_scores))
        mask_scores = torch.cat([s for _, s in parts]) if parts else scores.new_zeros(0)
        if as_rle:
            rles = [rle for m, _ in parts for rle in m]
            return {"rles": rles, "scores": scores * mask_scores, "labels": labels}
        masks = (
            torch.cat([m for m, _ in parts])
            if parts
            else mask_pred.new_zeros((0, height, width), dtype=torch.bool)
        )
    return {"masks": masks, "scores": scores * mask_scores, "labels": labels}


def _instance_masks(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``m > 0`` ``[k, H, W]`` bool and their mean ``sigmoid(m)`` inside ``[k]``, from logits ``[k, H, W]``."""
    masks = logits > 0  # [k, H, W]
    inside = masks.flatten(1).to(logits.dtype)  # [k, HW]
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)  # [k]
    return masks, mask_scores


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
    only: Sequence[str] | None = None,
    compact: bool = False,
) -> list[dict[str, Any]]:
    """Per-image results from a batch of model outputs, as the official ``MaskFormer.forward`` at test time.

    1. Mask logits ``[B, Q, H/4, W/4]`` are upsampled bilinearly to the padded input size
       (``padded_size``, default 4 × the mask size).
    2. For each image, when ``postprocess_before_inference`` (the official
       ``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``) or panoptic or instance is on, as in every
       official config but semantic-only ones, the mask logits are cropped to the image's true
       size ``image_sizes[i]`` and resized to its original size ``orig_sizes[i]`` before the
       task inference; otherwise the semantic result is cropped and resized after it.

    The resize to the original size happens inside the task functions (:class:`ToOutputSize`),
    a chunk of queries at a time, so that a large photo never holds ``[Q, H, W]`` floats.
    ``only`` computes a subset of the enabled tasks (``m2f-lite predict --task``); the path and
    the thing-only rule of instances still follow all the enabled ones, so each result is the
    one a full call gives.

    Args:
        outputs: the model's ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], ...}``.
        image_sizes: ``[B]`` (h, w) of each (resized) image inside the padded batch.
        orig_sizes: ``[B]`` (H, W) of each image as stored on disk (the evaluation size).
        only: a subset of ``("semantic", "instance", "panoptic")`` to compute (default: all
            the enabled tasks).
        compact: results whose memory does not grow with ``K`` or ``k`` (``m2f-lite predict``
            on large photos): ``"sem_labels"`` ``[H, W]`` (:func:`semantic_labels`) instead of
            ``"sem_seg"``, and instances with ``"rles"`` instead of ``"masks"``.

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
    wanted = {"semantic": semantic, "instance": instance, "panoptic": panoptic}
    if only is not None:
        unknown = set(only) - {t for t, on in wanted.items() if on}
        if unknown:
            raise ValueError(f"postprocess: only={sorted(unknown)} are not enabled tasks")
        wanted = {t: t in only for t in wanted}
    labels_only = compact and wanted["semantic"]
    results = []
    for mask_cls, mask_pred, image_size, (height, width) in zip(
        mask_cls_all, mask_pred_all, image_sizes, orig_sizes
    ):
        # one image at a time: the same numbers as upsampling the batch, a B-th of the memory
        resize = ToOutputSize(
            padded_size=tuple(padded_size),
            image_size=tuple(image_size),
            output_size=(height, width),
        )
        out: dict[str, Any] = {}
        if labels_only:  # [H, W] class ids, a band of rows at a time
            out["sem_labels"] = semantic_labels(
                mask_cls.to(mask_pred), mask_pred, resize, before=before
            )
            if not before:
                results.append(out)
                continue
        if not before:  # semantic only: class scores at the padded size, then crop and resize
            mask_pred = F.interpolate(
                mask_pred[None], size=padded_size, mode="bilinear", align_corners=False
            )[0]  # [Q, Hp, Wp]
            sem = semantic_inference(mask_cls, mask_pred)  # [K, Hp, Wp]
            out["sem_seg"] = sem_seg_postprocess(sem, image_size, height, width)  # [K, H, W]
            results.append(out)
            continue
        mask_cls = mask_cls.to(mask_pred)
        if wanted["semantic"] and not labels_only:
            out["sem_seg"] = semantic_inference(mask_cls, mask_pred, resize=resize)  # [K, H, W]
        if wanted["panoptic"]:
            out["panoptic_seg"] = panoptic_inference(
                mask_cls,
                mask_pred,
                is_thing=is_thing,
                object_mask_threshold=object_mask_threshold,
                overlap_threshold=overlap_threshold,
                resize=resize,
            )
        if wanted["instance"]:
            out["instances"] = instance_inference(
                mask_cls,
                mask_pred,
                topk=topk,
                is_thing=is_thing,
                panoptic_on=panoptic,
                resize=resize,
                as_rle=compact,
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
    only: Sequence[str] | None = None,
    compact: bool = False,
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
        only=only,
        compact=compact,
    )
