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

TMP_SUFFIX = ".tmp"  # the temporary file of ``name`` is ``.name.<random>.tmp``, beside it


def _umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_file` left in ``folder`` when its process was
    killed (``kill -9``, a power cut) between creating and renaming one; returns them.

    Only call this where no other process may be writing into ``folder`` at the same time (the
    training loop calls it on its locked ``output_dir``).
    """
    stale = sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only once the ``with`` block has finished.

    It is written to a temporary file in the same folder, then ``os.replace``d over ``path``; on
    any error the temporary file is removed and ``path`` keeps its old content. The new file gets
    the permissions a plain ``open(path, "w")`` would give it (the umask's, or the old file's).
    ``durable`` adds the ``fsync`` of the file before the rename and of the folder after it
    (POSIX), so that the new content survives a power cut too. A process killed mid-write leaves
    its temporary file behind: :func:`remove_stale_temporaries` clears them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        # mkstemp makes the file 0600; give it the mode open(path, "w") would: the old file's,
        # or 0666 less the umask (0644 with the usual umask 022)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)
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


# Checked before any work (the command line): a result is never lost at the end of a long run.


def check_output_file(path: str | None, flag: str) -> None:
    """Before any work: ``path`` (a file to write) must not be a folder, and its folder must exist."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        kind = "not a folder" if target.parent.exists() else "no such folder"
        raise ValueError(f"{flag} {path}: {target.parent}: {kind}")


def check_output_dir(path: str, flag: str) -> None:
    """Before any work: ``path`` (a folder to write into) must be a folder or not exist yet."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    for parent in target.parents:  # the first existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            break
