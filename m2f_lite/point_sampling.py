"""Point sampling: evaluate masks at K points instead of at every pixel (Sec. 3.3 of the paper).

Mask2Former computes both the matching cost and the mask losses on K = 112 × 112 = 12544 points
rather than on full-resolution masks, which cuts training memory by 3× (18 GB → 6 GB per image):

- matching: the same K points, drawn uniformly at random, for every prediction and target of an
  image (``uniform_points``);
- loss: per matched prediction, K points drawn by importance sampling (PointRend, Kirillov et al.
  2020): draw 3K uniform points, keep the 0.75·K most uncertain ones (uncertainty = −|logit|, the
  points where the prediction is closest to 0.5), and add 0.25·K fresh uniform points
  (``importance_sampled_points``).

Coordinates are ``(x, y)`` in ``[0, 1]²`` relative to the whole (padded) image, so a prediction at
H/4 × W/4 and a target at H × W are sampled at the same place without resizing either. A value at
a point is bilinear interpolation of the four nearest pixel centres, with zeros outside the mask,
exactly ``F.grid_sample(..., align_corners=False)`` at ``2·p − 1`` (``point_sample``, the reference).
For boolean targets ``point_sample_binary`` computes the same numbers (to float rounding, ~1e-6)
from the four neighbours directly, without a float copy of every target mask (50 targets at 1024²
would be 200 MB; the official code makes that copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform_points(num_masks: int, num_points: int, device: torch.device | str) -> Tensor:
    """``num_points`` uniformly random ``(x, y)`` points in ``[0, 1]²`` per mask: ``[num_masks, P, 2]``.

    The single source of randomness of the matcher and the criterion (tests patch ``torch.rand``).
    """
    return torch.rand(num_masks, num_points, 2, device=device)  # [M, P, 2]


def point_sample(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``features`` ``[M, C, H, W]`` at ``points`` ``[M, P, 2]`` in ``[0, 1]²``: ``[M, C, P]``.

    PointRend's ``point_sample``: ``grid_sample`` wants coordinates in ``[-1, 1]``, hence ``2·p − 1``;
    ``align_corners=False`` puts pixel i's centre at ``(i + 0.5) / W``; outside the map is zero.
    Differentiable with respect to ``features``.
    """
    grid = 2.0 * points[:, :, None, :] - 1.0  # [M, P, 1, 2]
    values = F.grid_sample(features, grid, mode="bilinear", align_corners=False)  # [M, C, P, 1]
    return values[..., 0]  # [M, C, P]


def point_sample_binary(masks: Tensor, points: Tensor, rows: Tensor | None = None) -> Tensor:
    """``point_sample`` for boolean masks, reading only the four pixels around each point.

    Args:
        masks: ``[N, H, W]`` bool (or any dtype) target masks.
        points: ``[M, P, 2]`` points in ``[0, 1]²``, one set per sampled mask, or ``[P, 2]`` shared
            by all of them.
        rows: ``[M]`` which masks to sample (default: all N, in order).

    Returns:
        ``[M, P]`` float32: bilinear interpolation of the masks (values in ``[0, 1]``; fractional
        near a boundary), equal to ``point_sample(masks[rows, None].float(), points)[:, 0]`` up
        to float rounding (the tests compare them).
    """
    n, height, width = masks.shape
    if rows is None:
        rows = torch.arange(n, device=masks.device)
    flat = masks.reshape(n, height * width)  # [N, HW] (a view: no copy)
    # In pixel units, pixel i's centre at i (align_corners=False puts it at (i + 0.5) / W).
    x = points[..., 0] * width - 0.5  # [M, P] or [P]
    y = points[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()  # the pixel up and to the left of each point
    weights_x = (x0 + 1.0 - x, x - x0)  # bilinear weights of columns x0 and x0 + 1
    weights_y = (y0 + 1.0 - y, y - y0)  # of rows y0 and y0 + 1
    out = torch.zeros(len(rows), x.shape[-1], dtype=torch.float32, device=masks.device)  # [M, P]
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)  # zeros padding
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()
            if index.dim() == 1:  # shared points: the same P pixels of every mask
                value = flat.index_select(1, index).index_select(0, rows)  # [M, P]
            else:  # the sampled masks' rows only (M·HW bools), then each row's own P pixels
                value = flat.index_select(0, rows).gather(1, index)  # [M, P]
            out = out + value.float() * (weights_x[dx] * weights_y[dy] * inside)
    return out  # [M, P]


def uncertainty(logits: Tensor) -> Tensor:
    """PointRend's uncertainty of a mask logit: −|logit| (highest where the prediction is 0.5)."""
    return -logits.abs()


@torch.no_grad()
def importance_sampled_points(
    mask_logits: Tensor, *, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """PointRend's ``get_uncertain_point_coords_with_randomness``, used by the Mask2Former loss.

    Args:
        mask_logits: ``[M, 1, h, w]`` predicted mask logits (one per matched prediction).
        num_points: K, the number of points per mask.
        oversample_ratio: draw ``int(K · oversample_ratio)`` uniform candidates (3 in the paper).
        importance_sample_ratio: keep the ``int(K · ratio)`` most uncertain candidates (0.75); the
            remaining points are fresh uniform draws.

    Returns:
        ``[M, K, 2]`` points in ``[0, 1]²``. Uncertainty is −|logit| *at the point* (interpolated
        logit), not interpolated uncertainty: a point between logits −1 and +1 has logit 0 and is
        maximally uncertain. Computed without gradient: the points are constants of the loss.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    candidates = uniform_points(num_masks, num_candidates, mask_logits.device)  # [M, 3K, 2]
    scores = uncertainty(point_sample(mask_logits, candidates))[:, 0]  # [M, 3K]
    # the set of the most uncertain candidates; their order only changes the loss's summation order
    top = scores.topk(num_uncertain, dim=1, sorted=False).indices  # [M, 0.75K]
    uncertain = candidates.gather(1, top[:, :, None].expand(-1, -1, 2))  # [M, 0.75K, 2]
    if num_random == 0:
        return uncertain
    random = uniform_points(num_masks, num_random, mask_logits.device)  # [M, 0.25K, 2]
    return torch.cat([uncertain, random], dim=1)  # [M, K, 2]
