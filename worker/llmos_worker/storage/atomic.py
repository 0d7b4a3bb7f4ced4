"""Atomic file replacement: a file appears under its final name complete or not at all.

Bytes go to a temporary file in the destination directory (same filesystem, so the final
`rename` is atomic), which is fsynced, renamed over the final name, and the directory fsynced so
the rename itself survives a crash. On any exception the temporary file is removed: a failed
download or a digest mismatch leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: str | Path) -> None:
    """Persist a directory entry change (a rename or unlink) in `directory`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` atomically when the block exits cleanly."""
    final = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # why: mkstemp creates 0600; the worker pod may run as another uid
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


__all__ = ["atomic_writer", "fsync_dir", "write_bytes_atomic"]
