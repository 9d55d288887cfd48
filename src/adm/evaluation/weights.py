"""Network weights files: where they are looked for, SHA-256 checks, and the one download.

Searched, in order: `$ADM_CACHE_DIR`, `~/.cache/adm`, and torch hub's checkpoints folder
(`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`, where pytorch-fid and
torch-fidelity keep theirs), under each name the tools use. Without a network, a download fails
within a few seconds (a probe of the host in a thread with a deadline), not after a DNS timeout.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from adm._util.digest import sha256_file

PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class WeightsSpec:
    """A network's weights file: names it goes by, where it comes from, its SHA-256 (if known)."""

    what: str  # "Inception", "DINOv2"
    names: tuple[str, ...]  # the first is adm's own (and where a download goes)
    url: str
    sha256: str | None
    option: str  # the command-line option that takes a path


INCEPTION = WeightsSpec(
    what="Inception",
    # pytorch-fid's name, then torch-fidelity's (the same conversion; used if its bytes are too)
    names=("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"),
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    option="--inception-weights",
)
DINOV2 = WeightsSpec(
    what="DINOv2",
    names=("dinov2_vitl14_pretrain.pth",),  # torch hub's name for facebookresearch/dinov2's file
    url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    sha256=None,  # Meta publishes none; see docs/evaluation.md ("Weights")
    option="--dinov2-weights",
)


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or not the expected network."""


def cache_dir() -> Path:
    """`$ADM_CACHE_DIR`, else `~/.cache/adm` (where downloads go)."""
    return Path(os.environ.get("ADM_CACHE_DIR") or Path.home() / ".cache" / "adm")


def hub_checkpoints_dir() -> Path:
    """torch hub's checkpoints folder, as `torch.hub.get_dir()` resolves it (without torch)."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        torch_home = Path(xdg) / "torch"
    return Path(torch_home) / "hub" / "checkpoints"


def search_dirs() -> list[Path]:
    """The folders searched for weights, in order, without repeats."""
    dirs = [cache_dir(), Path.home() / ".cache" / "adm", hub_checkpoints_dir()]
    return list(dict.fromkeys(dirs))


def find_weights(names: tuple[str, ...], sha256: str | None, option: str) -> Path | None:
    """The first file named one of `names` in `search_dirs()`. With a known `sha256`, a file
    whose SHA-256 differs is an error naming it (a partial or foreign file is never used
    silently); `option` is the command-line option that takes a path instead."""
    for folder in search_dirs():
        for name in names:
            path = folder / name
            if not path.is_file():
                continue
            if sha256 is not None and (got := sha256_file(path)) != sha256.lower():
                raise WeightsError(
                    f"{path}: SHA-256 {got}, expected {sha256}; delete the file (it is "
                    f"incomplete or another file) or pass {option} {path} to use it anyway"
                )
            return path
    return None


def check_reachable(url: str, timeout: float = PROBE_SECONDS) -> None:
    """Raise OSError unless a TCP connection to `url`'s host (or its proxy) opens within
    `timeout` s. Name resolution has no timeout of its own, hence the thread and its deadline."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" not in outcome:
        reason = outcome.get("error") or f"no answer within {timeout:g} s"
        raise OSError(f"{target.hostname}:{port} is not reachable: {reason}")


def resolve(
    spec: WeightsSpec,
    path: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """`path` if given; else the first of `spec.names` found in `search_dirs()` (SHA-256 checked
    when known); else downloaded to `<cache_dir()>/<spec.names[0]>` when `allow_download` and a
    SHA-256 is known (offline: an error within seconds saying where to put the file).
    `url` and `sha256` override the spec's (tests)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{spec.what} weights file {path} does not exist")
        return path
    sha256 = sha256 or spec.sha256
    found = find_weights(spec.names, sha256, spec.option)
    if found is not None:
        return found
    cached = cache_dir() / spec.names[0]
    hint = (
        f"download {spec.names[0]} from {spec.url} and put it at {cached} "
        f"(or set ADM_CACHE_DIR, or pass {spec.option} PATH)"
    )
    if not allow_download or sha256 is None:
        raise WeightsError(f"{spec.what} weights not found: {hint}")
    try:
        return download(url or spec.url, cached, sha256, progress=progress)
    except OSError as err:  # urllib's URLError is an OSError
        raise WeightsError(f"could not download {spec.what} weights ({err}): {hint}") from err


def download(url: str, dest: Path, sha256: str, *, progress: bool = True) -> Path:
    """Download `url` to `dest` (atomic rename) if its SHA-256 starts with `sha256`; probe the
    host first so that an offline machine fails at once."""
    from tqdm import tqdm

    check_reachable(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        got = digest.hexdigest()
        if not got.startswith(sha256.lower()):
            raise WeightsError(f"download of {url} has SHA-256 {got}, expected {sha256}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
