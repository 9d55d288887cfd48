"""The evaluator's `.npz` batches: `arr_0` uint8 NHWC images, read and written streaming.

Sample batches hold `arr_0` (and `arr_1` labels, ignored); reference batches add whole-dataset
statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial). Also image folders and globs
of image files as sources (grey, alpha and odd sizes converted, with notes).
Grey batches (`[N, H, W, 1]`, as `adm sample` writes for 1-channel models, or `[N, H, W]`) are read
as RGB with the channel replicated, as PIL converts grey image files ("L" -> "RGB").
Every check runs before any work, and files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import glob
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adm._util.npz import NpzError, npz_headers, read_npy_header

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STATS_DIMS = {"mu": 2048, "sigma": 2048, "mu_s": 2023, "sigma_s": 2023}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class BatchError(ValueError):
    """An input batch, folder or output path is not usable; the message names the file."""


@dataclass(frozen=True)
class ImageSource:
    """A validated source of uint8 [H, W, 3] images: an npz batch or a folder of image files.
    `layout` is how an npz batch stores them: `[N, H, W, 3]`, or grey `[N, H, W, 1]` or
    `[N, H, W]` (replicated to RGB when read)."""

    path: Path
    n: int
    height: int
    width: int
    files: tuple[Path, ...] = ()  # folder and glob sources only, in sorted order
    layout: str = "[N, H, W, 3]"
    notes: tuple[str, ...] = ()  # conversions applied when reading (resize, grey, alpha)

    @property
    def is_folder(self) -> bool:
        return bool(self.files)

    @property
    def is_grey(self) -> bool:
        return self.layout != "[N, H, W, 3]"


def open_npz_batch(path: str | os.PathLike) -> ImageSource:
    """Check that `path` is an npz with `arr_0` uint8 [N, H, W, 3], or grey [N, H, W, 1] or
    [N, H, W], N >= 1 (headers only)."""
    path = Path(path)
    try:
        headers = npz_headers(path)
    except NpzError as err:
        raise BatchError(str(err)) from None
    if "arr_0" not in headers:
        raise BatchError(f"{path}: no array 'arr_0' (keys: {list(headers)})")
    shape, _, dtype = headers["arr_0"]
    layouts = {4: "[N, H, W, 3]" if shape[-1:] == (3,) else "[N, H, W, 1]", 3: "[N, H, W]"}
    if dtype != np.uint8 or len(shape) not in layouts or shape[3:] not in ((), (1,), (3,)):
        raise BatchError(
            f"{path}: arr_0 must be uint8 images [N, H, W, 3] (grey: [N, H, W, 1] or "
            f"[N, H, W]), got {dtype} {list(shape)}"
        )
    if len(shape) == 3 and shape[2] in (3, 4):  # [H, W, C] of one image, not W = 3 grey ones
        raise BatchError(
            f"{path}: arr_0 {list(shape)} looks like one colour image; a batch is "
            "[N, H, W, 3] (grey: [N, H, W, 1])"
        )
    if 0 in shape:
        raise BatchError(f"{path}: arr_0 holds no images ({list(shape)})")
    return ImageSource(path, shape[0], shape[1], shape[2], layout=layouts[len(shape)])


def iter_npz_images(path: str | os.PathLike, chunk: int = 64) -> Iterator[np.ndarray]:
    """Yield `arr_0` as stored, in chunks of [<=chunk, H, W(, C)], without loading it whole."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, fortran, dtype = read_npy_header(f)
        if fortran:  # rare; the reference also falls back to a full load
            images = np.load(path)["arr_0"]
            yield from (images[s : s + chunk] for s in range(0, len(images), chunk))
            return
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            count = min(chunk, shape[0] - start)
            data = bytearray(f.read(per_image * count))  # writable, for torch.from_numpy
            if len(data) != per_image * count:
                raise BatchError(f"{path}: arr_0 is truncated at image {start}")
            yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])


def read_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """`{"mu", "sigma", "mu_s", "sigma_s"}` (float64) if the batch stores them, else None."""
    with np.load(path) as data:
        present = [k for k in STATS_KEYS if k in data.files]
        if not present:
            return None
        if len(present) != len(STATS_KEYS):
            missing = sorted(set(STATS_KEYS) - set(present))
            raise BatchError(f"{path}: has {present} but not {missing}")
        stats = {k: np.asarray(data[k], dtype=np.float64) for k in STATS_KEYS}
    for k, v in stats.items():
        want = (STATS_DIMS[k],) * (1 if k.startswith("mu") else 2)
        if v.shape != want:
            raise BatchError(f"{path}: {k} has shape {list(v.shape)}, expected {list(want)}")
    return stats


def open_image_folder(path: str | os.PathLike) -> ImageSource:
    """A folder of image files, searched recursively (headers only)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BatchError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return open_image_files(path, files)


def open_image_glob(pattern: str) -> ImageSource:
    """The image files a glob pattern matches (`**` recursive), e.g. `'samples/*.png'`."""
    hits = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [p for p in hits if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        extra = f" ({len(hits)} other files)" if hits else ""
        raise BatchError(
            f"{pattern}: the pattern matches no image files ({', '.join(IMAGE_SUFFIXES)}){extra}"
        )
    return open_image_files(Path(pattern), files)


def open_image_files(label: Path, files: list[Path]) -> ImageSource:
    """Check image files (headers only). All are read as RGB at the first file's size: others are
    resized to it (bicubic), grey ones get the channel replicated, alpha is dropped; each of
    these is reported in `notes`."""
    from PIL import Image

    sizes, modes = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
                modes.append(im.mode)
        except OSError as err:
            raise BatchError(f"{p}: not a readable image ({err})") from err
    size = sizes[0]
    notes = []
    if other := sum(s != size for s in sizes):
        notes.append(
            f"{label}: {other} of {len(files)} images differ from {size[0]}x{size[1]} (the size "
            f"of {files[0].name}); resized to it (PIL bicubic)"
        )
    if grey := sum(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes):
        notes.append(f"{label}: {grey} grey images; the channel is replicated to RGB")
    if alpha := sum(m in ("RGBA", "LA", "PA", "RGBa") for m in modes):
        notes.append(f"{label}: {alpha} images with an alpha channel; alpha is dropped (RGB)")
    return ImageSource(label, len(files), size[1], size[0], tuple(files), notes=tuple(notes))


def open_source(path: str | os.PathLike) -> ImageSource:
    """An npz batch, an image folder, or a glob pattern of image files."""
    text = str(path)
    path = Path(path)
    if path.is_dir():
        return open_image_folder(path)
    if not path.exists() and any(c in text for c in "*?["):
        return open_image_glob(text)
    return open_npz_batch(path)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] from [n, H, W, 3], or grey [n, H, W, 1] or [n, H, W] (the channel
    replicated, as PIL's "L" -> "RGB" conversion and Inception's three input channels expect)."""
    if images.ndim == 3:
        images = images[..., None]
    return images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)


def read_image(path: Path, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: RGB (16-bit and float grey scaled, `adm.data.images`), resized
    (bicubic) if its size differs."""
    from PIL import Image

    from adm.data.images import to_8bit

    with Image.open(path) as im:
        im = to_8bit(im, 3)
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def iter_images(source: ImageSource, chunk: int = 64) -> Iterator[np.ndarray]:
    """Yield uint8 [<=chunk, H, W, 3] chunks of an npz batch or image files, in order
    (grey batches with the channel replicated)."""
    if not source.is_folder:
        yield from (to_rgb(c) for c in iter_npz_images(source.path, chunk))
        return
    for start in range(0, source.n, chunk):
        files = source.files[start : start + chunk]
        yield np.stack([read_image(p, source.width, source.height) for p in files])


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early if `path` cannot be written (missing folder, or a folder itself)."""
    path = Path(path)
    if path.is_dir():
        raise BatchError(f"{path}: is a folder, expected a file name")
    if not path.parent.is_dir():
        raise BatchError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BatchError(f"{path}: folder {path.parent} is not writable")
    return path


class NpzWriter:
    """Writes an npz member by member; `arr_0` may be streamed in chunks (zip64, uncompressed)."""

    def __init__(self, path: Path):
        self._zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def write_array(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    @contextlib.contextmanager
    def stream(self, name: str, shape: tuple[int, ...], dtype=np.uint8) -> Iterator:
        """Yields `write(chunk)`; the chunks must add up to `shape` exactly."""
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(shape),
        }
        written = [0]
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)

            def write(chunk: np.ndarray) -> None:
                f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                written[0] += len(chunk)

            yield write
        if written[0] != shape[0]:
            raise RuntimeError(f"{name}: wrote {written[0]} rows, header says {shape[0]}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
