"""Image-to-image editing (SDEdit, Meng et al. 2022): noise the input to t = S·T with q(x_t | x_0)
and denoise it with any sampler of `adm.diffusion.registry`, optionally guided (class translation
with a classifier's `cond_fn` towards another class).

Strength S ∈ [0, 1] picks the start t_S = round(S·T) on the original T-step chain (capped at
T−1); S = 0 returns the input. Of a sampler's N-step run over the whole chain, an edit takes
max(1, round(S·N)) evenly spaced steps from t_S down to 0 (as img2img pipelines do), so its
cost scales with S. Every sampler starts from x at its first timestep in the VP scale, so the
noised input goes straight in.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from adm.diffusion import registry
from adm.diffusion.gaussian import Diffusion, ModelFn, q_sample


def check_strength(strength: float) -> float:
    """`strength` as a float in [0, 1]; anything else (NaN too) is a ValueError."""
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return s


def sdedit_timesteps(num_train_steps: int, strength: float, steps: int) -> list[int]:
    """Original timesteps of an edit, largest first: t_S = min(round(S·T), T−1) down to 0 in
    max(1, round(S·`steps`)) evenly spaced steps (fewer if t_S + 1 is smaller). Empty for S = 0."""
    s = check_strength(strength)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if s == 0:
        return []
    start = min(round(s * num_train_steps), num_train_steps - 1)
    count = min(max(1, round(s * steps)), start + 1)
    if count == 1:
        return [start]
    grid = np.round(np.linspace(start, 0, count)).astype(np.int64)
    return [int(t) for t in grid]


def edit_timesteps(sampler: str, num_train_steps: int, strength: float, steps: int) -> list[int]:
    """`sdedit_timesteps`, checked to be enough for `sampler` (Heun and EDM need two)."""
    timesteps = sdedit_timesteps(num_train_steps, strength, steps)
    need = registry.sampler_info(sampler).min_steps
    if timesteps and len(timesteps) < need:
        raise ValueError(
            f"sampler {sampler!r} needs at least {need} steps; strength {strength:g} of {steps} "
            f"steps gives {len(timesteps)}: raise the steps or the strength"
        )
    return timesteps


def sdedit_noise(diff: Diffusion, x0: Tensor, timesteps: list[int], noise: Tensor) -> Tensor:
    """x_{t_S} = √ᾱ x0 + √(1−ᾱ) ε at the edit's first timestep (ᾱ of the original schedule)."""
    top = torch.full((x0.shape[0],), timesteps[0], dtype=torch.long, device=x0.device)
    return q_sample(dataclasses.replace(diff, schedule=diff.schedule.original), x0, top, noise)


def sdedit_sample(
    sampler: str,
    model_fn: ModelFn,
    diff: Diffusion,
    x0: Tensor,
    noise: Tensor,
    *,
    strength: float,
    steps: int,
    **kwargs,
) -> Tensor:
    """Edit `x0` [N, C, H, W] in [-1, 1]: noise it to t_S with `noise` and run `sampler` (a
    registry name) over the edit's timesteps. `kwargs`: the registry's keywords (`cond_fn`,
    `model_kwargs`, `generator`, `clip_denoised`, the sampler's options). Strength 0: `x0`."""
    timesteps = edit_timesteps(sampler, diff.schedule.original_num_steps, strength, steps)
    if not timesteps:
        return x0.clone()
    x_t = sdedit_noise(diff, x0, timesteps, noise)
    return registry.sample(sampler, model_fn, diff, x_t, timesteps=timesteps, **kwargs)
