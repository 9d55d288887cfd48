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
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from adm.diffusion.gaussian import Diffusion, Generators, ModelFn, draw_noise
from adm.diffusion.samplers import CondFn, DenoisedFn, SampleStep, last_sample, steps_of
from adm.diffusion.solvers import denoise

# EDM's stochastic settings for the ADM ImageNet-64 model (Karras et al. 2022, Table 5).
EDM_CHURN, EDM_S_TMIN, EDM_S_TMAX, EDM_S_NOISE = 80.0, 0.05, 50.0, 1.003


def _sigmas(schedule_ac) -> Tensor:
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
    table = _sigmas(full.schedule.alphas_cumprod)  # σ per original timestep, increasing
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
        sigma = float(table[j])
        if churn and s_tmin <= sigma <= s_tmax and i > 0:
            j_hat = int(torch.argmin((table.log() - math.log(sigma * (1 + gamma_max))).abs()))
            j = max(j, j_hat)
            raised = float(table[j])
            z = draw_noise(x, generator)
            x = x + math.sqrt(max(raised**2 - sigma**2, 0.0)) * s_noise * z
            sigma = raised
        x0 = d_of(x, j)
        if i == 0:  # Euler to σ = 0: the denoised image
            x = x0
            yield SampleStep(i, x, x0)
            break
        j_next = int(tmap[i - 1])
        sigma_next = float(table[j_next])
        slope = (x - x0) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        slope_next = (x_euler - d_of(x_euler, j_next)) / sigma_next
        x = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        yield SampleStep(i, x / math.sqrt(1 + sigma_next**2), x0)


def edm_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """EDM (Heun when `churn` = 0) from x_T = `noise`; returns x_0. Keywords as the progressive
    variant."""
    return last_sample(edm_sample_progressive(model_fn, diff, noise, **kwargs))
