"""Reading `.npz` files that users hand in: every member's `.npy` header is read and checked
before any array is loaded.

`np.load` allocates the whole array a header claims before it reads a byte, so a damaged or
forged header (a shape claiming terabytes) ends in a MemoryError traceback, and a truncated
member in a ValueError deep inside numpy. Here both are one sentence naming the file and the key.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

Header = tuple[tuple[int, ...], bool, np.dtype]  # shape, Fortran order, dtype


class NpzError(ValueError):
    """An `.npz` file is unreadable or claims more than it holds; the message names the file."""


def read_npy_header(f: BinaryIO) -> Header:
    """(shape, fortran_order, dtype) of the `.npy` stream `f`, positioned at its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**20 else f"{n} bytes"


def npz_headers(path: str | os.PathLike) -> dict[str, Header]:
    """The header of every array in `path`, each checked: no Python objects, and a claimed size
    that the member holds and that fits in this machine's memory. Raises `NpzError`."""
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path}: no such file")
    out: dict[str, Header] = {}
    memory = _memory_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    try:
                        shape, fortran, dtype = read_npy_header(f)
                    except (ValueError, EOFError) as err:
                        raise NpzError(f"{path}: {key} has a broken .npy header ({err})") from None
                    offset = f.tell()
                if dtype.hasobject:
                    raise NpzError(f"{path}: {key} holds Python objects, not numbers")
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                held = info.file_size - offset
                if claimed > held:
                    raise NpzError(
                        f"{path}: {key} claims shape {list(shape)} of {dtype} ({_gib(claimed)}) "
                        f"but holds only {_gib(max(held, 0))}: the file is damaged or truncated"
                    )
                if memory is not None and claimed > memory:
                    raise NpzError(
                        f"{path}: {key} of shape {list(shape)} needs {_gib(claimed)}, more than "
                        f"this machine's {_gib(memory)} of memory"
                    )
                out[key] = (tuple(shape), fortran, dtype)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise NpzError(f"{path}: not a readable .npz file ({err})") from None
    return out


def load_npz(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays `keys` (all when None; absent keys are skipped) of `path`, after
    `npz_headers` has checked every claim. Raises `NpzError`."""
    headers = npz_headers(path)
    wanted = list(headers) if keys is None else [k for k in keys if k in headers]
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in wanted}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise NpzError(f"{path}: not a readable .npz file ({err})") from None
