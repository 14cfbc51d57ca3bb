"""Reading weight files without running their code: ``read_state_dict(path)``.

A pickle names the functions that rebuild its objects, and unpickling calls them: a ``.pkl``
can run anything (``os.system``). ``SafeUnpickler`` admits the few functions that weight files
need and refuses every other, naming it. Two kinds of ``.pkl`` exist:

- detectron2's model zoo (``R-50.pkl``, ``model_final_*.pkl``): numpy arrays, written by
  ``pickle.dump`` at protocol 2 (``numpy.core.multiarray._reconstruct``) or, by newer numpy at
  protocol 5, as raw buffers (``numpy._core.numeric._frombuffer``);
- the official ``tools/convert-pretrained-swin-model-to-d2.py``: ``pickle.dump`` of the Swin
  release's torch tensors, each ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  ...)`` over a storage that ``torch.storage._load_from_bytes`` reads from a small
  ``torch.save`` stream. That stream is read here by ``torch.load(weights_only=True)``, and the
  tensor is rebuilt only from such a storage, without backward hooks: nothing beyond what
  ``torch.load(weights_only=True)`` itself allows.

Other files: ``.safetensors`` (no code at all), and ``.pth``/``.pt``/``.bin`` through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_NUMPY_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"


def _load_storage(data: bytes) -> torch.storage.TypedStorage:
    """``torch.storage._load_from_bytes``, safely: the bytes are a ``torch.save`` stream of one storage."""
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message is many lines; one says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "unsupported" in line.lower()), lines[0])
        raise pickle.UnpicklingError(
            f"refusing a pickled tensor storage: torch.load(weights_only=True) refused it ({why})"
        ) from e
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(
            f"refusing a pickled tensor storage that holds a {type(storage).__name__}"
        )
    return storage


def _rebuild_tensor(
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v2``, for a storage read by ``_load_storage`` and no hooks."""
    if not isinstance(storage, torch.storage.TypedStorage):  # what _load_storage returns
        raise pickle.UnpicklingError(
            f"refusing to rebuild a tensor over a {type(storage).__name__} (expected a storage)"
        )
    if backward_hooks or metadata:
        raise pickle.UnpicklingError("refusing a pickled tensor with backward hooks or metadata")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, tuple(size), tuple(stride), bool(requires_grad), OrderedDict()
    )


# (module, name) -> what to call instead (None: the real one, harmless). Anything else is refused.
_ALLOWED: dict[tuple[str, str], Callable | None] = {
    ("collections", "OrderedDict"): None,
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
    ("numpy.core.multiarray", "_reconstruct"): None,  # numpy 1 spelling (protocol 2)
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,  # numpy 2 spelling
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy.core.numeric", "_frombuffer"): None,  # protocol 5: an array from its raw buffer
    ("numpy._core.numeric", "_frombuffer"): None,
    ("_codecs", "encode"): None,  # protocol-2 pickles written by Python 3 store bytes through it
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numpy arrays and torch tensors only: every global outside
    ``_ALLOWED`` is refused, and the torch ones are replaced by the checked versions above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays and tensors are allowed"
            )
        if (replacement := _ALLOWED[(module, name)]) is not None:
            return replacement
        module = re.sub(r"^numpy\._?core", _NUMPY_CORE, module)  # either spelling, this numpy's
        return getattr(importlib.import_module(module), name)


def _one_line(e: BaseException) -> str:
    """An exception as one line. ``torch.load``'s refusals run to a dozen lines of advice, among
    them to set ``weights_only=False``, which would run the file's code: keep the reason only."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and text.startswith("refusing"):
        return text  # SafeUnpickler's own message
    if text.startswith("Weights only load failed"):  # torch.load(weights_only=True) refused it
        advice = ("In PyTorch", "Please file", "Check the documentation", "WeightsUnpickler")
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        why = next((ln for ln in lines if not ln.startswith(advice)), "not plain weights")
        return f"refusing it: torch.load(weights_only=True) found {why.rstrip('.')!r}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first.split(". ")[0].rstrip(".")  # miniz: "failed finding central directory. This..."
    return f"not a readable weights file, truncated or corrupt ({type(e).__name__}: {first})"


def to_tensor(value: Any, key: str) -> Tensor:
    """A weight as a tensor: numpy arrays (detectron2's ``.pkl``) are copied, tensors kept."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return torch.from_numpy(np.array(value))  # a writable copy (pickled arrays are read-only)
    raise TypeError(f"weight {key!r}: expected a tensor or numpy array, got {type(value).__name__}")


class WeightsFileError(pickle.UnpicklingError, ValueError):
    """A weights file that cannot be read safely: truncated, corrupt, not a weights file, or
    holding pickled code. Its message is one line that names the file (the command line prints
    it as is); it is an ``UnpicklingError`` for callers that catch those."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local file: ``.safetensors``, ``.pkl`` (numpy arrays or torch tensors,
    read with :class:`SafeUnpickler`) or anything ``torch.load(weights_only=True)`` reads. A
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is removed. A file that none of these
    reads raises :class:`WeightsFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        elif path.suffix == ".pkl":
            with path.open("rb") as f:
                obj = SafeUnpickler(f, encoding="latin1").load()
        else:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": the error says more
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, flipped, hostile: torch's own messages are many lines
        raise WeightsFileError(f"{path}: {_one_line(e)}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    return {k: to_tensor(v, k) for k, v in obj.items()}
