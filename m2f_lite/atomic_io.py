"""Files written atomically: a reader (or a crash, or ``kill -9``) sees the old file or the new one,
never half of one. Checkpoints, logs, configs, predictions and prepared datasets all go through
:func:`atomic_file`. No torch here, so the data tools stay light to import.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only once the ``with`` block has finished.

    It is written to a temporary file in the same folder, then ``os.replace``d over ``path``; on
    any error the temporary file is removed and ``path`` keeps its old content. ``durable`` adds
    the ``fsync`` of the file before the rename and of the folder after it (POSIX), so that the
    new content survives a power cut too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically. ``durable=False`` skips the ``fsync`` calls: for files
    that can be made again, such as the thousands of PNGs a dataset preparation writes."""
    with atomic_file(path, durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)
