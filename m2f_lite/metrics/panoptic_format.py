"""The COCO panoptic file format: segment ids stored as RGB PNGs.

A COCO panoptic annotation is a pair:

* a PNG per image whose pixel colour encodes a segment id, ``id = R + 256 * G + 256**2 * B``
  (id 0, black, is VOID: unlabelled pixels, excluded from evaluation);
* a JSON entry per image, ``{"image_id", "file_name", "segments_info": [{"id", "category_id",
  "iscrowd", "area", ...}]}``, that says which category each segment id belongs to.

The same format holds ground truth and predictions (http://cocodataset.org/#format-data), so
``pq_compute`` and the panoptic evaluator read and write it with the helpers here.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

MAX_SEGMENT_ID = 256**3 - 1  # the largest id three 8-bit channels can hold


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` (uint32) from an RGB(A) array ``[H, W, C>=3]``: ``R + 256 G + 256² B``."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb2id: expected an [H, W, 3] RGB array, got shape {tuple(rgb.shape)}")
    rgb = rgb.astype(np.uint32, copy=False)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)  # [H, W]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb2id`: an ``[H, W, 3]`` uint8 array from segment ids ``[H, W]``."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"id2rgb: expected an [H, W] id map, got shape {tuple(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"id2rgb: segment ids must lie in 0..{MAX_SEGMENT_ID}")
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids & 0xFF, (ids >> 8) & 0xFF, (ids >> 16) & 0xFF], axis=-1)  # [H, W, 3]
    return rgb.astype(np.uint8)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Segment ids ``[H, W]`` (uint32) from a COCO panoptic PNG; the error names the file."""
    with Image.open(path) as img:
        rgb = np.asarray(img)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(
            f"{path}: a panoptic PNG must be RGB (id = R + 256 G + 256² B), got mode with "
            f"array shape {tuple(rgb.shape)}"
        )
    return rgb2id(rgb)


def panoptic_png_bytes(ids: np.ndarray) -> bytes:
    """The PNG encoding of an id map ``[H, W]``, as :func:`write_panoptic_png` would write it."""
    with io.BytesIO() as out:
        Image.fromarray(id2rgb(ids)).save(out, format="PNG")
        return out.getvalue()


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write an id map ``[H, W]`` as a COCO panoptic RGB PNG."""
    Image.fromarray(id2rgb(ids)).save(path, format="PNG")
