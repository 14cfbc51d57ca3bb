"""Reading dataset files robustly: images, label PNGs, panoptic PNGs and annotation JSON.

Every reader in ``m2f_lite.data`` goes through these functions, so a bad file anywhere gives the
same kind of error: a :class:`DatasetError` naming the file, the field when there is one, and what
was expected. Harmless variations are handled here once, as detectron2's ``read_image`` does:

- EXIF orientation is applied (``ImageOps.exif_transpose``), so phone photos come out upright;
- grayscale, palette, RGBA and 16-bit images become 8-bit RGB (16-bit is rescaled, not clipped).

Panoptic PNGs store a segment id per pixel in the colour: ``id = R + 256 G + 256² B``
(panopticapi's ``rgb2id``); :func:`rgb2id` and :func:`id2rgb` convert both ways.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m2f_lite.metrics.panoptic_format import id2rgb, rgb2id  # the id <-> RGB encoding, defined once

__all__ = ["DatasetError", "id2rgb", "read_image", "read_json", "read_panoptic_png", "rgb2id"]


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names file and field."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        self.file = None if file is None else str(file)
        self.field = field
        where = ": ".join(x for x in (self.file, field) if x)
        super().__init__(f"{where}: {message}" if where else message)


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing {what} (no such file)", file=path)
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not later in a worker
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x Image.MAX_IMAGE_PIXELS pixels
        raise DatasetError(f"{what} too large to decode ({e})", file=path) from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"corrupt or truncated {what} ({e})", file=path) from e
    return img


def image_mode_note(img: Image.Image) -> str | None:
    """What :func:`to_rgb` will convert, in words (``None`` for plain 8-bit RGB)."""
    if img.mode == "RGB":
        return None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return f"{img.mode} (16-bit) image: rescaled to 8-bit RGB"
    return f"{img.mode} image: converted to RGB"


def to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode as uint8 RGB ``[H, W, 3]``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") would clip at 255; rescale 0..65535 -> 0..255
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        g = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if img.mode == "F":
        g = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``, EXIF orientation applied.

    Raises :class:`DatasetError` for a missing, corrupt or truncated file.
    """
    img = _open(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except (
        OSError,
        ValueError,
        SyntaxError,
    ) as e:  # a broken EXIF block: keep the pixels as stored
        raise DatasetError(f"unreadable EXIF orientation ({e})", file=path, field="EXIF") from e
    return to_rgb(img)


def read_label_png(path: str | Path) -> np.ndarray:
    """A single-channel label PNG (semantic ids, Cityscapes instance ids) as int64 ``[H, W]``.

    8-bit (``L``), palette (``P``: the palette index is the label) and 16-bit PNGs are read as
    stored; an RGB label file is refused (a colour visualisation is not a label map).
    """
    img = _open(path, "label PNG")
    if img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        return np.asarray(img).astype(np.int64)
    raise DatasetError(
        f"expected a single-channel label PNG (mode L, P or I;16), got mode {img.mode}",
        file=path,
        field="mode",
    )


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """A COCO-format panoptic PNG as int64 segment ids ``[H, W]`` (0 = void)."""
    img = _open(path, "panoptic PNG")
    if img.mode not in ("RGB", "RGBA"):
        raise DatasetError(
            f"expected an RGB panoptic PNG (id = R + 256 G + 256^2 B), got mode {img.mode}",
            file=path,
            field="mode",
        )
    return rgb2id(np.asarray(img.convert("RGB"))).astype(np.int64)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error is reported with its line and column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("missing annotation file (no such file)", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=path
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e})", file=path) from e


def require(d: dict, key: str, file: str | Path, where: str = "") -> Any:
    """``d[key]``, or a :class:`DatasetError` naming the file and the missing field."""
    if not isinstance(d, dict) or key not in d:
        raise DatasetError("missing field", file=file, field=f"{where}{key}")
    return d[key]
