"""One process per run folder: an exclusive OS lock on `FOLDER/.adm.lock`.

Two `adm sample` (or `adm train`, ...) runs writing into one folder mix their batches, logs and
settings while both exit 0. Every command that writes a run folder therefore holds
`run_folder_lock` for as long as it works there. The lock is `flock(2)` on an open file: the
kernel drops it when the process ends in any way (exit, exception, SIGKILL), so no stale lock
survives a crash and no lock ever needs breaking by hand. The file itself stays (removing a lock
file that another process may be opening would let two of them hold "the" lock); it records the
holder's PID and command, which the refusal names.

A second process is refused at once, not queued: a rerun with `--resume` and identical settings
would find nothing left to do only after the first finished, so waiting silently would hide a
mistake more often than it helps. Under torchrun only rank 0 takes the lock (the ranks of one job
share the folder by design).

Taking the lock also removes this folder's stale temporary files (`.NAME.XXXX.tmp`, left by an
atomic write that a kill interrupted): with the lock held, no other adm process can be writing
them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".adm.lock"


class FolderBusyError(ValueError):
    """Another live process holds the run folder's lock."""


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the exclusive lock of run folder `folder` (created if missing) for the block.

    Raises `FolderBusyError` naming the holder's PID and command if another process holds it,
    `OSError` if the folder cannot be made. If this call created the folder and the block left
    nothing in it but the lock file (e.g. the command stopped on a bad option), the folder is
    removed again, so a refused command leaves no trace."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(fd)
            raise FolderBusyError(
                f"run folder {folder} is in use by another process ({holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
        remove_stale_temp_files(folder)
        yield folder
    finally:
        os.close(fd)  # releases the lock
        if created:
            _remove_if_only_lock(folder)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (`.NAME.XXXX.tmp`) anywhere in
    `folder`; only call it while holding the folder's lock. Returns what was removed."""
    removed = []
    for path in folder.rglob(".*.tmp"):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "PID unknown"


def _remove_if_only_lock(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
