"""Errors shown to users as one line: bad input, named with the file, key or flag at fault."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line, exit status 2."""


_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
}


def os_error_text(err: OSError) -> str:
    """An `OSError` as a sentence: "/data/x: permission denied" instead of
    "[Errno 13] Permission denied: '/data/x'" (other exceptions: their own text)."""
    if not isinstance(err, OSError) or err.errno is None:
        return str(err)
    reason = _REASONS.get(err.errno) or (err.strerror or str(err)).lower()
    where = err.filename2 or err.filename  # a rename's target, else the one file named
    return f"{where}: {reason}" if where else reason
