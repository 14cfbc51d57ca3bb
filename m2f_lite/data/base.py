"""What every dataset reader shares: raw record -> tensors -> augmentation -> training targets.

A reader implements ``__len__`` and ``load(index)``, returning the image as uint8 RGB
``[H, W, 3]`` and its ground truth in the dataset's own form, one of:

- panoptic: ``"pan_seg"`` int64 ``[H, W]`` segment ids (0 = void) and ``"segments"``, a list of
  ``(segment id, contiguous class, iscrowd)``;
- instance: ``"masks"`` bool ``[N, H, W]``, ``"labels"`` ``[N]`` contiguous, ``"iscrowd"`` ``[N]``;
- semantic: ``"sem_seg"`` int64 ``[H, W]`` contiguous classes, 255 = ignore.

``get`` turns it into the sample every model and evaluator in m2f_lite reads::

    {"image": float [3, H, W] RGB 0..255, "labels": long [N], "masks": bool [N, H, W],
     "image_id", "file_name", "orig_size": (H0, W0), "image_size": (H, W),
     "sem_seg": long [H, W] (semantic and panoptic data; 255 = ignore)}

following the official mappers: one target per non-crowd segment (panoptic), per non-crowd
instance (instance) or per class present (semantic: a class is one segment). Crowd regions and
void are never targets. A mask left empty by augmentation (cropped away) stays a target, as the
official panoptic and instance mappers keep it (it counts in ``num_masks`` and is matched with an
all-zero mask); only COCO's instance LSJ mapper drops it (``filter_empty_instances``):
``drop_empty_masks``, which ``m2f_lite.data.build`` sets for instance data under LSJ training.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from m2f_lite.data.files import DatasetError
from m2f_lite.data.meta import DatasetMeta


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class of the readers; subclasses set ``self.meta``, ``self.task`` and implement ``load``."""

    task: str  # "panoptic" | "instance" | "semantic"
    # drop targets whose mask is empty after augmentation: detectron2's filter_empty_instances,
    # which only coco_instance_new_baseline_dataset_mapper (COCO instance LSJ) calls
    drop_empty_masks: bool = False

    def __init__(self, *, meta: DatasetMeta, transforms=None, ignore_label: int = 255):
        self.meta = meta
        self.transforms = transforms
        self.ignore_label = ignore_label
        self._gen: torch.Generator | None = None
        self._gen_owner: tuple[int, int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict:
        raise NotImplementedError

    def _generator(self) -> torch.Generator:
        """This process's augmentation generator, seeded from ``torch.initial_seed()``.

        DataLoader workers get ``base_seed + worker_id`` from the loader's own generator, so the
        stream is reproducible for a given loader seed and different in every worker (a generator
        copied into a worker from the parent is replaced, never shared).
        """
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), info.id if info is not None else -1)
        if self._gen is None or self._gen_owner != owner:
            self._gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
            self._gen_owner = owner
        return self._gen

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``ds[i]`` (augmented with this process's generator) or ``ds[i, seed]`` (augmented with a
        generator seeded ``seed``: what ``loader.TrainingSampler`` yields)."""
        if isinstance(key, tuple):
            index, seed = key
            return self.get(index, generator=torch.Generator().manual_seed(seed))
        return self.get(key, generator=self._generator())

    def get(
        self, index: int, *, generator: torch.Generator | None = None, transform: bool = True
    ) -> dict:
        """The sample ``index``; ``transform=False`` gives it at the original size, un-augmented."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        raw = self.load(index)
        sample, segments = self._tensors(raw)
        h0, w0 = raw["image"].shape[:2]
        if transform and self.transforms is not None:
            gen = generator if generator is not None else torch.Generator().manual_seed(index)
            sample = self.transforms(sample, gen)
        labels, masks = self._targets(sample, segments)
        if self.drop_empty_masks:  # COCO instance LSJ only; the other mappers keep empty masks
            nonempty = masks.flatten(1).any(1)  # [N]
            labels, masks = labels[nonempty], masks[nonempty]
        sample["labels"], sample["masks"] = labels, masks
        sample.update(
            image_id=raw["image_id"],
            file_name=str(raw["file_name"]),
            orig_size=(h0, w0),
            image_size=tuple(sample["image"].shape[-2:]),
        )
        return sample

    def _tensors(self, raw: dict) -> tuple[dict, tuple]:
        """The transform input (image + label maps or masks) and what the targets need later."""
        image = torch.from_numpy(np.ascontiguousarray(raw["image"]))  # [H, W, 3] uint8
        sample = {"image": image.permute(2, 0, 1).float()}  # [3, H, W]
        for key in ("pan_seg", "sem_seg"):
            if key in raw:
                sample[key] = torch.as_tensor(raw[key], dtype=torch.long)  # [H, W]
        segments: tuple = ()
        if self.task == "panoptic":
            seg_ids = torch.tensor([s[0] for s in raw["segments"]], dtype=torch.long)  # [S]
            seg_cls = torch.tensor([s[1] for s in raw["segments"]], dtype=torch.long)  # [S]
            crowd = torch.tensor([s[2] for s in raw["segments"]], dtype=torch.bool)  # [S]
            index = segment_index(sample["pan_seg"], seg_ids)  # [H, W], -1 = no segment
            check_segment_ids(
                sample["pan_seg"], index, seg_ids, raw.get("pan_file", raw["file_name"])
            )
            sem = torch.full_like(index, self.ignore_label)
            sem[index >= 0] = seg_cls[index[index >= 0]]
            sample["sem_seg"] = sem  # [H, W]
            segments = (seg_ids[~crowd], seg_cls[~crowd])
        elif self.task == "instance":
            crowd = torch.as_tensor(np.asarray(raw["iscrowd"], dtype=bool))  # [N]
            sample["masks"] = torch.as_tensor(raw["masks"], dtype=torch.bool)[~crowd]  # [N, H, W]
            segments = (torch.as_tensor(np.asarray(raw["labels"]), dtype=torch.long)[~crowd],)
        h0, w0 = raw["image"].shape[:2]
        if any(v.shape[-2:] != (h0, w0) for v in sample.values()):
            raise DatasetError(
                f"image is {h0}x{w0} but its annotation has another size", file=raw["file_name"]
            )
        return sample, segments

    def _targets(self, sample: dict, segments: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels`` ``[N]`` and ``masks`` ``[N, H, W]`` from the transformed sample."""
        if self.task == "panoptic":
            seg_ids, seg_cls = segments
            pan = sample.pop("pan_seg")  # [H, W]
            return seg_cls, pan[None] == seg_ids[:, None, None]  # [N, H, W]
        if self.task == "instance":
            return segments[0], sample.pop("masks")
        sem = sample["sem_seg"]  # [H, W]
        labels = torch.unique(sem)
        labels = labels[labels != self.ignore_label]  # [N] classes present
        return labels, sem[None] == labels[:, None, None]  # [N, H, W]: a class is one segment


def segment_index(pan: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """For every pixel of a segment-id map ``pan`` ``[H, W]``, the position of its id in
    ``seg_ids`` ``[S]``; ``-1`` where the id is not among them (void 0, or an unknown id)."""
    index = torch.full_like(pan, -1)
    if len(seg_ids) == 0:
        return index
    order = torch.argsort(seg_ids)
    sorted_ids = seg_ids[order]
    pos = torch.searchsorted(sorted_ids, pan).clamp_(max=len(sorted_ids) - 1)  # [H, W]
    hit = sorted_ids[pos] == pan
    index[hit] = order[pos[hit]]
    return index


def check_segment_ids(pan: torch.Tensor, index: torch.Tensor, seg_ids: torch.Tensor, file) -> None:
    """Refuse a panoptic PNG whose segment ids and its JSON ``segments_info`` disagree: an id
    in the PNG but not in the JSON (its pixels would silently become void), or one in the JSON
    but not in the PNG (a target with an empty mask). ``index`` is :func:`segment_index`'s map;
    the check reuses it, so it costs two passes over the pixels, no sort."""
    unknown = (index < 0) & (pan != 0)  # [H, W]
    if unknown.any():
        ids = torch.unique(pan[unknown])[:10].tolist()
        raise DatasetError(
            f"segment ids {ids} are in the PNG but not in the JSON's segments_info", file=file
        )
    present = torch.zeros(len(seg_ids), dtype=torch.bool)
    present[index[index >= 0]] = True
    if not present.all():
        ids = seg_ids[~present][:10].tolist()
        raise DatasetError(
            f"segment ids {ids} are in the JSON's segments_info but not in the PNG (0 px)",
            file=file,
        )


def panoptic_to_semantic(
    pan: torch.Tensor, seg_ids: torch.Tensor, seg_cls: torch.Tensor, ignore_label: int = 255
) -> torch.Tensor:
    """Class map ``[H, W]`` from a segment-id map: each segment's pixels take its class (crowd
    included, as the official ``panoptic_semseg`` files), void and unknown ids become ``ignore_label``."""
    index = segment_index(pan, seg_ids)  # [H, W]
    sem = torch.full_like(pan, ignore_label)
    sem[index >= 0] = seg_cls[index[index >= 0]]
    return sem


def check_label_values(sem: np.ndarray, num_classes: int, ignore_label: int, file) -> None:
    """Refuse class ids outside ``[0, num_classes)`` that are not the ignore label."""
    values = np.unique(sem)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_label)]
    if len(bad):
        raise DatasetError(
            f"class ids {bad[:10].tolist()} are outside 0..{num_classes - 1} (and not the ignore "
            f"label {ignore_label})",
            file=file,
            field="pixel values",
        )
