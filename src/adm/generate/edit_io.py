"""Inputs and pictures of editing runs: images and masks read from an .npz or a folder of image
files, checked against each other and the model, and the input | mask | output grid.

Images: an .npz whose `arr_0` is uint8 [N, H, W, C] (or [N, H, W] grey, as Fashion-MNIST), with
optional labels in `arr_1`, or a folder of PNG/JPEG/BMP files read in name order. Masks: the same
forms with ONE channel, white where the image is kept: grey levels (uint8) >= 128 keep a pixel,
below 128 regenerate it; bool masks are taken as they are, float masks keep values >= 0.5.
One mask applies to every image, or there is one per image.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adm._util.npz import NpzError, load_npz
from adm.data.images import SIXTEEN_BIT, to_8bit
from adm.generate.sample import save_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MASK_THRESHOLD = 128  # grey level from which a mask pixel means "keep"


def read_images(path: str | Path, flag: str = "--images") -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images [N, H, W, C], labels [N] or None) from an .npz or a folder of images;
    a ValueError naming `flag` and the file otherwise."""
    images, labels = _read(Path(path), flag, grey=False)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"{flag} {path}: expected uint8 images [N, H, W, C] or [N, H, W], got "
            f"{images.dtype} {list(images.shape)}"
        )
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise ValueError(f"{flag} {path}: arr_1 must hold one label per image")
    return images, labels


def read_masks(path: str | Path, flag: str = "--masks") -> np.ndarray:
    """Boolean masks [M, H, W] (True: keep) from an .npz or a folder; one channel only."""
    raw, _ = _read(Path(path), flag, grey=True)
    if raw.ndim == 4:
        if raw.shape[3] != 1:
            raise ValueError(
                f"{flag} {path}: a mask has one channel (grey, white = keep), these have "
                f"{raw.shape[3]}"
            )
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3 or raw.size == 0:
        raise ValueError(f"{flag} {path}: expected masks [N, H, W], got {list(raw.shape)}")
    if raw.dtype == np.bool_:
        return raw.copy()
    if raw.dtype == np.uint8:
        if raw.max() == 1:
            raise ValueError(
                f"{flag} {path}: uint8 masks are grey levels (>= {MASK_THRESHOLD} keeps a "
                "pixel) but these hold only 0 and 1: use 0/255, or a bool array"
            )
        return raw >= MASK_THRESHOLD
    if np.issubdtype(raw.dtype, np.floating):
        return raw >= 0.5
    raise ValueError(f"{flag} {path}: masks must be uint8 grey levels, bool or float")


def check_inputs(images: np.ndarray, masks: np.ndarray | None, size: int, channels: int) -> None:
    """Images at the model's resolution and channels; masks of the images' size, 1 or N of them."""
    n, h, w, c = images.shape
    if (h, w) != (size, size) or c != channels:
        raise ValueError(
            f"--images: images are {h}x{w}x{c}, but the model works on {size}x{size}x{channels}"
        )
    if masks is None:
        return
    if masks.shape[1:] != (h, w):
        raise ValueError(
            f"--masks: masks are {masks.shape[1]}x{masks.shape[2]}, the images {h}x{w}"
        )
    if len(masks) not in (1, n):
        raise ValueError(f"--masks: {len(masks)} masks for {n} images (give 1 or {n})")


def edit_grid(
    inputs: np.ndarray, outputs: np.ndarray, masks: np.ndarray | None, path: Path, limit: int = 64
) -> None:
    """A PNG of input | mask | output (input | output without masks) for the first `limit`
    images, several triples per row."""
    n = min(len(inputs), limit)
    panels = [inputs[:n]]
    if masks is not None:
        m = np.broadcast_to(masks, (len(inputs), *masks.shape[1:]))[:n]
        grey = np.where(m, 255, 0).astype(np.uint8)[..., None]
        panels.append(np.broadcast_to(grey, inputs[:n].shape))
    panels.append(outputs[:n])
    per_row = max(1, round(math.sqrt(n / len(panels))))
    tiles = np.stack(panels, axis=1).reshape(-1, *inputs.shape[1:])  # [n·k, H, W, C]
    save_grid(tiles, path, columns=per_row * len(panels))


def _read(path: Path, flag: str, *, grey: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if path.is_dir():
        return _read_folder(path, flag, grey=grey), None
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file or folder")
    if not zipfile.is_zipfile(path):  # a damaged .npz, or e.g. a single .npy or an image file
        if path.suffix.lower() == ".npz":
            raise ValueError(f"{flag} {path}: not a readable .npz")
        raise ValueError(f"{flag} {path}: expected an .npz (arr_0) or a folder of images")
    try:
        data = load_npz(path, ("arr_0", "arr_1"))
    except NpzError as err:
        raise ValueError(f"{flag} {err}") from None
    if "arr_0" not in data:
        raise ValueError(f"{flag} {path}: no arr_0 in the .npz")
    labels = data["arr_1"].astype(np.int64) if "arr_1" in data else None
    return data["arr_0"], labels


def _read_folder(folder: Path, flag: str, *, grey: bool) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{flag} {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in the folder")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                if (grey and im.mode == "1") or im.mode in SIXTEEN_BIT or im.mode == "F":
                    im = to_8bit(im, 1)  # scaled, not clipped (adm.data.images)
                if im.mode not in ("L", "RGB", "LA", "RGBA"):
                    im = im.convert("RGBA" if "A" in im.mode else "RGB")
                arrays.append(np.asarray(im))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{flag} {f}: not a readable image ({err})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{flag} {folder}: the images differ in size or channels: {shapes}")
    return np.stack(arrays)
