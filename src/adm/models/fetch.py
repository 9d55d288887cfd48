"""Downloading the released checkpoints: resumable (HTTP Range), length-checked, verified against
the preset's keys and shapes, and renamed into the cache atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

from adm.models.checkpoint import (
    CheckpointError,
    bundled_path,
    default_cache_dir,
    short_reason,
    verify_file,
)
from adm.models.presets import get_preset

__all__ = ["fetch"]

_CHUNK = 1 << 20


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download a released checkpoint into the cache folder and return its path.

    Resumes a partial `NAME.pt.part` with an HTTP Range request, checks the length, checks that
    the file loads as a state dict with the preset's keys and shapes, then renames it atomically to
    `NAME.pt`. An existing verified file is returned at once, and so is the file of a name whose
    weights are bundled with the package (nothing to download).
    """
    preset = get_preset(name)
    bundled = bundled_path(preset.name)
    if bundled is not None and url is None:
        return bundled
    url = url or preset.url
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = folder / f"{preset.name}.pt"
    if dest.is_file():
        try:
            verify_file(dest, preset)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete {dest} and fetch it again") from None
        return dest
    if url is None:
        raise CheckpointError(
            f"{preset.name} has no released weights to download (a tiny preset for tests)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(url, part, dest, preset.name, progress=progress, timeout=timeout)
    try:
        verify_file(part, preset)
    except CheckpointError as err:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"the file downloaded from {url} is not {preset.name} and was deleted: {err}"
        ) from None
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _download(
    url: str, part: Path, dest: Path, label: str, *, progress: bool, timeout: float
) -> None:
    """Download `url` into `part`, resuming from its current size when the server allows."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "adm", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to fetch, or a stale partial file
            total = _total_from_range(err.headers.get("Content-Range"))
            if total == offset:
                return
            part.unlink()
            return _download(url, part, dest, label, progress=progress, timeout=timeout)
        raise CheckpointError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CheckpointError(
            f"cannot download {url} ({reason}). On a machine without internet access, download "
            f"that URL elsewhere and put the file at {dest} (the cache folder is $ADM_CACHE_DIR "
            "or ~/.cache/adm; `adm fetch --cache-dir` picks another)"
        ) from None
    with response:
        if response.status == 206:
            total = _total_from_range(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # a full response (no range support, or a fresh download)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=not progress,
        )  # fmt: skip
        try:
            with bar, open(part, mode) as f:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise CheckpointError(
                f"download of {url} interrupted after {part.stat().st_size:,} bytes "
                f"({short_reason(err)}); run the same command again to resume from {part}"
            ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise CheckpointError(
            f"download of {url} incomplete: {size:,} of {total:,} bytes; run the same command "
            f"again to resume from {part}"
        )


def _total_from_range(content_range: str | None) -> int | None:
    """Total size from a `Content-Range: bytes a-b/total` header."""
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None
