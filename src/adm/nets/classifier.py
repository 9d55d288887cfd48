"""The noisy classifier p_phi(y | x_t, t) used for classifier guidance (Dhariwal & Nichol 2021,
Sec. 4 and App. B; reference `EncoderUNetModel`).

The UNet's encoder half (time embedding, input blocks, middle block) followed by one of four pooling
heads; the released classifiers use attention pooling, which only accepts the training resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from adm.nets.nn import normalization, pointwise, timestep_embedding, token_attention, zero_module
from adm.nets.unet import (
    build_encoder,
    freeze_sequences,
    input_memory_format,
    time_embed_mlp,
    validate_encoder_config,
)

__all__ = ["AttentionPool2d", "ClassifierConfig", "NoisyClassifier", "Pool"]

Pool = Literal["adaptive", "attention", "spatial", "spatial_v2"]

# Hidden width of the "spatial" heads (fixed in the reference).
_SPATIAL_HIDDEN = 2048


@dataclass(frozen=True)
class ClassifierConfig:
    """Constructor arguments of the reference `EncoderUNetModel`, typed; the defaults are those of
    the released classifiers (`create_classifier`), not of the bare constructor."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (2, 4, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_heads: int = 1
    num_head_channels: int | None = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    pool: Pool = "attention"

    def __post_init__(self) -> None:
        freeze_sequences(self, "attention_ds", "channel_mult")
        if self.pool not in get_args(Pool):
            raise ValueError(f"pool must be one of {get_args(Pool)}, got {self.pool!r}")
        validate_encoder_config(self)
        if self.pool == "attention":
            width = int(self.channel_mult[-1] * self.model_channels)
            if self.num_head_channels is None:
                raise ValueError(
                    "pool='attention' needs num_head_channels (heads = C // head channels)"
                )
            if width % self.num_head_channels:
                raise ValueError(
                    f"attention pool: {width} channels not divisible by "
                    f"num_head_channels {self.num_head_channels}"
                )

    @property
    def final_ds(self) -> int:
        """Downsample factor of the trunk's output: 2**(levels-1)."""
        return 2 ** (len(self.channel_mult) - 1)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the spatial mean attends over all positions (new head order).

    Its learned positional embedding has `spatial_dim**2 + 1` positions, so the input must have
    exactly `spatial_dim x spatial_dim` positions.
    """

    def __init__(
        self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int
    ) -> None:
        super().__init__()
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # [N, HW, C] (a view)
        if tokens.shape[1] != self.spatial_dim**2:
            raise ValueError(
                f"attention pooling expects {self.spatial_dim}x{self.spatial_dim} positions, "
                f"got {'x'.join(map(str, spatial))}"
            )
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [N, HW+1, C]
        tokens = tokens + self.positional_embedding.t()[None].to(tokens.dtype)  # [N, HW+1, C]
        qkv = pointwise(tokens, self.qkv_proj)  # [N, HW+1, 3C]
        # Only the mean token's output is read, so only it attends (the other queries' rows of
        # the reference's full attention are computed there and dropped).
        pooled = token_attention(qkv, self.num_heads, legacy=False, queries=1)  # [N, 1, C]
        return pointwise(pooled, self.c_proj)[:, 0]  # [N, out]


def _pool_head(cfg: ClassifierConfig, channels: int, feature_size: int) -> nn.Sequential:
    """`out`: the pooling head, with the reference's layer indices (hence its state-dict keys)."""
    if cfg.pool == "adaptive":
        return nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            zero_module(nn.Conv2d(channels, cfg.out_channels, 1)),
            nn.Flatten(),
        )
    if cfg.pool == "attention":
        assert cfg.num_head_channels is not None  # checked by ClassifierConfig
        spatial_dim = cfg.image_size // cfg.final_ds
        pool = AttentionPool2d(spatial_dim, channels, cfg.num_head_channels, cfg.out_channels)
        return nn.Sequential(normalization(channels), nn.SiLU(), pool)
    if cfg.pool == "spatial":
        return nn.Sequential(
            nn.Linear(feature_size, _SPATIAL_HIDDEN),
            nn.ReLU(),
            nn.Linear(_SPATIAL_HIDDEN, cfg.out_channels),
        )
    return nn.Sequential(  # spatial_v2
        nn.Linear(feature_size, _SPATIAL_HIDDEN),
        normalization(_SPATIAL_HIDDEN),
        nn.SiLU(),
        nn.Linear(_SPATIAL_HIDDEN, cfg.out_channels),
    )


class NoisyClassifier(nn.Module):
    """`classifier(x_t, t) -> logits`: the UNet encoder plus a pooling head."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.time_embed = time_embed_mlp(config.model_channels)
        self.input_blocks, self.middle_block, skips = build_encoder(config, config.in_channels)
        # The spatial heads read the mean of every input block's output and of the middle block.
        feature_size = sum(skips) + skips[-1]
        self.out = _pool_head(config, skips[-1], feature_size)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: [N, C, H, W] noisy images; t: [N] original timesteps -> logits [N, classes]."""
        size = self.config.image_size
        if self.config.pool == "attention" and tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"this classifier's attention pooling was built for {size}x{size} inputs, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb_in = timestep_embedding(t, self.config.model_channels)  # [N, mc]
        emb = self.time_embed(emb_in.to(self.time_embed[0].weight.dtype))  # [N, 4mc]
        spatial = self.config.pool.startswith("spatial")
        means, h = [], x.contiguous(memory_format=input_memory_format(self))
        for block in self.input_blocks:
            h = block(h, emb)  # [N, C_l, H/ds, W/ds]
            if spatial:
                means.append(h.mean(dim=(2, 3)))  # [N, C_l]
        h = self.middle_block(h, emb)  # [N, C, H/ds, W/ds]
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            h = torch.cat(means, dim=-1)  # [N, feature_size]
        return self.out(h)  # [N, out_channels]
