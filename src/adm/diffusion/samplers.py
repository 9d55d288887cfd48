"""Samplers: stateless loops over a `model_fn` (Ho et al. 2020 Alg. 2; Song et al. 2021, DDIM).

Every sampler has one signature style: `sample(model_fn, diffusion, noise, *, timesteps=None,
cond_fn=None, generator=None, progress=False, ...)`; `timesteps` (original timesteps, largest
first, e.g. from `adm.diffusion.grids`) respaces the diffusion for this run. The fast solvers
(DPM-Solver++, UniPC) are in `adm.diffusion.solvers`, the EDM samplers in `adm.diffusion.edm`,
all of them by name in `adm.diffusion.registry`. `model_fn(x_t, t, **model_kwargs)` always
receives the *original* timesteps (respacing is data: `diffusion.schedule.timestep_map`).
Classifier guidance enters as `cond_fn(x_t, t, **model_kwargs) -> scale · ∇ log p(y | x_t)`:
ancestral sampling shifts the mean by Σ·g (Algorithm 1 of Dhariwal & Nichol 2021), DDIM shifts the
noise prediction by −√(1−ᾱ)·g (Algorithm 2). Per-step noise comes from `step_noises[k]` (loop step
k) when given, otherwise from `generator` (one generator per sample makes samples independent of
batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from adm.diffusion.gaussian import (
    Diffusion,
    Generators,
    ModelFn,
    PMeanVar,
    draw_noise,
    eps_from_pred_x0,
    p_mean_variance,
    q_posterior,
)

CondFn = Callable[..., Tensor]
DenoisedFn = Callable[[Tensor], Tensor]
# x at respaced index i -> x with part of it set (inpainting's known region)
KnownFn = Callable[[Tensor, int], Tensor]


class SampleStep(NamedTuple):
    """One step of a loop: the respaced index `t` just taken, the new sample and the x0 guess."""

    t: int
    sample: Tensor
    pred_x0: Tensor


def model_p_mean_variance(
    diff: Diffusion,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
) -> PMeanVar:
    """Run the network at original timesteps and read p(x_{t-1} | x_t) from its output."""
    out = model_fn(x_t, diff.schedule.network_timesteps(t), **(model_kwargs or {}))
    return p_mean_variance(
        diff, out.float(), x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
    )


def condition_mean(
    diff: Diffusion, cond_fn: CondFn, out: PMeanVar, x_t: Tensor, t: Tensor, model_kwargs: dict
) -> Tensor:
    """Algorithm 1 (Dhariwal & Nichol 2021): μ + Σ·g with g = scale·∇ log p(y | x_t)."""
    grad = cond_fn(x_t, diff.schedule.network_timesteps(t), **model_kwargs)
    return out.mean.float() + out.variance * grad.float()


def condition_score(
    diff: Diffusion, cond_fn: CondFn, out: PMeanVar, x_t: Tensor, t: Tensor, model_kwargs: dict
) -> PMeanVar:
    """Algorithm 2 (Dhariwal & Nichol 2021): ε̂ = ε − √(1−ᾱ_t)·g, then x0 and the mean from ε̂.

    x0(ε̂) = x0(ε) + (1−ᾱ_t)/√ᾱ_t · g exactly; we add that term instead of the original's
    x0 -> ε -> x0 round trip, which amplifies float32 error ~1/√ᾱ_t at high noise (and made
    scale 0 differ from no guidance). As in the original the guided x0 is not clipped again.
    """
    alpha_bar = diff.schedule.extract("alphas_cumprod", t, x_t)
    grad = cond_fn(x_t, diff.schedule.network_timesteps(t), **model_kwargs)
    pred_x0 = out.pred_x0 + ((1 - alpha_bar) / alpha_bar.sqrt()) * grad
    mean, _, _ = q_posterior(diff, pred_x0, x_t, t)
    return PMeanVar(mean, out.variance, out.log_variance, pred_x0)


def _nonzero_mask(t: Tensor, x: Tensor) -> Tensor:
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


# ---- ancestral sampling (DDPM) -------------------------------------------------------------------


def ddpm_step(
    model_fn: ModelFn,
    diff: Diffusion,
    x_t: Tensor,
    t: Tensor,
    *,
    noise: Tensor | None = None,
    generator: Generators = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """x_{t-1} ~ p(x_{t-1} | x_t) (guided by `cond_fn` if given). Returns (sample, pred_x0);
    pred_x0 is the unguided prediction. No noise is added at t = 0."""
    kwargs = model_kwargs or {}
    out = model_p_mean_variance(
        diff, model_fn, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=kwargs,
    )  # fmt: skip
    if noise is None:  # drawn before cond_fn runs, as in the original
        noise = draw_noise(x_t, generator)
    mean = out.mean if cond_fn is None else condition_mean(diff, cond_fn, out, x_t, t, kwargs)
    sample = mean + _nonzero_mask(t, x_t) * torch.exp(0.5 * out.log_variance) * noise
    return sample, out.pred_x0


def ddpm_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    step_noises: Tensor | Sequence[Tensor] | None = None,
    progress: bool = False,
) -> Iterator[SampleStep]:
    """Ancestral sampling from x_T = `noise` [N, C, H, W], yielding every step (t = T'−1 … 0)."""
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)

    def step(x: Tensor, t: Tensor, noise_k: Tensor | None) -> tuple[Tensor, Tensor]:
        return ddpm_step(
            model_fn, diff, x, t, noise=noise_k, generator=generator, cond_fn=cond_fn,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip

    return _loop(step, diff, noise, step_noises, progress, "DDPM")


def ddpm_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """Ancestral sampling from x_T = `noise`; returns x_0. Keywords as `ddpm_sample_progressive`."""
    return last_sample(ddpm_sample_progressive(model_fn, diff, noise, **kwargs))


# ---- DDIM (Song et al. 2021, Eq. 12) -------------------------------------------------------------


def ddim_step(
    model_fn: ModelFn,
    diff: Diffusion,
    x_t: Tensor,
    t: Tensor,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: Generators = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t-1}; `eta` = 0 is deterministic, 1 matches DDPM's variance.
    Returns (sample, pred_x0) where pred_x0 includes the guidance."""
    kwargs = model_kwargs or {}
    out = model_p_mean_variance(
        diff, model_fn, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=kwargs,
    )  # fmt: skip
    if cond_fn is not None:
        out = condition_score(diff, cond_fn, out, x_t, t, kwargs)
    # ε re-derived from x0, so that every mean type works and clipping is respected.
    eps = eps_from_pred_x0(diff, x_t, t, out.pred_x0)
    s = diff.schedule
    alpha_bar = s.extract("alphas_cumprod", t, x_t)
    alpha_bar_prev = s.extract("alphas_cumprod_prev", t, x_t)
    sigma = (
        eta
        * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    if noise is None:
        noise = draw_noise(x_t, generator)
    # 1 − ᾱ_prev − σ² is ≥ 0 exactly, but rounds below 0 in float32 when ᾱ_t ≈ 0 and η = 1
    # (the cosine schedule's last step): clamp instead of taking the root of a negative number.
    mean = (
        out.pred_x0 * torch.sqrt(alpha_bar_prev)
        + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * eps
    )
    return mean + _nonzero_mask(t, x_t) * sigma * noise, out.pred_x0


def ddim_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    timesteps: Sequence[int] | None = None,
    eta: float = 0.0,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    step_noises: Tensor | Sequence[Tensor] | None = None,
    progress: bool = False,
) -> Iterator[SampleStep]:
    """DDIM sampling from x_T = `noise`, yielding every step (t = T'−1 … 0)."""
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)

    def step(x: Tensor, t: Tensor, noise_k: Tensor | None) -> tuple[Tensor, Tensor]:
        return ddim_step(
            model_fn, diff, x, t, eta=eta, noise=noise_k, generator=generator, cond_fn=cond_fn,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip

    return _loop(step, diff, noise, step_noises, progress, "DDIM")


def ddim_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """DDIM sampling from x_T = `noise`; returns x_0. Keywords as `ddim_sample_progressive`."""
    return last_sample(ddim_sample_progressive(model_fn, diff, noise, **kwargs))


def ddim_reverse_step(
    model_fn: ModelFn,
    diff: Diffusion,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM step x_t -> x_{t+1} (the ODE run forwards, eta = 0)."""
    out = model_p_mean_variance(
        diff, model_fn, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=model_kwargs,
    )  # fmt: skip
    eps = eps_from_pred_x0(diff, x_t, t, out.pred_x0)
    alpha_bar_next = diff.schedule.extract("alphas_cumprod_next", t, x_t)
    sample = out.pred_x0 * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
    return sample, out.pred_x0


def ddim_reverse_sample(
    model_fn: ModelFn,
    diff: Diffusion,
    x0: Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> Tensor:
    """Encode x_0 into the DDIM latent by running the deterministic ODE from t = 0 to T'−1."""
    x = x0
    steps = range(diff.num_steps - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="DDIM reverse", leave=False)
    for i in steps:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            x, _ = ddim_reverse_step(
                model_fn, diff, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
            )
    return x


# ---- shared by the samplers and solvers ----------------------------------------------------------


def dynamic_threshold(pred_x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: clip x0 to the per-sample `percentile` of |x0| (at least 1)
    and rescale to [-1, 1]. Use as `denoised_fn` with `clip_denoised=False`."""
    flat = pred_x0.detach().abs().flatten(1).float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)
    s = s.view(-1, *([1] * (pred_x0.dim() - 1))).to(pred_x0.dtype)
    return pred_x0.clamp(-s, s) / s


def _loop(
    step: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]],
    diff: Diffusion,
    noise: Tensor,
    step_noises: Tensor | Sequence[Tensor] | None,
    progress: bool,
    desc: str,
) -> Iterator[SampleStep]:
    """Run `step(x, t, noise_k)` for t = T'−1 … 0 under no_grad, yielding every step."""
    x = noise
    for k, i in enumerate(steps_of(diff, progress, desc)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            x, pred_x0 = step(x, t, None if step_noises is None else step_noises[k])
        yield SampleStep(i, x, pred_x0)


def steps_of(diff: Diffusion, progress: bool, desc: str):
    """Respaced indices T'−1 … 0, with a progress bar when asked."""
    steps = range(diff.num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(steps, desc=desc, leave=False)
    return steps


def last_sample(steps: Iterator[SampleStep]) -> Tensor:
    """The final sample of a progressive sampler (runs it to the end)."""
    final = None
    for step in steps:
        final = step
    if final is None:
        raise ValueError("the diffusion has no steps")
    return final.sample
