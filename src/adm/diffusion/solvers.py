"""Fast multistep solvers on the discrete (respaced) schedule: DPM-Solver++ (2M, 3M, 2M SDE) of
Lu et al. 2022 and UniPC (bh2) of Zhao et al. 2023, all in data prediction (x0) form.

With α_i = √ᾱ_i, σ_i = √(1−ᾱ_i), λ_i = log(α_i/σ_i) at respaced index i, a step goes from index s =
i to t = i − 1 with h = λ_t − λ_s. The first-order update x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x0_s
is DDIM with η = 0; the higher orders add finite differences of earlier x0 predictions. Every solver
calls the network once per grid point (NFE = number of steps): at index 0 it returns the x0
prediction, as DDIM does. Orders are lowered at the start (too little history) and at the end
("lower order final", see `_step_order`).

Guidance as for DDIM: `cond_fn` shifts the noise (Algorithm 2 of Dhariwal & Nichol 2021) inside
`denoise`, classifier-free guidance wraps `model_fn`; `clip_denoised`/`denoised_fn` (e.g.
`dynamic_threshold`) act on x0. Drive your own loop with `denoise` + `dpm_solver_update` /
`dpm_solver_sde_update` / `unipc_update`. `known_fn(x, i)`, when given, rewrites x at every grid
point i before the network sees it (replacement inpainting, `adm.diffusion.inpaint`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from adm.diffusion.gaussian import Diffusion, Generators, ModelFn, draw_noise
from adm.diffusion.samplers import (
    CondFn,
    DenoisedFn,
    KnownFn,
    SampleStep,
    condition_score,
    last_sample,
    model_p_mean_variance,
    steps_of,
)


def denoise(
    model_fn: ModelFn,
    diff: Diffusion,
    x: Tensor,
    i: int,
    *,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
) -> Tensor:
    """The (guided) x0 prediction at respaced index `i` for the batch `x` [N, C, H, W]."""
    kwargs = model_kwargs or {}
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    with torch.no_grad():
        out = model_p_mean_variance(
            diff, model_fn, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=kwargs,
        )  # fmt: skip
    if cond_fn is not None:
        out = condition_score(diff, cond_fn, out, x, t, kwargs)
    return out.pred_x0


def _tables(diff: Diffusion) -> tuple[Tensor, Tensor, Tensor]:
    """α, σ and λ per respaced index, float64 (coefficients are formed in float64)."""
    ac = diff.schedule.table("alphas_cumprod")
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _step_order(order: int, history: int, i: int, diff: Diffusion) -> int:
    """Order of the update from index i: at most the x0's available, and "lower order final": at
    most the updates left (i) in the last updates — for second order always (as adm's 2M always
    did), for third order below 10 steps (as the official DPM-Solver) or when this λ step is over
    twice the previous one. On a discrete schedule the step into t = 0 is often by far the
    longest (evenly spaced grids: λ 6 -> 9 in one step), where third order cost 5-30x in accuracy
    on the Gaussian-ODE check; elsewhere lowering it would cap a long run at second order."""
    k = min(order, history)
    if order <= 2 or diff.num_steps < 10:
        return min(k, i)
    _, _, lam = _tables(diff)
    if i + 1 < diff.num_steps and (lam[i - 1] - lam[i]) > 2 * (lam[i] - lam[i + 1]):
        return min(k, i)
    return k


def _check_order(name: str, order: int, allowed: Sequence[int]) -> None:
    if order not in allowed:
        raise ValueError(f"{name} order must be one of {', '.join(map(str, allowed))}, got {order}")


# ---- DPM-Solver++ (Lu et al. 2022, Algorithm 2 and its third-order multistep) -------------------


def dpm_solver_update(
    diff: Diffusion, x: Tensor, i: int, x0s: Sequence[Tensor], order: int
) -> Tensor:
    """x at index i − 1 from x at index i, with x0s = [x0_i, x0_{i+1}, x0_{i+2}] (newest first;
    only the first `order` are used)."""
    alpha, sigma, lam = _tables(diff)
    h = float(lam[i - 1] - lam[i])
    ratio = float(sigma[i - 1] / sigma[i])
    coef = float(alpha[i - 1] * -torch.expm1(lam[i] - lam[i - 1]))  # α_t(1 − e^{−h})
    if order == 1:
        return ratio * x + coef * x0s[0]
    r0 = float(lam[i] - lam[i + 1]) / h
    if order == 2:
        d = (1 + 1 / (2 * r0)) * x0s[0] - (1 / (2 * r0)) * x0s[1]
        return ratio * x + coef * d
    r1 = float(lam[i + 1] - lam[i + 2]) / h
    d1_0 = (x0s[0] - x0s[1]) / r0
    d1_1 = (x0s[1] - x0s[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_1 = -coef / float(alpha[i - 1])  # e^{−h} − 1
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    a_t = float(alpha[i - 1])
    return ratio * x - a_t * phi_1 * x0s[0] + a_t * phi_2 * d1 - a_t * phi_3 * d2


def dpm_solver_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    order: int = 2,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    progress: bool = False,
    known_fn: KnownFn | None = None,
) -> Iterator[SampleStep]:
    """DPM-Solver++ (multistep, data prediction; order 1 = DDIM η=0, 2 = 2M, 3 = 3M) from
    x_T = `noise`. Deterministic: `generator` is accepted for a uniform signature and unused."""
    _check_order("DPM-Solver++", order, (1, 2, 3))
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)
    x, history = noise, []
    for i in steps_of(diff, progress, f"DPM-Solver++({order}M)"):
        x = x if known_fn is None else known_fn(x, i)
        x0 = denoise(
            model_fn, diff, x, i, cond_fn=cond_fn, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip
        history = [x0, *history][:order]
        if i > 0:
            x = dpm_solver_update(diff, x, i, history, _step_order(order, len(history), i, diff))
        else:
            x = x0
        yield SampleStep(i, x, x0)


def dpm_solver_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """DPM-Solver++ from x_T = `noise`; returns x_0. Keywords as the progressive variant."""
    return last_sample(dpm_solver_sample_progressive(model_fn, diff, noise, **kwargs))


def dpm_solver_sde_update(
    diff: Diffusion,
    x: Tensor,
    i: int,
    x0s: Sequence[Tensor],
    order: int,
    noise: Tensor,
    eta: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++ step i -> i − 1 (Lu et al. 2022, §5; midpoint form of the second order):
    x_t = (σ_t/σ_s)e^{−ηh} x_s + α_t(1 − e^{−(1+η)h}) D + σ_t √(1 − e^{−2ηh}) z, with D = x0_s at
    first order and x0_s + (x0_s − x0_s')/(2r) at second. η = 1 is the SDE, η = 0 the ODE (2M)."""
    alpha, sigma, lam = _tables(diff)
    h = float(lam[i - 1] - lam[i])
    decay = float(sigma[i - 1] / sigma[i]) * float(torch.exp(torch.tensor(-eta * h)))
    coef = float(alpha[i - 1]) * -float(torch.expm1(torch.tensor(-(1 + eta) * h)))
    spread = float(sigma[i - 1]) * float(torch.sqrt(-torch.expm1(torch.tensor(-2 * eta * h))))
    d = x0s[0]
    if order == 2:
        r = float(lam[i] - lam[i + 1]) / h
        d = x0s[0] + (x0s[0] - x0s[1]) / (2 * r)
    return decay * x + coef * d + spread * noise


def dpm_solver_sde_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    order: int = 2,
    eta: float = 1.0,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    step_noises: Tensor | Sequence[Tensor] | None = None,
    progress: bool = False,
    known_fn: KnownFn | None = None,
) -> Iterator[SampleStep]:
    """DPM-Solver++(2M) SDE from x_T = `noise`; fresh noise at every update comes from
    `step_noises[k]` or `generator` (one per sample: independent of the batch)."""
    _check_order("DPM-Solver++ SDE", order, (1, 2))
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)
    x, history = noise, []
    for k, i in enumerate(steps_of(diff, progress, "DPM-Solver++(2M) SDE")):
        x = x if known_fn is None else known_fn(x, i)
        x0 = denoise(
            model_fn, diff, x, i, cond_fn=cond_fn, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip
        history = [x0, *history][:order]
        if i == 0:
            x = x0
        else:
            z = step_noises[k] if step_noises is not None else draw_noise(x, generator)
            step_order = _step_order(order, len(history), i, diff)
            x = dpm_solver_sde_update(diff, x, i, history, step_order, z, eta)
        yield SampleStep(i, x, x0)


def dpm_solver_sde_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """DPM-Solver++(2M) SDE from x_T = `noise`; returns x_0."""
    return last_sample(dpm_solver_sde_sample_progressive(model_fn, diff, noise, **kwargs))


# ---- UniPC (Zhao et al. 2023): predictor UniP + corrector UniC, B(h) = e^h − 1 ("bh2") --------


def _unipc_coefficients(hh: float, order: int) -> tuple[float, float, list[float]]:
    """(h·φ_1(h), B(h), b_1..b_order) for data prediction (hh = −h)."""
    h_phi_1 = float(torch.expm1(torch.tensor(hh, dtype=torch.float64)))
    b_h = h_phi_1  # bh2
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def unipc_update(
    diff: Diffusion,
    x: Tensor,
    i: int,
    x0s: Sequence[Tensor],
    order: int,
    *,
    x0_at_target: Tensor | None = None,
) -> Tensor:
    """UniP (predictor) from index i to i − 1 with x0s = [x0_i, x0_{i+1}, …] (newest first,
    `order` of them); given `x0_at_target` (the x0 predicted at index i − 1 from this prediction),
    UniC (corrector) of the same step instead, one order higher at no extra network call."""
    alpha, sigma, lam = _tables(diff)
    h = float(lam[i - 1] - lam[i])
    m0 = x0s[0]
    rks, d1s = [], []
    for j in range(1, order):
        rk = float(lam[i + j] - lam[i]) / h
        rks.append(rk)
        d1s.append((x0s[j] - m0) / rk)
    rks.append(1.0)
    h_phi_1, b_h, b = _unipc_coefficients(-h, order)
    r = torch.tensor(rks, dtype=torch.float64)
    big_r = torch.stack([r**p for p in range(order)])  # [order, order]
    b_vec = torch.tensor(b, dtype=torch.float64)
    base = float(sigma[i - 1] / sigma[i]) * x - float(alpha[i - 1]) * h_phi_1 * m0
    a_t = float(alpha[i - 1])
    if x0_at_target is None:
        if not d1s:
            return base
        rhos = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b_vec[:-1]).tolist()
        res = sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
        return base - a_t * b_h * res
    rhos = [0.5] if order == 1 else torch.linalg.solve(big_r, b_vec).tolist()
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return base - a_t * b_h * (res + rhos[-1] * (x0_at_target - m0))


def unipc_sample_progressive(
    model_fn: ModelFn,
    diff: Diffusion,
    noise: Tensor,
    *,
    order: int = 2,
    timesteps: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn | None = None,
    model_kwargs: dict | None = None,
    generator: Generators = None,
    progress: bool = False,
    known_fn: KnownFn | None = None,
) -> Iterator[SampleStep]:
    """UniPC-bh2 (order 2 or 3) from x_T = `noise`: at each grid point the new x0 corrects the
    previous step (UniC), then the predictor (UniP) takes the next step. Deterministic."""
    _check_order("UniPC", order, (2, 3))
    if timesteps is not None:
        diff = diff.with_timesteps(timesteps)
    x, history, last = noise, [], None  # last = (x before the step, its history, its order)
    for i in steps_of(diff, progress, f"UniPC-{order}"):
        x = x if known_fn is None else known_fn(x, i)
        x0 = denoise(
            model_fn, diff, x, i, cond_fn=cond_fn, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )  # fmt: skip
        if last is not None and i > 0:
            x_prev, prev_history, prev_order = last
            x = unipc_update(diff, x_prev, i + 1, prev_history, prev_order, x0_at_target=x0)
        history = [x0, *history][:order]
        if i == 0:
            x = x0
        else:
            step_order = _step_order(order, len(history), i, diff)
            last = (x, history[:step_order], step_order)
            x = unipc_update(diff, x, i, history[:step_order], step_order)
        yield SampleStep(i, x, x0)


def unipc_sample(model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """UniPC-bh2 from x_T = `noise`; returns x_0."""
    return last_sample(unipc_sample_progressive(model_fn, diff, noise, **kwargs))
