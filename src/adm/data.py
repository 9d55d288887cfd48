"""Image preprocessing of the paper's training pipeline (guided-diffusion `image_datasets.py`).

Centre crop (repeated 2× box downsampling, one bicubic resize, centred crop), the random crop used
for classifier training, the random flip, and the conversion to float CHW in [-1, 1].
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
