"""The ADM UNet (Dhariwal & Nichol 2021, Sec. 3 "Architecture Improvements") and its
super-resolution variant (Sec. 4 / App. B upsampling stack).

Residual blocks with adaptive group normalisation (AdaGN, `use_scale_shift_norm`), BigGAN-style
residual up/down-sampling, multi-head attention at chosen downsample factors. The module tree and
attribute names follow the released code so that its checkpoints load with `strict=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adm.nets.nn import (
    Conv1x1,
    normalization,
    pointwise,
    timestep_embedding,
    token_attention,
    upsample_nearest2x,
    zero_module,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "SuperResUNet",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNet",
    "UNetConfig",
    "Upsample",
    "build_encoder",
    "input_memory_format",
    "set_attention_checkpointing",
    "time_embed_mlp",
    "upsample_low_res",
]


class EncoderConfig(Protocol):
    """The fields shared by `UNetConfig` and `classifier.ClassifierConfig` (encoder half)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    dropout: float
    channel_mult: tuple[float, ...]
    conv_resample: bool
    num_heads: int
    num_head_channels: int | None
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    use_checkpoint: bool


def freeze_sequences(config: object, *names: str) -> None:
    """Turn list-valued fields of a frozen dataclass into tuples (so configs hash and compare)."""
    for name in names:
        object.__setattr__(config, name, tuple(getattr(config, name)))


def validate_encoder_config(cfg: EncoderConfig, heads_upsample: int | None = None) -> None:
    """Raise ValueError for settings the networks cannot be built with.

    `heads_upsample` is the head count of the decoder's attention blocks (UNet only).
    """
    for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.num_res_blocks < 0:
        raise ValueError(f"num_res_blocks must be >= 0, got {cfg.num_res_blocks}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.channel_mult:
        raise ValueError("channel_mult must name at least one level")
    if any(ds < 1 for ds in cfg.attention_ds):
        raise ValueError(f"attention_ds holds downsample factors >= 1, got {cfg.attention_ds}")
    if cfg.num_head_channels is not None and cfg.num_head_channels < 1:
        raise ValueError(f"num_head_channels must be positive or None, got {cfg.num_head_channels}")
    widths = [int(m * cfg.model_channels) for m in cfg.channel_mult]
    for mult, width in zip(cfg.channel_mult, widths, strict=True):
        if width < 32 or width % 32:
            raise ValueError(
                f"channel_mult {mult} x model_channels {cfg.model_channels} = {width} channels; "
                "GroupNorm(32 groups) needs a positive multiple of 32"
            )
    factor = 2 ** (len(widths) - 1)
    if cfg.image_size % factor:
        raise ValueError(
            f"image_size {cfg.image_size} must be divisible by 2**(levels-1) = {factor} "
            f"for {len(widths)} levels"
        )

    def check_heads(width: int, heads: int, where: str) -> None:
        per_head = cfg.num_head_channels
        if per_head is not None and width % per_head:
            raise ValueError(
                f"{where}: {width} channels not divisible by num_head_channels {per_head}"
            )
        if per_head is None and width % heads:
            raise ValueError(f"{where}: {width} channels not divisible into {heads} heads")

    for level, width in enumerate(widths):
        if 2**level in cfg.attention_ds:
            check_heads(width, cfg.num_heads, f"attention at downsample factor {2**level}")
            if heads_upsample is not None:
                check_heads(width, heads_upsample, f"decoder attention at factor {2**level}")
    check_heads(widths[-1], cfg.num_heads, "middle-block attention")


@dataclass(frozen=True)
class UNetConfig:
    """Constructor arguments of the reference `UNetModel`, typed.

    `attention_ds` are downsample factors (the constructor's `attention_resolutions`, not pixels);
    `channel_mult` may hold fractions (0.5 for the 512x512 model); `None` replaces the
    reference's -1.
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int | None = None
    num_heads_upsample: int | None = None
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        freeze_sequences(self, "attention_ds", "channel_mult")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {self.num_classes}")
        if self.num_heads_upsample is not None and self.num_heads_upsample < 1:
            raise ValueError(
                f"num_heads_upsample must be positive or None, got {self.num_heads_upsample}"
            )
        heads_up = self.num_heads if self.num_heads_upsample is None else self.num_heads_upsample
        validate_encoder_config(self, heads_upsample=heads_up)


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding `emb`."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to the `TimestepBlock`s among its layers."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (attribute `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = upsample_nearest2x(x)  # [N, C, 2H, 2W]
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """x2 downsampling: strided 3x3 conv or 2x2 average pool (attribute `op`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without a conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # [N, C_out, H/2, W/2]


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (AdaGN when `use_scale_shift_norm`).

    AdaGN (Sec. 3 of the paper): `GroupNorm(h) * (1 + scale) + shift`, `scale, shift` from `emb`.
    `up`/`down` resample both paths inside the block (BigGAN residual up/down-sampling).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv1x1(channels, out_channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # The norm + SiLU pairs of in_layers/out_layers run as one function (GroupNorm32.silu),
        # which keeps only its input for backward; the Sequentials keep the reference's keys.
        norm_in, _, conv_in = self.in_layers
        h = norm_in.silu(x)  # silu(norm_in(x)), [N, C, H, W]
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)  # [N, C, H', W']
        h = conv_in(h)  # [N, C_out, H', W']
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [N, C_out or 2 C_out, 1, 1]
        norm_out, _, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # 2 x [N, C_out, 1, 1]
            h = norm_out.silu(h, scale, shift)  # silu(norm_out(h) * (1 + scale) + shift)
        else:
            h = norm_out.silu(h + emb_out)
        h = conv_out(drop(h))  # [N, C_out, H', W']
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Residual self-attention over all spatial positions; zero-initialised output projection.

    Heads: `channels // num_head_channels`, or `num_heads` when `num_head_channels` is None.
    The 1x1 projections `qkv` and `proj_out` keep the reference's Conv1d parameters but run as
    matmuls on [N, HW, C] tokens, which are a free view of a channels_last input (and a strided
    view of an NCHW one): no layout copies around the attention kernel.
    `checkpoint_attention` (set by `set_attention_checkpointing`) recomputes the block in the
    backward pass, as the reference always does, to keep less memory in training.
    """

    checkpoint_attention: bool = False

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels is not None:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.legacy = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        recompute = self.use_checkpoint or self.checkpoint_attention
        if recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N, L, C] (a view)
        qkv = pointwise(tokens, self.qkv)  # [N, L, 3C]
        h = token_attention(qkv, self.num_heads, legacy=self.legacy)  # [N, L, C]
        h = pointwise(h, self.proj_out).transpose(1, 2)  # [N, C, L]
        return x + h.unflatten(2, spatial)  # [N, C, H, W]


def set_attention_checkpointing(model: nn.Module, on: bool = True) -> nn.Module:
    """Recompute every attention block of `model` in the backward pass (or stop doing so).

    Trades one more attention forward per training step for not keeping the blocks' activations
    (q/k/v, attention output) until backward; the reference does this always. Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.checkpoint_attention = on
    return model


def time_embed_mlp(model_channels: int) -> nn.Sequential:
    """`time_embed`: Linear(mc, 4mc), SiLU, Linear(4mc, 4mc) on the sinusoidal embedding."""
    dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """The memory format of `model`'s first convolution weight whose layout is unambiguous (more
    than one input channel, a kernel larger than 1x1). Inputs are converted to it once, so that a
    model moved to channels_last (`model.to(memory_format=torch.channels_last)`) runs in that
    layout end to end."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:].numel() > 1:  # layout not ambiguous
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


def _res_block(cfg: EncoderConfig, channels: int, out_channels: int, **updown: bool) -> ResBlock:
    return ResBlock(
        channels,
        4 * cfg.model_channels,
        cfg.dropout,
        out_channels=out_channels,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        use_checkpoint=cfg.use_checkpoint,
        **updown,
    )


def _attention_block(cfg: EncoderConfig, channels: int, num_heads: int) -> AttentionBlock:
    return AttentionBlock(
        channels,
        num_heads=num_heads,
        num_head_channels=cfg.num_head_channels,
        use_checkpoint=cfg.use_checkpoint,
        use_new_attention_order=cfg.use_new_attention_order,
    )


def build_encoder(
    cfg: EncoderConfig, in_channels: int
) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """`input_blocks` and `middle_block` of the UNet (also the noisy classifier's trunk).

    Returns the two modules and the channel count of every input block's output (the skips).
    """
    mc = cfg.model_channels
    ch = int(cfg.channel_mult[0] * mc)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_res_block(cfg, ch, int(mult * mc))]
            ch = int(mult * mc)
            if ds in cfg.attention_ds:
                layers.append(_attention_block(cfg, ch, cfg.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            if cfg.resblock_updown:
                down: nn.Module = _res_block(cfg, ch, ch, down=True)
            else:
                down = Downsample(ch, cfg.conv_resample, out_channels=ch)
            blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(
        _res_block(cfg, ch, ch), _attention_block(cfg, ch, cfg.num_heads), _res_block(cfg, ch, ch)
    )
    return blocks, middle, skip_channels


def _build_decoder(cfg: UNetConfig, skip_channels: Sequence[int]) -> nn.ModuleList:
    """`output_blocks`: each level consumes `num_res_blocks + 1` skips, then upsamples."""
    mc, skips = cfg.model_channels, list(skip_channels)
    heads = cfg.num_heads if cfg.num_heads_upsample is None else cfg.num_heads_upsample
    ch, ds = skips[-1], 2 ** (len(cfg.channel_mult) - 1)
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [_res_block(cfg, ch + skips.pop(), int(mc * mult))]
            ch = int(mc * mult)
            if ds in cfg.attention_ds:
                layers.append(_attention_block(cfg, ch, heads))
            if level and i == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    layers.append(_res_block(cfg, ch, ch, up=True))
                else:
                    layers.append(Upsample(ch, cfg.conv_resample, out_channels=ch))
                ds //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks


class UNet(nn.Module):
    """The ADM denoiser `model(x_t, t, y=None) -> [eps | eps, v]` (reference `UNetModel`)."""

    # Input channels of the first conv per image channel (the super-resolution model doubles it).
    input_multiplier: ClassVar[int] = 1

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.time_embed = time_embed_mlp(mc)
        self.label_emb = (
            None if config.num_classes is None else nn.Embedding(config.num_classes, 4 * mc)
        )
        in_channels = config.in_channels * self.input_multiplier
        self.input_blocks, self.middle_block, skips = build_encoder(config, in_channels)
        self.output_blocks = _build_decoder(config, skips)
        ch = skips[0]
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: [N, C, H, W] noisy images; t: [N] original timesteps (int or float); y: [N] labels.

        Returns [N, out_channels, H, W] (for learned-sigma models: eps, then the variance values v).
        """
        n = x.shape[0]
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(
                f"t must have shape [{n}] (one timestep per image), got {list(t.shape)}"
            )
        if self.label_emb is None and y is not None:
            raise ValueError("y was given to an unconditional model (config.num_classes is None)")
        if self.label_emb is not None and y is None:
            raise ValueError(
                f"this model is class-conditional ({self.config.num_classes} classes): pass y"
            )
        if y is not None and y.shape != (n,):
            raise ValueError(f"y must have shape [{n}] (one label per image), got {list(y.shape)}")
        emb_in = timestep_embedding(t, self.config.model_channels)  # [N, mc]
        emb = self.time_embed(emb_in.to(self.time_embed[0].weight.dtype))  # [N, 4mc]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)  # [N, 4mc]
        skips, h = [], x.contiguous(memory_format=input_memory_format(self))
        for block in self.input_blocks:
            h = block(h, emb)  # [N, C_l, H/ds, W/ds]
            skips.append(h)
        h = self.middle_block(h, emb)  # [N, C_mid, H/ds_max, W/ds_max]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # [N, C_l, H/ds, W/ds]
        norm, _, conv = self.out
        return conv(norm.silu(h)).contiguous()  # [N, out_channels, H, W]


def upsample_low_res(low_res: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (align_corners=False) resize of low_res: [N, C, h, w] -> [N, C, *size]."""
    return F.interpolate(low_res, size=tuple(size), mode="bilinear", align_corners=False)


class SuperResUNet(UNet):
    """Super-resolution UNet (reference `SuperResModel`): the low-resolution image, upsampled
    bilinearly, is concatenated after x_t on the channel axis. `config.in_channels` counts the image
    channels; the first conv sees twice as many."""

    input_multiplier: ClassVar[int] = 2

    def forward(  # type: ignore[override]
        self, x: Tensor, t: Tensor, low_res: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """x: [N, C, H, W]; t: [N]; low_res: [N, C, h, w]; y: [N] labels. Returns [N, out, H, W]."""
        up = upsample_low_res(low_res, x.shape[-2:])  # [N, C, H, W]
        return super().forward(torch.cat([x, up], dim=1), t, y)  # [N, out_channels, H, W]
