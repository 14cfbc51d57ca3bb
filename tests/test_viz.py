import numpy as np
import torch

from m2f_lite.data.meta import DatasetMeta
from m2f_lite.viz import (
    boundaries,
    draw_instances,
    draw_panoptic,
    draw_semantic,
    place_label,
    to_uint8_image,
)

META = DatasetMeta(
    name="toy",
    classes=["disc", "sky"],
    is_thing=[True, False],
    dataset_ids=[1, 2],
    colors=[(255, 0, 0), (0, 0, 255)],
)


def test_to_uint8_image_accepts_the_package_convention():
    chw = torch.full((3, 4, 5), 300.0)  # out of range on purpose: clipped
    out = to_uint8_image(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out.max() == 255
    gray = to_uint8_image(np.zeros((4, 5), dtype=np.uint8))
    assert gray.shape == (4, 5, 3)


def test_boundaries_of_a_square_are_its_outer_ring():
    m = np.zeros((7, 7), dtype=bool)
    m[1:6, 1:6] = True
    b = boundaries(m)
    assert b.sum() == 16  # 5x5 square: 25 - 9 interior
    assert not b[3, 3] and b[1, 1] and not b[0, 0]


def test_panoptic_overlay_paints_each_segment_in_its_class_colour():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    pan = np.zeros((32, 32), dtype=np.int32)
    pan[:, :16] = 1  # sky (stuff)
    pan[20:30, 20:30] = 2  # a disc (thing)
    infos = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 0}]
    out = draw_panoptic(image, pan, infos, META, alpha=1.0, outline=False, labels=["", ""])
    assert tuple(out[5, 5]) == (0, 0, 255)
    assert tuple(out[25, 25]) == (255, 0, 0)
    assert tuple(out[5, 25]) == (0, 0, 0)  # void stays the image


def test_instances_below_the_threshold_are_not_drawn():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, :8] = True
    masks[1, 8:] = True
    out = draw_instances(
        image, masks, np.array([0, 0]), np.array([0.9, 0.1]), META, outline=False, alpha=1.0
    )
    assert out[:8].any() and not out[12:].any()


def test_semantic_overlay_takes_scores_or_ids():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    scores = torch.zeros(2, 8, 8)
    scores[1, :4] = 1.0
    a = draw_semantic(image, scores, META, alpha=1.0, labels=["", ""])
    b = draw_semantic(image, scores.argmax(0), META, alpha=1.0, labels=["", ""])
    assert np.array_equal(a, b) and tuple(a[0, 0]) == (0, 0, 255)


def test_labels_stay_inside_the_image_and_do_not_cover_each_other():
    extent = (-12, -4, 12, 4)  # a label box 25 x 9 around its anchor
    edge = np.zeros((32, 32), dtype=bool)
    edge[0:3, 29:32] = True  # a small shape in the top right corner
    x, y = place_label(edge, extent)
    assert (x + extent[0], y + extent[1]) >= (0, 0) and (x + extent[2], y + extent[3]) <= (31, 31)
    assert (x, y) == (31 - 12, 4)  # moved left and down just enough
    shape = np.zeros((32, 32), dtype=bool)
    shape[10:20, 10:20] = True
    first = place_label(shape, extent)
    box = (first[0] - 12, first[1] - 4, first[0] + 12, first[1] + 4)
    second = place_label(shape, extent, [box])  # a duplicate of the same shape
    assert second[0] == first[0] and abs(second[1] - first[1]) >= 9  # a whole label height away


def test_drawn_labels_of_duplicates_are_both_readable():
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[:, 20:40, 20:40] = True  # two queries on one shape

    def label_rows(n: int) -> int:  # rows holding a label's black box
        scores = np.array([0.9, 0.8][:n])
        out = draw_instances(image, masks[:n], np.zeros(n), scores, META, alpha=0.0)
        return int((out == 0).all(-1).any(1).sum())

    assert label_rows(2) == 2 * label_rows(1) > 0  # one above the other, not on top
