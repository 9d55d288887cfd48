"""Network primitives of the ADM UNet (Dhariwal & Nichol 2021, Sec. 3; Nichol & Dhariwal 2021).

The sinusoidal timestep embedding, float32 GroupNorm, zero initialisation of output layers, and the
multi-head attention kernel on a packed q/k/v tensor in both of the reference's channel layouts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GroupNorm32",
    "normalization",
    "qkv_attention",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    t: [N] int or float timesteps. Returns [N, dim] float32 (odd `dim`: trailing zero column).
    Computed in float32 with exactly the reference's formula, because at t ~ 1000 the rounding of
    `t * freq` already moves cos/sin by ~3e-5.
    """
    half = dim // 2
    # The reference computes the frequencies on the CPU and moves them; doing the same keeps GPU
    # results bit-identical to it (CUDA's expf may differ by one ulp).
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2 * half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [N, dim]
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and returns the input dtype (the reference's fp16 rule).

    float64 inputs stay float64 (the reference would round them to float32; nothing released
    depends on that, and it keeps float64 gradient checks exact).
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # f16/bf16/f32 -> f32, f64 -> f64
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's only normalisation layer: 32 groups, eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (output layers start at zero)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def qkv_attention(qkv: Tensor, num_heads: int, *, legacy: bool) -> Tensor:
    """Multi-head softmax attention over the last axis of a packed q/k/v tensor.

    qkv: [B, 3*H*C, L]. Returns [B, H*C, L] in qkv's dtype.
    `legacy=True` (QKVAttentionLegacy, the default of released UNets) reads the channels head-major,
    `[h0: q k v][h1: q k v]...`; `legacy=False` (QKVAttention, "new order", 64x64 model and
    classifiers) reads them q/k/v-major, `[q: h0 h1 ..][k: ..][v: ..]`. Both use the scale
    1/sqrt(C); the reference multiplies q and k by C^-1/4 each, which is the same up to rounding.
    """
    batch, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    ch = width // (3 * num_heads)
    # One transposed copy to [B, L, 3HC] so that every head's channels are contiguous: the fused
    # SDPA kernels need stride 1 on the head dimension (otherwise torch falls back to O(L^2) maths).
    tokens = qkv.transpose(1, 2).contiguous()  # [B, L, 3HC]
    if legacy:
        q, k, v = tokens.view(batch, length, num_heads, 3, ch).unbind(3)  # 3 x [B, L, H, C]
    else:
        q, k, v = tokens.view(batch, length, 3, num_heads, ch).unbind(2)  # 3 x [B, L, H, C]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=ch**-0.5
    )  # [B, H, L, C]
    out = out.permute(0, 1, 3, 2).reshape(batch, num_heads * ch, length)  # [B, H*C, L]
    return out.to(qkv.dtype)
