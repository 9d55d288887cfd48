"""Every pixel format Pillow reads becomes 8-bit grey or RGB by scaling (`adm.data.images`): a
16-bit PNG is not clipped to white, and training, evaluation and editing read it the same way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adm.data.images import to_8bit

RAMP16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520


def _image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image in `mode` and the 8-bit grey values it should give."""
    ramp8 = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(RAMP16), np.rint(RAMP16 / 257).astype(np.uint8)
    if mode == "I":
        return Image.fromarray(RAMP16.astype(np.int32)), np.rint(RAMP16 / 257).astype(np.uint8)
    if mode == "F":
        return Image.fromarray(ramp8.astype(np.float32) + 0.25), ramp8
    if mode == "1":
        bits = ramp8 >= 128
        return Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8)
    grey = Image.fromarray(ramp8)
    if mode == "P":
        return grey.convert("P"), ramp8
    return grey.convert(mode), ramp8


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_mode_scales_to_8_bits(mode, channels):
    image, expected = _image(mode)
    assert image.mode == mode
    out = to_8bit(image, channels)
    assert out.mode == ("L" if channels == 1 else "RGB")
    got = np.asarray(out)
    if channels == 3:
        assert (got == got[..., :1]).all()  # grey stays grey
        got = got[..., 0]
    tolerance = 1 if mode == "P" else 0  # a palette may round a grey level
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tolerance


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
        clipped = np.asarray(image.convert("L"))
        scaled = np.asarray(to_8bit(image, 1))
    assert (clipped == 255).mean() > 0.9  # what Pillow's convert does
    assert (scaled == 255).mean() < 0.05 and scaled.max() == 255 and scaled.min() == 0


def test_training_and_evaluation_read_16_bit_images_scaled(tmp_path):
    from adm.data import datasets
    from adm.evaluation.batches import read_image

    Image.fromarray(RAMP16).save(tmp_path / "deep.png")
    pixels = read_image(tmp_path / "deep.png", 8, 8)
    assert pixels.shape == (8, 8, 3) and (pixels == 255).mean() < 0.05
    data = datasets.TrainingImages(datasets.ImageFolder(tmp_path), 8, random_flip=False,
                                   channels=1)  # fmt: skip
    x, _ = data[0, 0]  # (epoch, index) -> CHW float in [-1, 1]
    assert x.shape == (1, 8, 8) and float((np.asarray(x) >= 0.99).mean()) < 0.05  # not white
