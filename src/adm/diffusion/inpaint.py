"""Inpainting with an unconditional (or guided) diffusion model: known-region replacement and
RePaint's resampling (Lugmayr et al. 2022, "RePaint", Alg. 1 and §4.2).

At every denoising step the known region of x_t is replaced by the original forward-noised to the
same level, x_t^known ~ q(x_t | x_0) (Eq. 8 of RePaint), then one DDPM or DDIM step runs on the
whole image. RePaint also goes back up the chain: after reaching a jump point it re-noises the
sample j steps with q(x_{t+1} | x_t) (Eq. 9) and denoises them again, r times in all, so that the
unknown region can harmonise with the known one. With r = 1 there are no jumps and the method is
plain replacement. Respacing is data: the steps, jumps and one-step forward noise all live on the
(respaced) diffusion's indices, β'_t being the respaced betas.

The multistep solvers (DPM-Solver++, UniPC) do replacement only: the known region is set at every
grid point before the network call and their history of x0 predictions is kept. Their updates act
pixel by pixel, so the known region of the history only reaches known pixels, which the next grid
point overwrites; the generated region's history stays that of one trajectory. A jump back up the
chain would end that trajectory (docs/editing.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from adm.diffusion import registry
from adm.diffusion.gaussian import Diffusion, Generators, ModelFn, draw_noise, q_sample
from adm.diffusion.samplers import CondFn, DenoisedFn, KnownFn, ddim_step, ddpm_step

# one-step methods on x_t: replacement and RePaint's jumps
RESAMPLING_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# multistep solvers: replacement only (a jump would restart them at first order, i.e. DDIM)
REPLACEMENT_SAMPLERS: tuple[str, ...] = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")
INPAINT_SAMPLERS: tuple[str, ...] = RESAMPLING_SAMPLERS + REPLACEMENT_SAMPLERS


def jump_schedule(num_steps: int, jump: int, resample: int) -> list[int]:
    """RePaint's sequence of noise levels (its `get_schedule_jump` with one jump size).

    Starts at T'−1 and ends at −1 (the clean image); consecutive levels (a, a−1) are a denoising
    step taken at index a, (a, a+1) a forward step q(x_{a+1} | x_a). At every jump point
    t ∈ {0, j, 2j, … < T'−j}, reached on the way down, the chain goes back up j steps and down
    again, r − 1 times, so each segment [t, t+j] is denoised r times. r = 1: T'−1, …, 0, −1.
    """
    if num_steps < 1 or jump < 1 or resample < 1:
        raise ValueError(
            f"steps, jump and resample must be positive, got {num_steps}, {jump}, {resample}"
        )
    if resample > 1 and jump >= num_steps:
        raise ValueError(
            f"the jump length ({jump}) must be smaller than the number of steps ({num_steps}) "
            "for RePaint's resampling"
        )
    jumps_left = {t: resample - 1 for t in range(0, num_steps - jump, jump)}
    t = num_steps - 1
    times = [t]
    while t >= 0:
        t -= 1
        times.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            for _ in range(jump):
                t += 1
                times.append(t)
    return times


def network_calls(num_steps: int, jump: int, resample: int) -> int:
    """Denoising steps (network calls) of the RePaint schedule: T' + (r−1)·j·⌈(T'−j)/j⌉."""
    times = jump_schedule(num_steps, jump, resample)
    return sum(b < a for a, b in itertools.pairwise(times))


def q_step(diff: Diffusion, x_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t ~ q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I) (Ho et al. Eq. 2; RePaint Eq. 9), with
    the respaced β'_t so that a jump from index t−1 to t lands on ᾱ'_t."""
    beta = diff.schedule.extract("betas", t, x_prev)
    return torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * noise


def replace_known(
    diff: Diffusion, x_t: Tensor, t: Tensor, x0: Tensor, mask: Tensor, noise: Tensor
) -> Tensor:
    """m·q_sample(x0, t) + (1 − m)·x_t: the known region (mask 1) set to the forward-noised
    original at level t (RePaint Eq. 8). `mask` [N or 1, 1, H, W] of 0/1 broadcasts over the
    channels."""
    return mask * q_sample(diff, x0, t, noise) + (1 - mask) * x_t


def paste_known(x: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
    """The final image: the known region is the original exactly, the rest is generated."""
    return torch.where(mask.bool().expand_as(x), x0, x)


def known_region_fn(diff: Diffusion, x0: Tensor, mask: Tensor, generator: Generators) -> KnownFn:
    """`known_fn(x, i)`: `replace_known` at respaced index i, with fresh noise from `generator`
    at every call (as RePaint: the known region's noise is not the generated region's)."""

    def known_fn(x: Tensor, i: int) -> Tensor:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        return replace_known(diff, x, t, x0, mask, draw_noise(x, generator))

    return known_fn


def check_sampler(sampler: str, resample: int) -> None:
    """ValueError unless `sampler` can inpaint, and resample (r > 1) only with DDPM or DDIM."""
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(
            f"--sampler {sampler}: inpainting runs with {', '.join(INPAINT_SAMPLERS)} "
            "(docs/editing.md: which samplers can inpaint)"
        )
    if resample > 1 and sampler not in RESAMPLING_SAMPLERS:
        raise ValueError(
            f"--resample {resample}: RePaint's resampling runs with ddpm or ddim; --sampler "
            f"{sampler} does replacement only (--resample 1)"
        )


def inpaint_sample(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    x0: Tensor,
    mask: Tensor,
    *,
    sampler: str = "ddpm",
    jump: int = 10,
    resample: int = 1,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    known_generator: Generators = None,
    progress: bool = False,
    **options: float | None,
) -> Tensor:
    """Inpaint `x0` [N, C, H, W] in [-1, 1] where `mask` is 0, starting from x_T = `noise`.

    `resample` = r, `jump` = j (RePaint, DDPM or DDIM); r = 1 is plain replacement, which every
    sampler of `INPAINT_SAMPLERS` does. `options`: the sampler's own (`eta`, `order`). Guidance
    (`cond_fn`, a classifier-free `model_fn`) applies to the whole image as in sampling. The
    step noise comes from `generator` (as the sampler's), the known region's and the jumps' noise
    from `known_generator`, so that an all-zero mask with r = 1 reproduces plain sampling from
    the same generators. The known region of the result is `x0` exactly (in float; quantise with
    the mask too, see `adm.generate.edit`).
    """
    check_sampler(sampler, resample)
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)
    mask = mask.to(x0.dtype)
    x0 = x0.contiguous()  # x_t takes x0's memory layout through the replacement
    known_fn = known_region_fn(diff, x0, mask, known_generator)
    common = dict(cond_fn=cond_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                  model_kwargs=model_kwargs, generator=generator)  # fmt: skip
    if sampler in REPLACEMENT_SAMPLERS:
        x = registry.sample(sampler, model_fn, diff, noise, known_fn=known_fn, progress=progress,
                            **common, **options)  # fmt: skip
        return paste_known(x, x0, mask)
    registry.check_options(sampler, **options)
    step = ddpm_step if sampler == "ddpm" else ddim_step
    options = {k: v for k, v in options.items() if v is not None}
    x = noise
    pairs = list(itertools.pairwise(jump_schedule(diff.num_steps, jump, resample)))
    for a, b in steps_of_pairs(pairs, progress):
        with torch.no_grad():
            if b > a:  # back up the chain: x_b ~ q(x_b | x_a)
                t = torch.full((x.shape[0],), b, dtype=torch.long, device=x.device)
                x = q_step(diff, x, t, draw_noise(x, known_generator))
                continue
            t = torch.full((x.shape[0],), a, dtype=torch.long, device=x.device)
            x, _ = step(model_fn, diff, known_fn(x, a), t, **common, **options)
    return paste_known(x, x0, mask)


def steps_of_pairs(pairs: list[tuple[int, int]], progress: bool):
    """The (level, next level) pairs, with a progress bar counting them when asked."""
    if not progress:
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="RePaint", leave=False)
