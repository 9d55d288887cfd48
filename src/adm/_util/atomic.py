"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file adm writes (checkpoints, training state, sample batches, feature caches, reports) goes
through `atomic_path`: write to a temporary file in the same folder, fsync, rename.
`check_writable_dir` tells before any work starts whether an output folder can be made.
"""

from __future__ import annotations

import contextlib
import errno
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


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    """Write `text` to `dest` atomically (JSON records, reports, logs)."""
    atomic_write(dest, lambda tmp: tmp.write_text(text))


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise `ValueError` (one sentence) unless `path` is a folder, or can be created as one, in
    which files can be written. Leaves nothing behind: the probe is a temporary folder inside the
    nearest existing ancestor, removed at once. Run it before work starts, so that hours of work
    do not end on "permission denied"."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    if not existing.is_dir():
        reason = "it is a file" if existing == path else f"{existing} is a file"
        raise ValueError(f"cannot create {what} {path}: {reason}, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".adm-write-test-", dir=existing))
    except OSError as err:
        if err.errno == errno.ENOENT:  # e.g. /proc: the folder exists but takes no new entries
            reason = f"{existing} does not accept new files or folders"
        else:
            reason = (err.strerror or type(err).__name__).lower()
        raise ValueError(f"cannot create {what} {path}: {reason}") from None
    return path
