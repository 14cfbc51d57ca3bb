"""Drawing helpers shared by the book and ``m2f-lite predict``.

Everything returns an ``uint8`` RGB array ``[H, W, 3]`` so that a figure (``plt.imshow``) and a
file (``PIL.Image.fromarray(...).save``) show the same picture. A class has one colour everywhere
(``DatasetMeta.colors``); instances of a thing class get small shade variations of it, outlines,
and the class name at their centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from m2f_lite.data.meta import DatasetMeta


def to_uint8_image(image: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    """``[3, H, W]`` float tensor in 0..255 (the package's image convention), ``[H, W, 3]`` array or
    a PIL image → ``uint8`` ``[H, W, 3]``."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)  # [H, W, C]
        image = image.numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).round().astype(np.uint8)
    return image


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class LazyMasks(Sequence):
    """``n`` boolean masks ``[H, W]`` made when asked for, ``make(i)``: the drawing functions hold
    one at a time, not ``n`` bytes a pixel (a 50-megapixel photo with 100 segments)."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.make(i % self.n)


def boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask ``[H, W]`` that touch a pixel outside it (4-neighbourhood)."""
    pad = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = pad[1:-1, :-2] & pad[1:-1, 2:] & pad[:-2, 1:-1] & pad[2:, 1:-1]
    return mask & ~inner


def _shade(color: Sequence[int], index: int) -> np.ndarray:
    """A deterministic variation of ``color`` so that instances of one class stay distinguishable."""
    if index == 0:
        return np.asarray(color, dtype=np.float32)
    rng = np.random.default_rng(index)
    return np.clip(np.asarray(color, dtype=np.float32) + rng.uniform(-60, 60, size=3), 0, 255)


def place_label(
    mask: np.ndarray,
    extent: tuple[int, int, int, int],
    taken: Sequence[tuple[int, int, int, int]] = (),
) -> tuple[int, int]:
    """Where to anchor the name of ``mask`` ``[H, W]``: ``(x, y)``, the centre of the text.

    ``extent`` is the label box relative to its anchor, ``(left, top, right, bottom)``. The first
    choice is the mask pixel closest to the centroid (it stays inside non-convex shapes); the box
    is then moved inside the image and, when it covers a box in ``taken`` (the labels drawn
    before), up or down by whole label heights to the nearest place where it covers none (or
    least, if there is none).
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    height, width = mask.shape
    left, top, right, bottom = extent
    step = bottom - top + 1
    x = int(np.clip(xs[i], -left, max(width - 1 - right, -left)))  # the box inside the image

    def covered(y: int) -> int:
        box = (x + left, y + top, x + right, y + bottom)
        return sum(
            max(0, min(box[2], t[2]) - max(box[0], t[0]) + 1)
            * max(0, min(box[3], t[3]) - max(box[1], t[1]) + 1)
            for t in taken
        )

    candidates = []
    for k in (0, 1, -1, 2, -2, 3, -3):
        y = int(np.clip(ys[i] + k * step, -top, max(height - 1 - bottom, -top)))
        if covered(y) == 0:
            return x, y
        candidates.append(y)
    return x, min(candidates, key=covered)


def _label(draw: ImageDraw.ImageDraw, mask: np.ndarray, text: str, font, taken: list) -> None:
    if not mask.any():
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="mm")
    extent = (left - 2, top - 1, right + 2, bottom + 1)  # the text and a black margin
    x, y = place_label(mask, extent, taken)
    box = (x + extent[0], y + extent[1], x + extent[2], y + extent[3])
    taken.append(box)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")


def _font(height: int):
    size = max(8, min(18, height // 24))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def overlay_segments(
    image,
    masks: Sequence[np.ndarray],
    class_ids: Sequence[int],
    meta: DatasetMeta,
    *,
    alpha: float = 0.55,
    outline: bool = True,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Paint boolean masks ``[H, W]`` over ``image`` in their class colours, outline them, name them.

    Masks are painted in order, so a later mask covers an earlier one where they overlap; the
    names stay inside the image and are moved apart where they would cover one another.
    """
    canvas = to_uint8_image(image).astype(np.float32)
    seen: dict[int, int] = {}
    edges = np.zeros(canvas.shape[:2], dtype=bool)
    for mask, cls in zip(masks, class_ids):
        cls = int(cls)
        color = _shade(meta.colors[cls], seen.get(cls, 0) if meta.is_thing[cls] else 0)
        seen[cls] = seen.get(cls, 0) + 1
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        if outline and meta.is_thing[cls]:
            edges |= boundaries(mask)
    canvas[edges] = 255.0
    out = Image.fromarray(canvas.round().astype(np.uint8))
    if labels is None:
        labels = [meta.classes[int(c)] for c in class_ids]
    draw = ImageDraw.Draw(out)
    font = _font(out.height)
    taken: list[tuple[int, int, int, int]] = []  # the label boxes drawn so far
    for mask, text in zip(masks, labels):
        if text:
            _label(draw, mask, text, font, taken)
    return np.asarray(out)


def draw_semantic(
    image, sem_seg: torch.Tensor | np.ndarray, meta: DatasetMeta, **kwargs
) -> np.ndarray:
    """``sem_seg`` ``[H, W]`` class ids (``meta.ignore_label`` = unlabelled) or scores ``[K, H, W]``."""
    sem = _as_numpy(sem_seg)
    if sem.ndim == 3:
        sem = sem.argmax(0)
    classes = [c for c in np.unique(sem) if c != meta.ignore_label and c < meta.num_classes]
    masks = LazyMasks(len(classes), lambda i: sem == classes[i])
    return overlay_segments(image, masks, classes, meta, outline=False, **kwargs)


def draw_panoptic(
    image, panoptic_seg, segments_info: Sequence[dict], meta: DatasetMeta, **kwargs
) -> np.ndarray:
    """``panoptic_seg`` ``[H, W]`` segment ids (0 = void) with ``segments_info`` [{id, category_id}]
    where ``category_id`` is the contiguous class index."""
    pan = _as_numpy(panoptic_seg)
    # Stuff first, things on top, so that labels of small things stay visible.
    infos = sorted(segments_info, key=lambda s: meta.is_thing[int(s["category_id"])])
    masks = LazyMasks(len(infos), lambda i: pan == infos[i]["id"])
    return overlay_segments(image, masks, [s["category_id"] for s in infos], meta, **kwargs)


def draw_instances(
    image,
    masks: torch.Tensor | np.ndarray | LazyMasks,
    labels: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray | None,
    meta: DatasetMeta,
    *,
    score_threshold: float = 0.5,
    **kwargs,
) -> np.ndarray:
    """Instances ``masks`` ``[N, H, W]`` (or :class:`LazyMasks`) with ``labels`` ``[N]`` and
    ``scores`` ``[N]``; those below ``score_threshold`` are left out. Lower scores are painted
    first."""
    if not isinstance(masks, LazyMasks):
        masks = _as_numpy(masks).astype(bool)
    labels = _as_numpy(labels)
    scores = np.ones(len(labels)) if scores is None else _as_numpy(scores)
    order = [i for i in np.argsort(scores) if scores[i] >= score_threshold]
    text = [f"{meta.classes[int(labels[i])]} {scores[i]:.2f}" for i in order]
    shown = LazyMasks(len(order), lambda j: np.asarray(masks[order[j]], dtype=bool))
    return overlay_segments(image, shown, [labels[i] for i in order], meta, labels=text, **kwargs)


def legend_handles(meta: DatasetMeta, class_ids: Sequence[int] | None = None):
    """Matplotlib patches for a legend of the given classes (all by default)."""
    from matplotlib.patches import Patch

    ids = range(meta.num_classes) if class_ids is None else class_ids
    return [Patch(color=np.asarray(meta.colors[i]) / 255, label=meta.classes[i]) for i in ids]
