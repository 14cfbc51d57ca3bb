"""Datasets, augmentation and data tools.

- ``synthetic``: the shapes dataset (the book's running example), written in the COCO formats;
- readers: ``coco_panoptic``, ``coco_instance``, ``ade20k``, ``cityscapes``, ``semantic``,
  ``custom`` (your COCO-format data), all built on ``base.SegmentationDataset``;
- ``transforms``: LSJ, the semantic recipe (ADE20K, Cityscapes) and the test-time resize;
- ``build``: ``build_dataset(cfg, split, train=...)`` and ``collate``; ``loader``: DataLoaders;
- ``download``, ``prepare``, ``check``: the ``m2f-lite data`` commands;
- ``files``: robust file reading and ``DatasetError``; ``meta``: ``DatasetMeta``; ``categories``:
  the class tables of COCO, ADE20K and Cityscapes.

Nothing is imported here, so ``import m2f_lite.data.synthetic`` stays light.
"""
