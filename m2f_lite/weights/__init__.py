"""Weights made elsewhere: the official detectron2 checkpoints, HF transformers, ImageNet backbones.

- ``unpickler``: reading weight files safely (``.pkl`` without running code, ``.pth``/``.pt`` with
  ``torch.load(weights_only=True)``, ``.safetensors``): ``read_state_dict``;
- ``keys``: the key templates both converters use (``rename_key``), ``ConversionReport``,
  ``ConversionError``, ``check_state_dict``;
- ``backbone``: backbone names (detectron2/official, HF, timm) onto our ``Backbone``, and
  ``load_pretrained_backbone``;
- ``detectron2``: the official Mask2Former checkpoints, both ways (``convert_detectron2``,
  ``to_detectron2``, ``load_official``);
- ``transformers``: HF's ``Mask2FormerForUniversalSegmentation`` → an m2f_lite model;
- ``convert``: the ``m2f-lite convert`` command (``convert_main``);
- ``model_zoo``: the official checkpoints as data, ``download_weights`` (``m2f-lite weights``).

Data flows one way: the model (``m2f_lite.modeling``) never imports this package, and nothing is
imported here, so each module costs only what it uses.
"""
