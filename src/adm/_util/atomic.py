"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file adm writes (checkpoints, training state, sample batches, feature caches, reports) goes
through `atomic_path`: write to a temporary file in the same folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `dest`, renamed onto it only if the block succeeds (the file
    gets the permissions of a normal new file, not mkstemp's 0600)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary file, then put it in place atomically."""
    with atomic_path(dest) as tmp:
        write(tmp)
