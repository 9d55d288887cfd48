"""DINOv2 ViT-L/14 (Oquab et al. 2023) in plain PyTorch, for FD-DINOv2 (Stein et al. 2023; EDM2).

The module tree and parameter names of facebookresearch/dinov2's `DinoVisionTransformer`, so that
`dinov2_vitl14_pretrain.pth` loads strictly, and the forward of its torch hub model
`dinov2_vitl14`: patch embedding, CLS token, position embeddings (bicubically interpolated from
37x37 with the original's +0.1 offset), 24 pre-norm blocks with layer scale, final LayerNorm, CLS
token (1024-d). Preprocessing as EDM2's DINOv2 detector ("torch" resize mode), see `preprocess`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adm._util.digest import sha256_file
from adm.evaluation.weights import WeightsError

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: int = 4
    patch_size: int = 14
    img_size: int = 518  # the position table's native size: 37 x 37 patches
    input_size: int = INPUT_SIZE  # what `preprocess` resizes images to


VITL14 = ViTConfig()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, 3, H, W] -> [N, HW/p², D]


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape  # [N, T, D]
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, T, D/heads]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √(D/heads)) v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * cfg.mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """uint8 NHWC images of any size -> [N, D] CLS features (`features` takes normalized NCHW)."""

    # Network and preprocessing, part of every feature-cache key (with the weights' SHA-256).
    network_id = "dinov2-vitl14|torch-bicubic-antialias-224|imagenet-mean-std|float32"

    def __init__(self, cfg: ViTConfig = VITL14):
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))  # training only; loaded
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.weights_id: str | None = None  # SHA-256 of the loaded file; keys feature caches

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """The [1, 1 + h·w, D] position table for an input of height x width pixels: the native
        table when the grid matches, else its patch part resized bicubically (float32) with the
        original's scale factor (grid + 0.1) / 37, not a target size (dinov2 issue #8)."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        h0, w0 = height // self.cfg.patch_size, width // self.cfg.patch_size
        if h0 * w0 == n and height == width:
            return pos
        m = int(math.sqrt(n))
        patch = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((h0 + 0.1) / m, (w0 + 0.1) / m)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1].float(), patch], dim=1).to(pos.dtype)

    @staticmethod
    def preprocess(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
        """[N, H, W, 3] uint8 -> [N, 3, size, size]: bicubic resize with antialiasing on the 0..255
        values (no clamping, no rounding), /255, ImageNet mean/std — EDM2's "torch" mode."""
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return (x / 255 - mean) / std

    def features(self, x: Tensor) -> Tensor:
        """Normalized [N, 3, H, W] -> [N, D]: the hub model's output (final-norm CLS token)."""
        tokens = self.patch_embed(x)  # [N, HW/p², D]
        cls = self.cls_token.expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_encoding(*x.shape[2:])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, images: Tensor) -> Tensor:
        return self.features(self.preprocess(images, self.cfg.input_size))

    def load_official(self, state_dict: dict[str, Tensor]) -> None:
        """Strict load of facebookresearch/dinov2's state dict, with one-line errors."""
        own = self.state_dict()
        missing, unexpected = (
            sorted(own.keys() - state_dict.keys()),
            sorted(state_dict.keys() - own.keys()),
        )
        if missing or unexpected:
            raise WeightsError(
                f"not the DINOv2 ViT-L/14 weights: {len(missing)} missing keys {missing[:3]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise WeightsError(
                    f"weights key {k}: shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        self.load_state_dict(state_dict, strict=True, assign=True)


def random_state_dict(cfg: ViTConfig = VITL14, seed: int = 0) -> dict[str, Tensor]:
    """The official keys and shapes with random values of a sensible scale: tests, benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in DINOv2(cfg).state_dict().items():
        if k.endswith("gamma"):
            out[k] = torch.rand(v.shape, generator=gen) * 0.5 + 0.1
        elif "norm" in k:
            out[k] = (
                1 + 0.1 * torch.randn(v.shape, generator=gen)
                if k.endswith("weight")
                else (0.1 * torch.randn(v.shape, generator=gen))
            )
        else:
            out[k] = torch.randn(v.shape, generator=gen) * 0.02 * (5 if "token" in k else 1)
    return out


def load_dinov2(path: str | os.PathLike, device: str | torch.device = "cpu") -> DINOv2:
    """Build ViT-L/14, strictly load `dinov2_vitl14_pretrain.pth`, eval mode, no gradients."""
    from adm.models.checkpoint import CheckpointError, load_state_dict

    try:  # never unpickles code; says what a wrong file is
        state_dict = load_state_dict(path)
    except CheckpointError as err:
        raise WeightsError(f"cannot read DINOv2 weights: {err}") from None
    with torch.device("meta"):  # no 300M-parameter random init: the file's tensors are assigned
        model = DINOv2()
    model.load_official(state_dict)
    model.weights_id = sha256_file(path)
    return model.eval().requires_grad_(False).to(device)
