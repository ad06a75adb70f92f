"""Atomic file writes shared by every writer in facems (checkpoints, configs, .bin files, meta files)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

__all__ = ["atomic_write", "fsync_dir", "temp_path", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def temp_path(path: PathLike) -> Path:
    """The temporary name used while ``path`` is written: ``.{name}.tmp-<pid>`` in the same folder."""
    target = Path(path)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success flush, fsync and rename it onto ``path``.

    ``path`` holds either its old content or all of the new: on any exception inside the block (or
    while syncing or renaming) the temporary file is removed and ``path`` is untouched. The folder is
    fsynced after the rename so that it survives a power cut. The folder must exist.
    """
    target = Path(path)
    tmp = temp_path(target)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def write_json(path: PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically, creating the folder if needed."""
    import json

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
