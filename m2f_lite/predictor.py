"""Predict on real images: any size and format in, the three results out at the original resolution.

>>> predictor = Predictor.from_checkpoint("runs/demo/model_final.pt")     # doctest: +SKIP
>>> result = predictor("photo.jpg")                                         # doctest: +SKIP
>>> result["panoptic_seg"][0].shape == result["image"].shape[:2]            # doctest: +SKIP
True

An image is a path (JPEG, PNG, ...: read with EXIF orientation applied), a PIL image, a numpy
array ``[H, W]``/``[H, W, 3|4]`` or a tensor ``[3, H, W]`` (0..255, the package's convention).
Grayscale becomes RGB, an alpha channel is dropped, 16-bit is rescaled (``m2f_lite.data.files``).
The image is resized as the config's test time says (short side ``data.min_size_test``, long side
at most ``data.max_size_test``), run through the model, and post-processed as the official
(``m2f_lite.inference``) for the tasks the checkpoint's ``cfg.inference`` enables (``tasks``),
back at the original size. A semantic-only checkpoint (ADE20K, Cityscapes semantic) thus takes
the official semantic path (class scores at the padded size, then crop and resize), and instance
results come only when instance inference is on (as ``m2f-lite eval`` computes them):

- ``"sem_seg"``: class scores ``[K, H, W]`` (``inference.semantic_on``);
- ``"panoptic_seg"``: ``(ids [H, W] int32, segments_info)``, ``category_id`` a contiguous class
  (``inference.panoptic_on``);
- ``"instances"``: ``{"masks" [k, H, W] bool, "scores" [k], "labels" [k]}`` (``inference.instance_on``);
- ``"image"``: the RGB image ``[H, W, 3]`` uint8 that was predicted (after EXIF rotation).

:func:`write_prediction` saves what ``m2f-lite predict`` writes: an overlay PNG (class names,
instance outlines) and the raw segmentation in the standard formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from m2f_lite import checkpoint as ckpt
from m2f_lite.atomic_io import atomic_write_bytes, atomic_write_text
from m2f_lite.config import Config
from m2f_lite.data.build import dataset_meta
from m2f_lite.data.files import read_image, to_rgb
from m2f_lite.data.meta import DatasetMeta

TASKS = ("panoptic", "instance", "semantic")


def load_rgb(image: Any) -> np.ndarray:
    """Any supported image (module doc) as uint8 RGB ``[H, W, 3]``."""
    if isinstance(image, str | os.PathLike):
        return read_image(image)  # EXIF orientation, modes, clear errors naming the file
    if isinstance(image, Image.Image):
        image = to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3, 4) else image
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image: expected [H, W], [H, W, 3|4] or [3, H, W], got shape {array.shape}"
        )
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64)), 0, 255).astype(np.uint8)
    array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    # a writable copy when needed: torch.from_numpy warns on read-only arrays (np.asarray(PIL))
    return np.require(array, requirements=("C", "W"))


class Predictor:
    """A model with its config and classes, ready to predict single images (module doc)."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        cfg: Config,
        meta: DatasetMeta,
        device: str | torch.device | None = None,
    ) -> None:
        from m2f_lite.data.build import build_transforms

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = ckpt.unwrap(model).to(self.device).eval()
        self.cfg, self.meta = cfg, meta
        self.resize = build_transforms(cfg.data, train=False)
        inf = cfg.inference
        enabled = {
            "panoptic": inf.panoptic_on,
            "instance": inf.instance_on,
            "semantic": inf.semantic_on,
        }
        self.tasks = tuple(t for t in TASKS if enabled[t])  # what a result holds
        if not self.tasks:
            raise ValueError(
                "the config enables no task: inference.{semantic,instance,panoptic}_on"
            )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        overrides: list[str] | dict | None = None,
    ) -> Predictor:
        """Load ``path`` (an ``m2f-lite train`` or ``convert`` checkpoint); ``overrides`` change
        test-time fields such as ``inference.object_mask_threshold`` or ``data.min_size_test``."""
        from m2f_lite.config import apply_overrides
        from m2f_lite.modeling.mask2former import build_model

        state = ckpt.load_checkpoint(path)
        cfg = apply_overrides(ckpt.checkpoint_config(state, path), overrides or {})
        model = build_model(cfg)
        ckpt.load_model_state(model, state["model"], source=str(path))
        meta = DatasetMeta(**state["meta"]) if "meta" in state else dataset_meta(cfg.data.dataset)
        return cls(model=model, cfg=cfg, meta=meta, device=device)

    @torch.no_grad()
    def __call__(
        self, image: Any, *, tasks: tuple[str, ...] | None = None, compact: bool = False
    ) -> dict[str, Any]:
        """The results of ``tasks`` (default: all of :attr:`tasks`) for one image (module doc).

        Memory stays bounded on large photos: the image is resized from uint8 (no float copy at
        full size) and the results are brought to full size a chunk of queries at a time
        (``m2f_lite.inference.ToOutputSize``); ask only for the task you need: ``sem_seg`` holds
        ``K`` floats a pixel and ``instances`` ``k`` bools a pixel. ``compact=True`` (what
        ``m2f-lite predict`` asks for) returns ``sem_labels`` ``[H, W]`` instead of ``sem_seg``
        and instance masks as COCO RLE (``instances["rles"]``): about one byte a pixel each.
        """
        from m2f_lite.inference import postprocess_from_config

        for task in tasks or ():
            if task not in self.tasks:
                raise ValueError(f"task={task!r}: this checkpoint predicts {', '.join(self.tasks)}")
        rgb = load_rgb(image)
        h, w = rgb.shape[:2]
        x = torch.from_numpy(rgb).permute(2, 0, 1)  # [3, H, W] uint8, a view
        x = self.resize({"image": x}, torch.Generator())["image"]  # [3, h', w'] test-time size
        outputs = self.model([x.float().to(self.device)])
        outputs = {
            "pred_logits": outputs["pred_logits"].float(),
            "pred_masks": outputs["pred_masks"].float(),
        }
        # the checkpoint's tasks and thresholds, as evaluation.evaluate post-processes
        (result,) = postprocess_from_config(
            outputs,
            [tuple(x.shape[-2:])],
            [(h, w)],
            self.cfg.inference,
            self.meta,
            only=tasks,
            compact=compact,
        )
        return {**result, "image": rgb}

    def draw(
        self, result: dict[str, Any], task: str, *, score_threshold: float = 0.5
    ) -> np.ndarray:
        """The overlay of one task's result on its image (``m2f_lite.viz``), uint8 ``[H, W, 3]``."""
        from m2f_lite import viz

        if task in TASKS and task not in self.tasks:
            raise ValueError(
                f"task={task!r}: this checkpoint predicts {', '.join(self.tasks)} "
                f"(inference.{task}_on=false; pass --inference.{task}_on=true to add it)"
            )

        image = result["image"]
        if task == "panoptic":
            ids, segments = result["panoptic_seg"]
            return viz.draw_panoptic(image, ids, segments, self.meta)
        if task == "instance":
            inst = result["instances"]
            masks, labels, scores = inst.get("masks"), inst["labels"], inst["scores"]
            if masks is None:  # compact: RLEs, decoded one at a time as they are drawn
                from pycocotools import mask as mask_util

                rles = inst["rles"]
                masks = viz.LazyMasks(
                    len(rles),
                    lambda i: mask_util.decode(
                        {**rles[i], "counts": rles[i]["counts"].encode()}
                    ).astype(bool),
                )
            return viz.draw_instances(
                image, masks, labels, scores, self.meta, score_threshold=score_threshold
            )
        if task == "semantic":
            sem = result["sem_labels"] if "sem_labels" in result else result["sem_seg"]
            return viz.draw_semantic(image, sem, self.meta)
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")


def write_prediction(
    predictor: Predictor,
    result: dict[str, Any],
    task: str,
    out_dir: str | os.PathLike,
    *,
    stem: str,
    image_id: int,
) -> list[Path]:
    """Write ``<stem>_overlay.png`` and the raw ``task`` result into ``out_dir``; returns the files.

    - panoptic: ``<stem>_panoptic.png`` (COCO panoptic: id = R + 256 G + 256² B) and its entry in
      ``panoptic.json`` (``annotations`` + ``categories``, dataset category ids);
    - instance: its entries in ``instances.json`` (COCO results: RLE ``segmentation``, ``score``);
    - semantic: ``<stem>_semantic.png`` (uint8 contiguous class ids).

    The json files gather all the images written into ``out_dir`` (one entry per ``image_id``;
    :func:`register_image` gives each input file its own ``image_id`` and ``stem``).
    """
    from m2f_lite.metrics.coco_ap import instances_to_coco_results
    from m2f_lite.metrics.panoptic_format import panoptic_png_bytes

    out, meta = Path(out_dir), predictor.meta
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}_overlay.png"]
    Image.fromarray(predictor.draw(result, task)).save(files[0])
    if task == "panoptic":
        ids, segments = result["panoptic_seg"]
        files.append(out / f"{stem}_panoptic.png")
        atomic_write_bytes(files[-1], panoptic_png_bytes(ids.cpu().numpy()))
        entry = {
            "image_id": image_id,
            "file_name": files[-1].name,
            "segments_info": [
                {**s, "category_id": int(meta.dataset_ids[s["category_id"]])} for s in segments
            ],
        }
        categories = [
            {"id": int(d), "name": n, "isthing": int(t)}
            for d, n, t in zip(meta.dataset_ids, meta.classes, meta.is_thing)
        ]
        files.append(_merge_json(out / "panoptic.json", [entry], categories=categories))
    elif task == "instance":
        entries = instances_to_coco_results(result["instances"], image_id, meta.dataset_ids)
        files.append(_merge_json(out / "instances.json", entries))
    elif task == "semantic":
        files.append(out / f"{stem}_semantic.png")
        labels = result["sem_labels"] if "sem_labels" in result else result["sem_seg"].argmax(0)
        labels = labels.to(torch.uint8).cpu().numpy()  # [H, W]
        Image.fromarray(labels).save(files[-1])
    else:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    return files


IMAGES_JSON = "images.json"  # in an output folder: which input file has which image_id and stem


def register_image(out_dir: str | os.PathLike, image: str | os.PathLike) -> tuple[int, str]:
    """The ``image_id`` and output file stem of the input file ``image`` in ``out_dir``.

    ``out_dir/images.json`` lists ``{"id", "path", "stem"}`` for every input written there, keyed
    by the input's resolved path: the same file gets the same id and files in every run into that
    folder, and another file is never given a taken id or stem (``a/x.jpg`` and ``b/x.jpg`` become
    ``x_*`` and ``x_2_*``), so results are added to ``panoptic.json``/``instances.json``, never
    replaced by another image's. New files take the next free id, from 0: the inputs of a first
    run into an empty folder are numbered 0, 1, ... in command-line order.
    """
    out, path = Path(out_dir), str(Path(image).resolve())
    manifest = out / IMAGES_JSON
    images = json.loads(manifest.read_text())["images"] if manifest.exists() else []
    for im in images:
        if im["path"] == path:
            return im["id"], im["stem"]
    taken_ids = {im["id"] for im in images} | _ids_in(out / "panoptic.json", out / "instances.json")
    image_id = max(taken_ids, default=-1) + 1  # 0, 1, ...: a first run numbers as COCO-style lists
    stems, stem, n = {im["stem"] for im in images}, Path(image).stem, 1
    while (stem if n == 1 else f"{stem}_{n}") in stems:
        n += 1
    stem = stem if n == 1 else f"{stem}_{n}"
    images.append({"id": image_id, "path": path, "stem": stem})
    atomic_write_text(manifest, json.dumps({"images": images}, indent=1))
    return image_id, stem


def _ids_in(*paths: Path) -> set[int]:
    """The ``image_id`` values already in result files (written before ``images.json`` existed)."""
    ids: set[int] = set()
    for p in paths:
        if p.exists():
            data = json.loads(p.read_text())
            entries = data["annotations"] if isinstance(data, dict) else data
            ids |= {e["image_id"] for e in entries if isinstance(e.get("image_id"), int)}
    return ids


def _merge_json(path: Path, entries: list[dict], *, categories: list[dict] | None = None) -> Path:
    """Add ``entries`` to the json at ``path`` (replacing earlier ones of the same ``image_id``)."""
    new_ids = {e["image_id"] for e in entries}
    if categories is None:  # a COCO results list
        old = json.loads(path.read_text()) if path.exists() else []
        data: Any = [e for e in old if e["image_id"] not in new_ids] + entries
    else:  # a COCO panoptic file
        old = json.loads(path.read_text()) if path.exists() else {"annotations": []}
        annotations = [a for a in old["annotations"] if a["image_id"] not in new_ids] + entries
        data = {"annotations": annotations, "categories": categories}
    atomic_write_text(path, json.dumps(data))
    return path
