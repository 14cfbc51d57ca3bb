"""Dataset metadata: class names, which classes are things, colours, and the original category ids.

Training uses contiguous class indices 0..K-1 (the model's K classes; index K is "no object").
Evaluation files (COCO json, panoptic PNG + json) use each dataset's own category ids;
``dataset_ids[k]`` maps a contiguous index back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetMeta:
    name: str
    classes: list[str]  # [K] class names, contiguous order
    is_thing: list[bool]  # [K] True for countable "thing" classes, False for "stuff"
    dataset_ids: list[int]  # [K] the dataset's own category id of each contiguous class
    colors: list[tuple[int, int, int]] = field(default_factory=list)  # [K] RGB, the same everywhere
    ignore_label: int = 255

    def __post_init__(self) -> None:
        k = len(self.classes)
        if len(self.is_thing) != k or len(self.dataset_ids) != k:
            raise ValueError(
                f"DatasetMeta {self.name!r}: classes, is_thing and dataset_ids must have the same "
                f"length, got {k}, {len(self.is_thing)}, {len(self.dataset_ids)}"
            )
        if not self.colors:
            self.colors = default_colors(k)
        if len(self.colors) != k:
            raise ValueError(
                f"DatasetMeta {self.name!r}: {len(self.colors)} colors for {k} classes"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def thing_ids(self) -> list[int]:
        """Contiguous indices of the thing classes."""
        return [k for k, t in enumerate(self.is_thing) if t]

    def contiguous_id(self, dataset_id: int) -> int:
        """Contiguous index of a dataset category id; ``KeyError`` naming the id if it is unknown."""
        lookup = {d: k for k, d in enumerate(self.dataset_ids)}
        if dataset_id not in lookup:
            raise KeyError(f"category id {dataset_id} is not a category of {self.name!r}")
        return lookup[dataset_id]


def default_colors(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct, deterministic RGB colours (golden-ratio hue steps)."""
    import colorsys

    out = []
    for i in range(k):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65, 0.95 if i % 2 == 0 else 0.75)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out
