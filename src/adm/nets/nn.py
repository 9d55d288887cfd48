"""Network primitives of the ADM UNet (Dhariwal & Nichol 2021, Sec. 3; Nichol & Dhariwal 2021).

The sinusoidal timestep embedding, float32 GroupNorm (with AdaGN's scale-shift folded into one
`addcmul`), zero initialisation of output layers, 1x1 convolutions applied as matmuls on tokens, and
the multi-head attention kernel on a packed q/k/v tensor in both of the reference's channel layouts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GroupNorm32",
    "normalization",
    "pointwise",
    "qkv_attention",
    "timestep_embedding",
    "token_attention",
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

    def modulate(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """AdaGN: `self(x) * (1 + scale) + shift` as a plain normalisation and one `addcmul`.

        x: [N, C, H, W] (any memory format, kept); scale, shift: [N, C, 1, 1]. The affine weight
        and bias are folded into the per-sample scale and shift, so the full-size tensor is
        touched twice (normalise, addcmul) instead of four times. Computed in float32 like
        `forward`, returned in x's dtype.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        gain = 1 + scale.to(dtype)  # [N, C, 1, 1]
        offset = shift.to(dtype)
        if self.bias is not None:
            offset = torch.addcmul(offset, self.bias.to(dtype)[:, None, None], gain)
        if self.weight is not None:
            gain = gain * self.weight.to(dtype)[:, None, None]
        normed = F.group_norm(x.to(dtype), self.num_groups, None, None, self.eps)
        return torch.addcmul(offset, normed, gain).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's only normalisation layer: 32 groups, eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (output layers start at zero)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def pointwise(tokens: Tensor, conv: nn.Conv1d) -> Tensor:
    """A 1x1 `nn.Conv1d` applied to tokens as one matmul: [B, L, C_in] -> [B, L, C_out].

    The parameter keeps the reference's Conv1d shape [C_out, C_in, 1] (and state-dict key); the
    matmul reads it through a view. `tokens` may be a transposed view of a [B, C_in, L] tensor:
    the matmul takes the strides as they are, so nothing is copied either way.
    """
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


def token_attention(
    qkv: Tensor, num_heads: int, *, legacy: bool, queries: int | None = None
) -> Tensor:
    """Multi-head softmax attention on packed tokens: qkv [B, L, 3*H*C] -> [B, Lq, H*C].

    The channel order of the last axis is that of `qkv_attention` (`legacy`: head-major). q, k
    and v are strided views of `qkv` (stride 1 along each head's channels, as the fused SDPA
    kernels need), so nothing is copied. `queries=n` attends from the first n tokens only
    (Lq = n; attention pooling reads one output token); None: all L tokens.
    """
    batch, length, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.view(batch, length, num_heads, 3, ch).unbind(3)  # 3 x [B, L, H, C]
    else:
        q, k, v = qkv.view(batch, length, 3, num_heads, ch).unbind(2)  # 3 x [B, L, H, C]
    if queries is not None:
        q = q[:, :queries]  # [B, Lq, H, C]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=ch**-0.5
    )  # [B, H, Lq, C]
    return out.transpose(1, 2).reshape(batch, q.shape[1], num_heads * ch).to(qkv.dtype)


def qkv_attention(qkv: Tensor, num_heads: int, *, legacy: bool) -> Tensor:
    """Multi-head softmax attention over the last axis of a packed q/k/v tensor.

    qkv: [B, 3*H*C, L]. Returns [B, H*C, L] in qkv's dtype.
    `legacy=True` (QKVAttentionLegacy, the default of released UNets) reads the channels head-major,
    `[h0: q k v][h1: q k v]...`; `legacy=False` (QKVAttention, "new order", 64x64 model and
    classifiers) reads them q/k/v-major, `[q: h0 h1 ..][k: ..][v: ..]`. Both use the scale
    1/sqrt(C); the reference multiplies q and k by C^-1/4 each, which is the same up to rounding.
    """
    # One transposed copy to [B, L, 3HC] so that every head's channels are contiguous: the fused
    # SDPA kernels need stride 1 on the head dimension (otherwise torch falls back to O(L^2) maths).
    tokens = qkv.transpose(1, 2).contiguous()  # [B, L, 3HC]
    return token_attention(tokens, num_heads, legacy=legacy).transpose(1, 2)  # [B, H*C, L]
