"""Any image Pillow reads -> 8-bit grey or RGB, scaling (not clipping) deeper pixel formats.

Pillow's own `convert("L")` clips 16-bit images to 255, so a 16-bit PNG turns almost white (69%
of its pixels were pure white in the issue that found it). `to_8bit` scales instead:

| mode | read as | to 8 bits |
| --- | --- | --- |
| `1`, `L`, `P`, `RGB` | 1-bit, 8-bit, palette, 8-bit colour | as Pillow converts |
| `LA`, `RGBA`, `PA` | with alpha | alpha dropped (not composited) |
| `I;16`, `I;16B`, `I;16L`, `I;16N` | 16-bit grey (16-bit PNG, TIFF) | value / 257, rounded |
| `I` | 32-bit integer grey, taken as 16-bit data (as 16-bit TIFFs decode) | value / 257, clipped |
| `F` | 32-bit float grey, on Pillow's 0..255 scale | rounded, clipped to 0..255 |
| other (`CMYK`, `YCbCr`, `LAB`, `HSV`) | | as Pillow converts to RGB |
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """`image` as mode "L" (`channels` 1) or "RGB" (`channels` 3), 16-bit and float grey scaled
    to 0..255 (see the module table)."""
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey if channels == 1 else grey.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency: Pillow warns on a direct convert
    return image.convert("L" if channels == 1 else "RGB")
