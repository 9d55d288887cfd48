"""The EDM samplers (Karras et al. 2022, Algorithms 1 and 2) on ADM's discrete ε-models.

EDM writes the process as x = x_0 + σ·n with σ = √((1−ᾱ)/ᾱ), i.e. x = x_t/√ᾱ_t, and integrates
dx/dσ = (x − D(x; σ))/σ, D being the x0 prediction. For a discrete model D exists only at the
trained σ's, so every σ the sampler visits is one of the table's (EDM's own `round_sigma` for the
ADM models): the grid's σ's, and for the stochastic sampler the raised σ̂ = σ(1 + γ) rounded to the
nearest trained σ. D(x; σ_j) is the network at original timestep j on x_t = x·√ᾱ_j, with the same
guidance, clipping and `denoised_fn` as every other sampler.

Per grid of N timesteps: N − 1 Heun steps between consecutive grid σ's (2 network calls each) and
a last Euler step from σ(t_0) to 0, which is the x0 prediction there: NFE = 2N − 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from adm.diffusion.gaussian import Diffusion, Generators, ModelFn, draw_noise
from adm.diffusion.samplers import CondFn, DenoisedFn, SampleStep, last_sample, steps_of
from adm.diffusion.solvers import denoise

# EDM's stochastic settings for the ADM ImageNet-64 model (Karras et al. 2022, Table 5).
EDM_CHURN, EDM_S_TMIN, EDM_S_TMAX, EDM_S_NOISE = 80.0, 0.05, 50.0, 1.003


def sigma_table(schedule_ac) -> Tensor:
    """σ = √((1 − ᾱ)/ᾱ) of every trained timestep (float64, increasing with t): the σ's that
    `edm_churn` and `heun_step` index by original timestep."""
    ac = torch.tensor(np.array(schedule_ac, dtype=np.float64))
    return ((1 - ac) / ac).sqrt()


def edm_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    churn: float = 0.0,
    s_tmin: float = EDM_S_TMIN,
    s_tmax: float = EDM_S_TMAX,
    s_noise: float = EDM_S_NOISE,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> Iterator[SampleStep]:
    """EDM sampling from x_T = `noise` (VP scale, like every sampler): `churn` = 0 is the
    deterministic 2nd-order Heun sampler (Algorithm 1), `churn` > 0 the stochastic one (Algorithm
    2: γ = min(churn/N, √2 − 1) for σ in [s_tmin, s_tmax], fresh noise scaled by `s_noise`, drawn
    from `generator`). Yields the sample in VP scale (x_t = x·√ᾱ) at each grid point."""
    if churn < 0 or s_noise <= 0 or s_tmin > s_tmax:
        raise ValueError(
            f"EDM needs churn >= 0, s_noise > 0 and s_tmin <= s_tmax; got churn={churn}, "
            f"s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}"
        )
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)
    if diff.num_steps < 2:
        raise ValueError("the Heun/EDM sampler needs at least 2 steps (it takes N − 1 Heun steps)")
    full = dataclasses.replace(diff, schedule=diff.schedule.original)  # index = original timestep
    table = sigma_table(full.schedule.alphas_cumprod)  # σ per original timestep, increasing
    tmap = diff.schedule.timestep_map
    common = {"cond_fn": cond_fn, "clip_denoised": clip_denoised, "denoised_fn": denoised_fn,
              "model_kwargs": model_kwargs}  # fmt: skip

    def d_of(x: Tensor, j: int) -> Tensor:  # D(x; σ_j), x in VE scale
        scale = float(1 / math.sqrt(1 + table[j] ** 2))  # √ᾱ_j
        return denoise(model_fn, full, x * scale, j, **common)

    n = diff.num_steps
    gamma_max = min(churn / n, math.sqrt(2) - 1)
    j = int(tmap[n - 1])
    x = noise * float(math.sqrt(1 + table[j] ** 2))  # x_T / √ᾱ_T
    for i in steps_of(diff, progress, "EDM" if churn else "Heun"):
        j = int(tmap[i])
        if churn and s_tmin <= float(table[j]) <= s_tmax and i > 0:
            x, j = edm_churn(x, j, table, gamma_max, s_noise, generator)
        if i == 0:  # Euler to σ = 0: the denoised image
            x0 = d_of(x, j)
            yield SampleStep(i, x0, x0)
            break
        x, x0 = heun_step(d_of, x, j, int(tmap[i - 1]), table)
        yield SampleStep(i, x / math.sqrt(1 + float(table[int(tmap[i - 1])]) ** 2), x0)


def edm_churn(
    x: Tensor, j: int, table: Tensor, gamma: float, s_noise: float, generator: Generators
) -> tuple[Tensor, int]:
    """EDM's noise increase (Algorithm 2, lines 4–6) on VE-scale `x` at σ_j: raise σ to σ(1 + γ),
    rounded to the nearest trained σ (never below σ_j), adding fresh noise from `generator`.
    Returns (x̂, ĵ)."""
    sigma = float(table[j])
    j_hat = max(j, int(torch.argmin((table.log() - math.log(sigma * (1 + gamma))).abs())))
    raised = float(table[j_hat])
    z = draw_noise(x, generator)
    return x + math.sqrt(max(raised**2 - sigma**2, 0.0)) * s_noise * z, j_hat


def heun_step(
    d_of: Callable[[Tensor, int], Tensor], x: Tensor, j: int, j_next: int, table: Tensor
) -> tuple[Tensor, Tensor]:
    """One 2nd-order Heun step of dx/dσ = (x − D(x; σ))/σ from σ_j to σ_{j_next} > 0 (VE scale;
    Algorithm 1, lines 4–8), for users who drive their own loop: `d_of(x, j)` is D(x; σ_j), e.g.
    `denoise(model_fn, full_diff, x·√ᾱ_j, j, ...)`. Returns (x at σ_{j_next}, D(x; σ_j))."""
    sigma, sigma_next = float(table[j]), float(table[j_next])
    x0 = d_of(x, j)
    slope = (x - x0) / sigma
    x_euler = x + (sigma_next - sigma) * slope
    slope_next = (x_euler - d_of(x_euler, j_next)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (slope + slope_next), x0


def edm_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """EDM (Heun when `churn` = 0) from x_T = `noise`; returns x_0. Keywords as the progressive
    variant."""
    return last_sample(edm_sample_progressive(model_fn, diff, noise, **kwargs))
