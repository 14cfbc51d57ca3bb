"""Data augmentation: the official Mask2Former recipes, on torch tensors.

A transform takes a sample dict and a ``torch.Generator`` and returns the transformed dict. Keys:

- ``"image"``: float ``[3, H, W]``, RGB 0..255 with integer values, as the uint8 image read from
  disk (resized as detectron2 resizes a uint8 image: PIL's bilinear, rounded to uint8; padded with
  128);
- ``"sem_seg"``: long ``[H, W]`` class map (nearest resize, padded with the ignore label 255);
- ``"pan_seg"``: long ``[H, W]`` panoptic segment ids (nearest, padded with 0 = void);
- ``"masks"``: bool ``[N, H, W]`` instance masks (nearest, padded with False).

Every geometric step is applied to all of them, so labels stay aligned with pixels; all randomness
comes from the generator, so a seed fixes the result. The recipes (``build_transforms`` in
``m2f_lite.data.build`` assembles them from the config):

- LSJ, large-scale jittering (COCO; ``coco_*_new_baseline_dataset_mapper.py``):
  ``RandomFlip -> ResizeScale(0.1..2.0 of 1024) -> FixedSizeCrop(1024)`` (pads smaller images);
- semantic (ADE20K, Cityscapes; ``mask_former_semantic_dataset_mapper.py``):
  ``ResizeShortestEdge(choice) -> RandomCrop(category-area check) -> ColorAugSSD -> RandomFlip -> Pad``;
- test time: ``ResizeShortestEdge(min_size_test, max_size_test)``.

They follow detectron2's ``augmentation_impl.py`` (sizes, rounding, crop offsets, pad values).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Sample = (
    dict  # {"image": [3, H, W], optional "sem_seg" [H, W], "pan_seg" [H, W], "masks" [N, H, W]}
)
LABEL_KEYS = ("sem_seg", "pan_seg", "masks")


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, n: int) -> int:
    """Uniform in ``[0, n)``."""
    return int(torch.randint(n, (), generator=gen))


def _coin(gen: torch.Generator, p: float = 0.5) -> bool:
    return _uniform(gen) < p


def size_of(sample: Sample) -> tuple[int, int]:
    return tuple(sample["image"].shape[-2:])


def nearest_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize of the last two dims, any dtype (PIL's NEAREST: pixel centres)."""
    H, W = x.shape[-2:]
    rows = ((torch.arange(h, dtype=torch.float64) + 0.5) * (H / h)).long().clamp_(max=H - 1)  # [h]
    cols = ((torch.arange(w, dtype=torch.float64) + 0.5) * (W / w)).long().clamp_(max=W - 1)  # [w]
    return x[..., rows[:, None], cols[None, :]]  # [..., h, w]


def bilinear_resize_uint8(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """detectron2's ``ResizeTransform.apply_image`` for a uint8 image (every mapper reads uint8):
    ``Image.fromarray(img).resize((w, h), Image.BILINEAR)``. PIL's bilinear widens its filter when
    shrinking (antialiasing) and rounds to uint8; a float resize differs by up to a few levels."""
    if image.dtype != torch.uint8:  # a uint8 image (the predictor's photos) is used as is
        image = image.round().clamp(0, 255).to(torch.uint8)
    pixels = image.permute(1, 2, 0).contiguous()  # [H, W, 3]
    resized = Image.fromarray(pixels.numpy()).resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).float()  # [3, h, w]


def resize(sample: Sample, h: int, w: int) -> Sample:
    """Resize everything to ``h x w`` as detectron2: the image by PIL's bilinear on uint8
    (:func:`bilinear_resize_uint8`), labels by nearest. The same size returns the sample as is."""
    if (h, w) == size_of(sample):
        return sample
    out = dict(sample)
    out["image"] = bilinear_resize_uint8(sample["image"], h, w)
    for k in LABEL_KEYS:
        if k in sample:
            out[k] = nearest_resize(sample[k], h, w)
    return out


def crop(sample: Sample, y0: int, x0: int, h: int, w: int) -> Sample:
    out = dict(sample)
    for k in ("image", *LABEL_KEYS):
        if k in sample:
            out[k] = sample[k][..., y0 : y0 + h, x0 : x0 + w]
    return out


def pad(
    sample: Sample, h: int, w: int, *, pad_value: float = 128.0, ignore_label: int = 255
) -> Sample:
    """Pad bottom and right up to ``h x w`` (never crops)."""
    H, W = size_of(sample)
    ph, pw = max(h - H, 0), max(w - W, 0)
    if ph == 0 and pw == 0:
        return sample
    fill = {"image": pad_value, "sem_seg": ignore_label, "pan_seg": 0, "masks": False}
    out = dict(sample)
    for k, v in fill.items():
        if k in sample:
            x = sample[k]
            out[k] = F.pad(
                x.to(torch.uint8) if x.dtype == torch.bool else x, (0, pw, 0, ph), value=v
            )
            if x.dtype == torch.bool:
                out[k] = out[k].bool()
    return out


class Compose:
    """Apply transforms in order, all drawing from one generator."""

    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, gen)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, *, prob: float = 0.5):
        self.prob = prob

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        if not _coin(gen, self.prob):
            return sample
        out = dict(sample)
        for k in ("image", *LABEL_KEYS):
            if k in sample:
                out[k] = sample[k].flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class ResizeScale:
    """LSJ's resize: draw ``scale ~ U(min_scale, max_scale)``, fit the image inside
    ``scale * (target_height, target_width)`` keeping its aspect ratio (detectron2 ``ResizeScale``)."""

    def __init__(
        self, *, min_scale: float, max_scale: float, target_height: int, target_width: int
    ):
        self.min_scale, self.max_scale = min_scale, max_scale
        self.target = (target_height, target_width)

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        scale = _uniform(gen, self.min_scale, self.max_scale)
        h, w = size_of(sample)
        s = min(self.target[0] * scale / h, self.target[1] * scale / w)
        return resize(sample, max(round(h * s), 1), max(round(w * s), 1))

    def __repr__(self) -> str:
        return f"ResizeScale({self.min_scale}..{self.max_scale} of {self.target})"


class FixedSizeCrop:
    """Random crop to ``crop_size`` where the image is larger, then pad bottom/right where it is
    smaller (image with ``pad_value`` = 128, labels with ignore / void), as detectron2's
    ``FixedSizeCrop``: one uniform draw sets the offset along both axes."""

    def __init__(
        self, *, crop_size: tuple[int, int], pad_value: float = 128.0, ignore_label: int = 255
    ):
        self.crop_size, self.pad_value, self.ignore_label = (
            tuple(crop_size),
            pad_value,
            ignore_label,
        )

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        h, w = size_of(sample)
        ch, cw = self.crop_size
        u = _uniform(gen)
        y0, x0 = round(max(h - ch, 0) * u), round(max(w - cw, 0) * u)
        sample = crop(sample, y0, x0, min(ch, h), min(cw, w))
        return pad(sample, ch, cw, pad_value=self.pad_value, ignore_label=self.ignore_label)

    def __repr__(self) -> str:
        return f"FixedSizeCrop({self.crop_size})"


def shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: short side -> ``short``, long side <= ``max_size``."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    # at least one pixel: a 1x300 strip would round to 0 rows (detectron2's would, and fail)
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


class ResizeShortestEdge:
    """Resize the short side to a length drawn from ``short_edge_length`` ("choice": one of the
    list; "range": an integer in ``[min, max]``), capping the long side at ``max_size``."""

    def __init__(
        self, *, short_edge_length: tuple[int, ...], max_size: int, sample_style: str = "choice"
    ):
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style={sample_style!r}: expected 'choice' or 'range'")
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(f"short_edge_length={short_edge_length}: 'range' needs (min, max)")
        self.lengths, self.max_size, self.style = tuple(short_edge_length), max_size, sample_style

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        if self.style == "range":
            short = self.lengths[0] + _randint(gen, self.lengths[1] - self.lengths[0] + 1)
        else:
            short = (
                self.lengths[_randint(gen, len(self.lengths))]
                if len(self.lengths) > 1
                else self.lengths[0]
            )
        if short == 0:
            return sample
        h, w = size_of(sample)
        return resize(sample, *shortest_edge_shape(h, w, short, self.max_size))

    def __repr__(self) -> str:
        return f"ResizeShortestEdge({self.lengths}, max_size={self.max_size}, {self.style})"


class RandomCrop:
    """Random ``crop_size`` crop (clipped to the image), retried up to 10 times until no single class
    covers more than ``single_category_max_area`` of the crop's labelled pixels and at least two
    classes appear (detectron2 ``RandomCrop_CategoryAreaConstraint``; 1.0 disables the check, as
    the official ADE20K and Cityscapes configs do). The check uses ``"sem_seg"`` when present."""

    def __init__(
        self,
        *,
        crop_size: tuple[int, int],
        single_category_max_area: float = 1.0,
        ignore_label: int = 255,
    ):
        self.crop_size, self.max_area, self.ignore_label = (
            tuple(crop_size),
            single_category_max_area,
            ignore_label,
        )

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        h, w = size_of(sample)
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        sem = sample.get("sem_seg")
        for _ in range(10):
            y0, x0 = _randint(gen, h - ch + 1), _randint(gen, w - cw + 1)
            if self.max_area >= 1.0 or sem is None:
                break
            window = sem[y0 : y0 + ch, x0 : x0 + cw]
            counts = torch.bincount(window[window != self.ignore_label].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < counts.sum() * self.max_area:
                break
        return crop(sample, y0, x0, ch, cw)

    def __repr__(self) -> str:
        return f"RandomCrop({self.crop_size}, single_category_max_area={self.max_area})"


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = rgb
    v, _ = rgb.max(0)
    c = v - rgb.min(0).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(
        v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv
    k = (
        torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype)[:, None, None] + h[None] * 6
    ) % 6  # [3, H, W]
    return v[None] - v[None] * s[None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class ColorAugSSD:
    """SSD's photometric distortion (detectron2 ``ColorAugSSDTransform``, used by the official ADE20K
    and Cityscapes recipes): brightness ±32 (p = 0.5), then in random order contrast ×[0.5, 1.5],
    saturation ×[0.5, 1.5] and hue ±18 OpenCV units (= ±36°), each with p = 0.5. Values are clipped to
    0..255 and truncated to integers after each step, as the official uint8 pipeline does."""

    def __init__(
        self,
        *,
        brightness_delta: float = 32,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast, self.saturation = contrast, saturation
        self.hue_delta = hue_delta

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        img = sample["image"]
        if _coin(gen):
            delta = _uniform(gen, -self.brightness_delta, self.brightness_delta)
            img = (img + delta).clamp(0, 255).floor()
        steps = [self._contrast, self._saturation, self._hue]
        for step in steps if _coin(gen) else [steps[1], steps[2], steps[0]]:
            img = step(img, gen)
        return {**sample, "image": img}

    def _contrast(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if _coin(gen):
            img = (img * _uniform(gen, *self.contrast)).clamp(0, 255).floor()
        return img

    def _saturation(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if _coin(gen):
            hsv = rgb_to_hsv(img / 255)
            hsv[1] = (hsv[1] * _uniform(gen, *self.saturation)).clamp(0, 1)
            img = (hsv_to_rgb(hsv) * 255).clamp(0, 255).floor()
        return img

    def _hue(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if _coin(gen):
            delta = _randint(gen, 2 * self.hue_delta + 1) - self.hue_delta  # OpenCV hue units (2°)
            hsv = rgb_to_hsv(img / 255)
            hsv[0] = (hsv[0] + delta / 180) % 1
            img = (hsv_to_rgb(hsv) * 255).clamp(0, 255).floor()
        return img

    def __repr__(self) -> str:
        return "ColorAugSSD()"


class Pad:
    """Pad bottom/right up to ``size`` (the semantic mapper's ``SIZE_DIVISIBILITY`` padding: the
    official pads to exactly that size after a crop no larger than it)."""

    def __init__(self, *, size: tuple[int, int], pad_value: float = 128.0, ignore_label: int = 255):
        self.size, self.pad_value, self.ignore_label = tuple(size), pad_value, ignore_label

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        return pad(sample, *self.size, pad_value=self.pad_value, ignore_label=self.ignore_label)

    def __repr__(self) -> str:
        return f"Pad({self.size})"
