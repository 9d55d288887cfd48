"""Fashion-MNIST (Xiao et al. 2017; MIT licence), the demo's dataset: find it, or download it.

Search order: an explicit folder, `$ADM_DATA_DIR`, the user cache folder (`$ADM_CACHE_DIR` or
~/.cache/adm/fashion-mnist), then `/usr/share/datasets/fashion-mnist` (Debian/Ubuntu package
`dataset-fashion-mnist`). If none holds the four IDX files, they are downloaded from the dataset's
official location into the cache folder, with a progress bar and a SHA-256 check of the decoded
contents (the Debian package recompresses the files, so the gzip bytes differ, the data does not).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from adm._util.atomic import atomic_path
from adm.data.datasets import DataError, read_idx

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# SHA-256 of the decompressed IDX files.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def cache_folder() -> Path:
    root = os.environ.get("ADM_CACHE_DIR") or Path.home() / ".cache" / "adm"
    return Path(root) / "fashion-mnist"


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_file(folder, stem) is not None for stem in FILES)


def find(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (see the module docstring)."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not _complete(folder):
            missing = [s for s in FILES if _file(folder, s) is None]
            raise DataError(f"--data {folder}: missing Fashion-MNIST files {', '.join(missing)}")
        return folder
    candidates = [Path(os.environ["ADM_DATA_DIR"])] if os.environ.get("ADM_DATA_DIR") else []
    candidates += [cache_folder(), SYSTEM_DIR]
    for folder in candidates:
        if _complete(folder):
            return folder
    if not download:
        raise DataError(_remedies(candidates))
    return fetch(cache_folder(), candidates)


def fetch(folder: Path, searched: list[Path] | None = None, url: str | None = None) -> Path:
    """Download the four files into `folder` (checked, atomic); offline -> one clear message."""
    from tqdm.auto import tqdm

    url = url or OFFICIAL_URL
    folder.mkdir(parents=True, exist_ok=True)
    for stem, digest in FILES.items():
        target = folder / (stem + ".gz")
        if target.is_file():
            continue
        try:
            with atomic_path(target) as tmp:  # nothing is left behind if this fails
                with (
                    urllib.request.urlopen(url + stem + ".gz", timeout=30) as response,
                    open(tmp, "wb") as out,
                    tqdm(
                        total=int(response.headers.get("Content-Length") or 0) or None,
                        unit="B", unit_scale=True, desc=stem, leave=False,
                    ) as bar,
                ):  # fmt: skip
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
                got = hashlib.sha256(gzip.decompress(tmp.read_bytes())).hexdigest()
                if got != digest:
                    raise DataError(
                        f"downloaded {stem}.gz has the wrong contents (sha256 {got[:12]}…)"
                    )
        except (urllib.error.URLError, OSError) as err:
            raise DataError(f"{_remedies(searched or [folder])} (download failed: {err})") from None
    return folder


def _remedies(searched: list[Path]) -> str:
    where = ", ".join(str(p) for p in searched)
    return (
        f"Fashion-MNIST not found (looked in {where}) and it could not be downloaded. Either "
        "install the Debian/Ubuntu package (sudo apt-get install dataset-fashion-mnist) or put "
        f"the four files {', '.join(s + '.gz' for s in FILES)} from {OFFICIAL_URL} into "
        f"{cache_folder()} (or any folder given with --data / $ADM_DATA_DIR)"
    )


def load(folder: Path, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" or "t10k" split."""
    images = read_idx(_file(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_file(folder, f"{split}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{folder}: unexpected Fashion-MNIST {split} shapes {images.shape}")
    return images, labels
