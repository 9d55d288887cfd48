"""The 2015 Inception graph of the ADM evaluator (`classify_image_graph_def.pb`), ported to PyTorch.

Module tree of torchvision's Inception3 with pytorch-fid's TensorFlow patches, so that the converted
weights `pt_inception-2015-12-05-6726825d.pth` load strictly. One pass gives the three tensors the
evaluator reads: `pool_3` (2048), `mixed_6/conv` channels 0-6 in (h, w, c) order (2023, for sFID)
and the bias-free 1008 logits (Inception Score). Also: the graph's TF1 bilinear resize; weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adm.evaluation.weights import (  # noqa: F401  (WeightsError, cache_dir: the older API)
    INCEPTION,
    WeightsError,
    cache_dir,
    resolve,
    sha256_file,
)

WEIGHTS_FILENAME, WEIGHTS_NAMES = INCEPTION.names[0], INCEPTION.names
WEIGHTS_URL, WEIGHTS_SHA256 = INCEPTION.url, INCEPTION.sha256
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]


class InceptionFeatures(NamedTuple):
    pool: Tensor  # [N, 2048]  pool_3
    spatial: Tensor  # [N, 2023]  mixed_6/conv[..., :7] flattened in (h, w, c) order
    logits: Tensor  # [N, 1008]  pool_3 @ softmax/weights, no bias


# --------------------------------------------------------------------------- preprocessing


def tf1_resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow-1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`.

    x: [N, C, H, W] float -> [N, C, *size]. Source coordinate = index * (in / out) in float32,
    neighbours floor / min(ceil, in - 1), lerp along x then y. `F.interpolate` does not match it.
    """

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        low = torch.floor(src)
        high = torch.clamp(torch.ceil(src), max=n_in - 1)
        return low.long().to(x.device), high.long().to(x.device), (src - low).to(x)

    y0, y1, wy = axis(x.shape[2], size[0])
    x0, x1, wx = axis(x.shape[3], size[1])
    top, bottom = x.index_select(2, y0), x.index_select(2, y1)
    top = top.index_select(3, x0) + (top.index_select(3, x1) - top.index_select(3, x0)) * wx
    bottom = (
        bottom.index_select(3, x0) + (bottom.index_select(3, x1) - bottom.index_select(3, x0)) * wx
    )
    return top + (bottom - top) * wy[:, None]


def spatial_features(mixed_6_conv: Tensor) -> Tensor:
    """sFID features from the PyTorch-layout `mixed_6/conv` output (`Mixed_6d.branch1x1`).

    [N, 192, 17, 17] -> channels 0..6 -> NHWC -> [N, 17*17*7 = 2023]; index (17h + w)*7 + c.
    """
    x = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """`<unit>/conv2d_params` -> `<unit>/batchnorm` (eps 0.001) -> ReLU, as one graph unit."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # TensorFlow's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """`mixed`, `mixed_1`, `mixed_2` (torchvision Mixed_5b/5c/5d), 35x35."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """`mixed_3` (Mixed_6a): grid reduction 35 -> 17."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """`mixed_4` .. `mixed_7` (Mixed_6b..6e), 17x17 with factorised 7x7 convolutions."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)  # `<block>/conv`; of mixed_6 -> sFID
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward_with_conv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Block output [N, 768, 17, 17] and its first 1x1 branch [N, 192, 17, 17]."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for unit in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = unit(bd)
        bd = self.branch7x7dbl_5(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1), b1

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_conv(x)[0]


class InceptionD(nn.Module):
    """`mixed_8` (Mixed_7a): grid reduction 17 -> 8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for unit in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = unit(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """`mixed_9` (Mixed_7b, average-pool branch) and `mixed_10` (Mixed_7c, max-pool branch:
    a quirk of this graph), 8x8."""

    def __init__(self, c_in: int, pool: Literal["avg", "max"]):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The evaluator's Inception graph: uint8 NHWC images of any size -> `InceptionFeatures`."""

    # Network and preprocessing, part of every feature-cache key (with the weights' SHA-256).
    network_id = "inception-2015-12-05|tf1-bilinear-299|(x-128)/128|float32"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # conv
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)  # conv_1
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # conv_2
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)  # conv_3
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)  # conv_4
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)  # mixed_6
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # softmax/weights, softmax/biases (bias unused)
        self.weights_id: str | None = None  # SHA-256 of the loaded file; keys feature caches
        self.channels_last = False  # set by `use_channels_last`

    def use_channels_last(self, on: bool = True) -> InceptionV3:
        """NHWC convolutions (weights and activations); same results up to float32 roundoff."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """[N, H, W, 3] uint8 (or float in 0..255) -> [N, 3, 299, 299] in [-1, 1), as the graph."""
        x = images.to(torch.float32).permute(0, 3, 1, 2)
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128) / 128  # graph: Sub 128, Mul 1/128 (a power of two: identical)

    def forward(self, images: Tensor) -> InceptionFeatures:
        x = self.preprocess(images)  # [N, 3, 299, 299]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [N, 64, 147, 147]
        x = F.max_pool2d(x, 3, stride=2)  # pool: [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [N, 192, 71, 71]
        x = F.max_pool2d(x, 3, stride=2)  # pool_1: [N, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [N, 288, 35, 35]
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # [N, 768, 17, 17]
        x, mixed_6_conv = self.Mixed_6d.forward_with_conv(x)  # [N, 192, 17, 17]
        x = self.Mixed_7a(self.Mixed_6e(x))  # [N, 1280, 8, 8]
        x = self.Mixed_7c(self.Mixed_7b(x))  # [N, 2048, 8, 8]
        pool = x.mean(dim=(2, 3))  # pool_3: [N, 2048]
        logits = pool @ self.fc.weight.T  # [N, 1008]; improved-gan IS convention: no bias
        return InceptionFeatures(pool, spatial_features(mixed_6_conv), logits)

    def load_converted(self, state_dict: dict[str, Tensor]) -> None:
        """Strict load of the converted file; its `num_batches_tracked` (if any) is ignored."""
        own = self.state_dict()
        given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        expected = {k for k in own if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(expected - given.keys()), sorted(given.keys() - expected)
        if missing or unexpected:
            raise WeightsError(
                f"not the converted 2015 Inception weights: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        for k, v in given.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise WeightsError(
                    f"weights key {k}: shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
        self.load_state_dict({**given, **counters}, strict=True)


# --------------------------------------------------------------------------- weights files


def resolve_weights(
    path: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    url: str = WEIGHTS_URL,
    sha256: str = WEIGHTS_SHA256,
    progress: bool = True,
) -> Path:
    """`path` if given; else the first of pytorch-fid's and torch-fidelity's file names found in
    `weights.search_dirs()` (SHA-256 checked); else downloaded to `<cache_dir()>/`
    (SHA-256 checked; offline, an error within seconds saying where to put the file)."""
    return resolve(INCEPTION, path, allow_download=allow_download, url=url, sha256=sha256,
                   progress=progress)  # fmt: skip


def random_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A state dict with the converted file's keys and shapes and random He-initialised values
    (activations stay O(1) through the 94 units): for tests and benchmarks without the real file."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.bias"):
            v = torch.randn(v.shape, generator=gen) * 0.1
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=gen) * 0.05
        if not k.endswith("num_batches_tracked"):
            out[k] = v
    return out


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionV3:
    """Build the network, strictly load a converted weights file, eval mode, no gradients."""
    from adm.models.checkpoint import CheckpointError, load_state_dict

    try:  # says what a wrong file is (text, HTML, pickle, ...); never unpickles code
        state_dict = load_state_dict(path)
    except CheckpointError as err:
        raise WeightsError(f"cannot read Inception weights: {err}") from None
    model = InceptionV3()
    model.load_converted(state_dict)
    model.weights_id = sha256_file(path)
    return model.eval().requires_grad_(False).to(device)
