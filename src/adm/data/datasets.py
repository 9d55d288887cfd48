"""Training data of the paper's pipeline (guided-diffusion `image_datasets.py`), without MPI.

Centre crop (repeated 2× box downsampling, one bicubic resize, centred crop), the random crop used
for classifier training, the random flip, and the conversion to float CHW in [-1, 1]; image
folders (labels from the original's filename prefix or from sub-folders), `.npz` batches and
MNIST-style IDX files; a world-size-invariant, resumable plan of which items each rank trains on.
"""

from __future__ import annotations

import functools
import gzip
import math
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adm._util.npz import NpzError, load_npz, npz_headers
from adm.data.images import to_8bit


def _halve_while_large(image: Image.Image, target_short_side: int) -> Image.Image:
    # Repeated 2x BOX downsampling first: one big bicubic step would alias.
    while min(image.size) >= 2 * target_short_side:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    return image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """The original's centre crop: short side to `image_size`, then a centred square.
    Returns uint8 HWC [image_size, image_size, C]."""
    image = _halve_while_large(image, image_size)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(
    image: Image.Image,
    image_size: int,
    *,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: random.Random | None = None,
) -> np.ndarray:
    """The original's random crop (classifier training): the short side is resized to a size
    drawn uniformly from [size/max_frac, size/min_frac], then a random square is cut."""
    rng = rng or random.Random()
    min_side = math.ceil(image_size / max_crop_frac)
    max_side = math.ceil(image_size / min_crop_frac)
    short_side = rng.randrange(min_side, max_side + 1)
    image = _halve_while_large(image, short_side)
    scale = short_side / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def to_chw_float(arr: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1] (x / 127.5 − 1)."""
    return np.transpose(arr.astype(np.float32) / 127.5 - 1, (2, 0, 1))


def downsample_area(images: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution conditioning of the super-resolution model: area (box) averaging of
    [N, C, H, W] images to [N, C, size, size], as the original training script."""
    return F.interpolate(images, size, mode="area")


# ---- datasets: image folders, .npz batches, MNIST-style IDX files ------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
LabelRule = Literal["filename", "folder"]


class DataError(ValueError):
    """A dataset that cannot be trained on (empty, one class, unreadable file, bad layout)."""


class BadImage(NamedTuple):
    """Returned by `TrainingImages[...]` in place of an item whose file could not be decoded."""

    name: str
    reason: str


def list_image_files(root: str | Path) -> list[Path]:
    """All images under `root`, recursively, sorted (extensions as the original plus webp,
    case-insensitive)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        exts = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise DataError(f"no images ({exts}) found under {root}")
    return files


def class_name(path: Path, root: Path, rule: LabelRule) -> str:
    """The class of one file: text before the first "_" of its name (the original's ImageNet
    convention, `n01440764_10026.JPEG`), or its top-level sub-folder under `root`."""
    if rule == "filename":
        return path.name.split("_")[0]
    parts = path.relative_to(root).parts
    if len(parts) < 2:
        raise DataError(f"--labels folder: {path} is not inside a class sub-folder of {root}")
    return parts[0]


class Source(Protocol):
    """Indexed raw images: `load(i)` gives a PIL image, `name(i)` a file name for messages."""

    labels: np.ndarray | None  # int64 [N] or None
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...
    def name(self, index: int) -> str: ...


class ImageFolder:
    """Images under a folder (recursive), labelled by `rule` when `labelled`."""

    def __init__(self, root: str | Path, *, labelled: bool = False, rule: LabelRule = "filename"):
        self.root = Path(root)
        self.files = list_image_files(self.root)
        self.labels, self.class_names = None, ()
        if labelled:
            names = [class_name(p, self.root, rule) for p in self.files]
            self.class_names = tuple(sorted(set(names)))
            index = {n: i for i, n in enumerate(self.class_names)}
            self.labels = np.array([index[n] for n in names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            image.load()
            return image

    def name(self, index: int) -> str:
        return str(self.files[index])


class ArrayImages:
    """uint8 images held in memory ([N, H, W] or [N, H, W, C]) with optional labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, origin: str):
        if images.ndim not in (3, 4) or images.dtype != np.uint8 or len(images) == 0:
            raise DataError(
                f"{origin}: expected a non-empty uint8 array [N, H, W(, C)], "
                f"got {images.dtype} {list(images.shape)}"
            )
        if labels is not None and labels.shape != (len(images),):
            raise DataError(f"{origin}: {labels.shape[0]} labels for {len(images)} images")
        self.images, self.origin = images, origin
        self.labels = None if labels is None else labels.astype(np.int64)
        self.class_names = () if labels is None else tuple(str(c) for c in np.unique(labels))
        if self.labels is not None:  # compact indices, in the sorted order of the label values
            self.labels = np.searchsorted(np.unique(labels), labels).astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        arr = self.images[index]
        return Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] != 1 else arr[..., 0])

    def name(self, index: int) -> str:
        return f"{self.origin}[{index}]"


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST / Fashion-MNIST format), raw or gzip-compressed, as a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in dtypes:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{path}: header says {list(shape)} but holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_pair(path: Path, split: str) -> tuple[Path, Path | None]:
    if path.is_dir():
        found = sorted(path.glob(f"{split}-images-idx3-ubyte*"))
        if not found:
            raise DataError(f"no {split}-images-idx3-ubyte[.gz] under {path}")
        path = found[0]
    labels = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    return path, labels if labels.exists() else None


def open_source(
    path: str | Path, *, labelled: bool = False, rule: LabelRule = "filename", split: str = "train"
) -> Source:
    """A dataset by path: a folder of images, an `.npz` batch (`arr_0` uint8 NHWC, labels in
    `arr_1`), or MNIST-style IDX files (a folder holding `{split}-images-idx3-ubyte[.gz]` and
    `{split}-labels-idx1-ubyte[.gz]`, or the images file itself)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.suffix == ".npz":
        try:
            npz = load_npz(path, ("arr_0", "arr_1") if labelled else ("arr_0",))
            if "arr_0" not in npz:
                found = sorted(npz_headers(path))
                raise DataError(f"{path}: expected images in arr_0 (found {found})")
        except NpzError as err:
            raise DataError(str(err)) from None
        if labelled and "arr_1" not in npz:
            raise DataError(f"{path}: class-conditional training needs labels in arr_1")
        return ArrayImages(npz["arr_0"], npz.get("arr_1"), path.name)
    if "idx3-ubyte" in path.name or (path.is_dir() and any(path.glob("*-images-idx3-ubyte*"))):
        images, labels_path = _idx_pair(path, split)
        if labelled and labels_path is None:
            raise DataError(f"{images}: class-conditional training needs the labels-idx1 file")
        labels = read_idx(labels_path) if labelled and labels_path else None
        return ArrayImages(read_idx(images), labels, images.name)
    return ImageFolder(path, labelled=labelled, rule=rule)


class Subset:
    """The items `indices` of a source (train / held-out splits)."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.class_names = source.class_names
        self.labels = None if source.labels is None else source.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))


def split_held_out(source: Source, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """A deterministic (seeded) random split into (train, held-out) with `fraction` held out."""
    if not 0 < fraction < 1:
        raise DataError(f"held-out fraction must lie in (0, 1), got {fraction}")
    n_val = max(1, round(len(source) * fraction))
    if n_val >= len(source):
        raise DataError(f"cannot hold out {n_val} of {len(source)} items")
    order = np.random.default_rng(seed).permutation(len(source))
    return Subset(source, np.sort(order[n_val:])), Subset(source, np.sort(order[:n_val]))


def check_conditional(source: Source, what: str = "class-conditional training") -> None:
    """Labels must exist and name at least two classes."""
    if source.labels is None:
        raise DataError(f"{what} needs labels")
    if len(source.class_names) < 2:
        found = ", ".join(repr(c) for c in source.class_names)
        raise DataError(
            f"{what} needs at least 2 classes, found {len(source.class_names)} ({found}); "
            "label by sub-folder with --labels folder, or name files CLASS_xxx.png"
        )


class TrainingImages(torch.utils.data.Dataset):
    """The original's per-item pipeline over a source: RGB (or grey), centre or random crop,
    random horizontal flip, float CHW in [-1, 1]. Items are addressed by `(epoch, index)` and
    all randomness comes from `(seed, epoch, index)`, so every item is reproducible regardless
    of workers, ranks or resumption. An unreadable file gives a `BadImage` instead of raising."""

    def __init__(
        self,
        source: Source,
        image_size: int,
        *,
        random_crop: bool = False,
        random_flip: bool = True,
        channels: int = 3,
        seed: int = 0,
    ):
        self.source, self.image_size, self.channels = source, image_size, channels
        self.random_crop, self.random_flip, self.seed = random_crop, random_flip, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int] | BadImage:
        epoch, index = key
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        try:
            image = to_8bit(self.source.load(index), self.channels)
        except Exception as err:  # PIL raises many types for corrupt files
            return BadImage(self.source.name(index), f"{type(err).__name__}: {err}")
        if self.random_crop:
            arr = random_crop_arr(image, self.image_size, rng=rng)
        else:
            arr = center_crop_arr(image, self.image_size)
        if arr.ndim == 2:
            arr = arr[..., None]
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        label = -1 if self.source.labels is None else int(self.source.labels[index])
        return to_chw_float(arr), label


def collate(
    items: list[tuple[np.ndarray, int] | BadImage], *, skip_bad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack items into (x [N, C, H, W], y [N]) and the list of bad items. A bad item raises
    `DataError` naming the file, or with `skip_bad` its slot is filled with the next good item of
    the same batch (so batch shapes, and every rank's step count, stay fixed)."""
    bad = [item for item in items if isinstance(item, BadImage)]
    good = [item for item in items if not isinstance(item, BadImage)]
    if bad and not skip_bad:
        raise DataError(
            f"cannot read image {bad[0].name} ({bad[0].reason}); "
            "fix or remove it, or pass --skip-bad-images"
        )
    if not good:
        raise DataError(f"every image of a batch is unreadable, e.g. {bad[0].name}")
    filled = [good[i % len(good)] for i in range(len(items))]
    x = torch.from_numpy(np.stack([arr for arr, _ in filled]))
    y = torch.tensor([label for _, label in filled], dtype=torch.int64)
    return x, y, bad


class BatchPlan:
    """Which items each rank trains on at each step (deterministic, world-size invariant).

    The data stream is the concatenation of seeded per-epoch permutations; step s uses stream
    positions [s·B, (s+1)·B) of the global batch B, and rank r the r-th of `world_size` equal
    slices. One process with batch B therefore sees exactly the samples of N processes with
    B/N each, and resuming at step s needs nothing but s.
    """

    def __init__(self, num_items: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):  # fmt: skip
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = np.arange(self.num_items)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm = (epoch, order)
        return self._perm[1]

    def keys(self, step: int) -> list[tuple[int, int]]:
        """(epoch, item index) of this rank's share of step `step`."""
        start = step * self.global_batch + self.rank * self.local_batch
        out = []
        for pos in range(start, start + self.local_batch):
            epoch, offset = divmod(pos, self.num_items)
            out.append((epoch, int(self._order(epoch)[offset])))
        return out

    def iter_from(self, step: int) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield self.keys(step)
            step += 1


def loader(
    dataset: TrainingImages, plan: BatchPlan, *, start_step: int = 0, workers: int = 0,
    skip_bad: bool = False, pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadImage]]]:  # fmt: skip
    """Infinite (x, y, bad) batches of this rank from `start_step` on (a torch DataLoader)."""
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=plan.iter_from(start_step),
            num_workers=workers,
            collate_fn=functools.partial(collate, skip_bad=skip_bad),
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
        )
    )
