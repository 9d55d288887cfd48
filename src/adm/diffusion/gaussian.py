"""Gaussian diffusion maths on tensors (Ho et al. 2020; Nichol & Dhariwal 2021, "improved DDPM").

Owns the forward process q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the reverse-process
parameters p(x_{t-1} | x_t) computed from a network's *output* (mean types eps / x0 / prev-x,
variances fixed or learned), the training losses (MSE, hybrid with stop-gradient, KL), the
variational bound in bits/dim and the likelihood primitives. Functions take tensors, never models,
except the two loops that must call the network (`training_losses`, `calc_bpd_loop`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from adm.diffusion.grids import check_timesteps, timestep_grid
from adm.diffusion.schedule import NoiseSchedule, ScheduleName

MeanType = Literal["eps", "x0", "prev_x"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
LossType = Literal["mse", "rescaled_mse", "kl", "rescaled_kl"]
Generators = torch.Generator | Sequence[torch.Generator] | None
ModelFn = Callable[..., Tensor]


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything that defines a diffusion process and how the network output is read.

    `timestep_respacing` uses the original's strings: "" (none), "250", "10,10,10", "ddim25".
    """

    steps: int = 1000
    noise_schedule: ScheduleName = "linear"
    mean_type: MeanType = "eps"
    var_type: VarType = "fixed_large"
    loss_type: LossType = "mse"
    rescale_timesteps: bool = False
    timestep_respacing: str = ""

    @property
    def learn_sigma(self) -> bool:
        return self.var_type in ("learned", "learned_range")


@dataclass(frozen=True, eq=False)
class Diffusion:
    """A (possibly respaced) schedule plus the parametrisation of the network output."""

    schedule: NoiseSchedule
    mean_type: MeanType = "eps"
    var_type: VarType = "fixed_large"
    loss_type: LossType = "mse"

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        base = NoiseSchedule.from_name(
            config.noise_schedule, config.steps, rescale_timesteps=config.rescale_timesteps
        )
        return cls(
            base.respace(config.timestep_respacing),
            config.mean_type,
            config.var_type,
            config.loss_type,
        )

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def with_timesteps(self, timesteps: Sequence[int]) -> Diffusion:
        """This diffusion respaced to `timesteps` (original timesteps, strictly decreasing, e.g.
        from `adm.diffusion.grids.timestep_grid`), whatever respacing it had before."""
        base = self.schedule.original
        kept = check_timesteps(timesteps, base.num_steps)
        return dataclasses.replace(self, schedule=base.keep(kept))

    def grid(self, name: str, steps: int) -> Diffusion:
        """This diffusion on the named timestep grid (`adm.diffusion.grids`) with `steps` steps."""
        base = self.schedule.original
        return self.with_timesteps(timestep_grid(name, steps, base.alphas_cumprod))


class PMeanVar(NamedTuple):
    """Parameters of p(x_{t-1} | x_t); variance and log_variance have x_t's shape."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return x.mean(dim=list(range(1, x.dim())))


def draw_noise(like: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like `like`. With one generator per sample, sample i's noise
    depends only on its own generator, not on the batch it is drawn in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=_gen_device(generator, like)).to(
            like.device, like.dtype
        )
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(like.device, like.dtype)


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return like.device if generator is None else generator.device


# ---- forward process and posterior (Ho et al. Eq. 4, 6, 7) -------------------------------------


def q_mean_variance(diff: Diffusion, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): mean, variance, log variance."""
    s = diff.schedule
    mean = s.extract("sqrt_alphas_cumprod", t, x0) * x0
    variance = s.extract("one_minus_alphas_cumprod", t, x0).expand_as(x0)
    log_variance = s.extract("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
    return mean, variance, log_variance


def q_sample(diff: Diffusion, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
    """Draw x_t ~ q(x_t | x_0): √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    if noise is None:
        noise = torch.randn_like(x0)
    s = diff.schedule
    return (
        s.extract("sqrt_alphas_cumprod", t, x0) * x0
        + s.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )


def q_posterior(
    diff: Diffusion, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 7): mean, variance β̃_t, clipped log variance."""
    s = diff.schedule
    mean = (
        s.extract("posterior_mean_coef1", t, x_t) * x0
        + s.extract("posterior_mean_coef2", t, x_t) * x_t
    )
    variance = s.extract("posterior_variance", t, x_t).expand_as(x_t)
    log_variance = s.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
    return mean, variance, log_variance


def pred_x0_from_eps(diff: Diffusion, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε."""
    s = diff.schedule
    return (
        s.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        - s.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
    )


def eps_from_pred_x0(diff: Diffusion, x_t: Tensor, t: Tensor, pred_x0: Tensor) -> Tensor:
    """ε = (√(1/ᾱ_t) x_t − x_0) / √(1/ᾱ_t − 1)."""
    s = diff.schedule
    return (s.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_x0) / s.extract(
        "sqrt_recipm1_alphas_cumprod", t, x_t
    )


def _pred_x0_from_prev_x(diff: Diffusion, x_t: Tensor, t: Tensor, prev_x: Tensor) -> Tensor:
    s = diff.schedule
    return (
        s.extract("recip_posterior_mean_coef1", t, x_t) * prev_x
        - s.extract("posterior_mean_coef2_over_coef1", t, x_t) * x_t
    )


# ---- reverse process from the network output ----------------------------------------------------


def split_output(
    diff: Diffusion, model_output: Tensor, x_t: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Split a network output [N, C or 2C, ...] into (mean part, variance part or None)."""
    channels = x_t.shape[1]
    if diff.var_type in ("learned", "learned_range"):
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"a learned-variance diffusion needs {2 * channels} output channels "
                f"(mean then variance), got {model_output.shape[1]}"
            )
        return model_output[:, :channels], model_output[:, channels:]
    if model_output.shape[1] != channels:
        raise ValueError(
            f"a fixed-variance diffusion needs {channels} output channels, "
            f"got {model_output.shape[1]}"
        )
    return model_output, None


def p_mean_variance(
    diff: Diffusion,
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
) -> PMeanVar:
    """p(x_{t-1} | x_t) from the network output at x_t.

    Variance: fixed β̃_t / β_t, learned log Σ, or learned-range Σ = exp(v' log β_t + (1 − v')
    log β̃_t) with v' = (v + 1)/2 (Eq. 15 of Nichol & Dhariwal 2021). The predicted x_0 passes
    through `denoised_fn`, then is clipped to [-1, 1] if `clip_denoised`; the mean is the posterior
    mean at that x_0 (except for prev-x prediction, where the output is the mean).
    """
    s = diff.schedule
    mean_part, v = split_output(diff, model_output, x_t)
    if diff.var_type == "learned":
        log_variance = v
        variance = torch.exp(log_variance)
    elif diff.var_type == "learned_range":
        min_log = s.extract("posterior_log_variance_clipped", t, x_t)
        max_log = s.extract("log_betas", t, x_t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = torch.exp(log_variance)
    elif diff.var_type == "fixed_large":
        variance = s.extract("fixed_large_variance", t, x_t).expand_as(x_t)
        log_variance = s.extract("fixed_large_log_variance", t, x_t).expand_as(x_t)
    else:  # fixed_small; note the variance is 0 at t=0 while its log is the clipped one
        variance = s.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = s.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)

    def process(x: Tensor) -> Tensor:
        if denoised_fn is not None:
            x = denoised_fn(x)
        return x.clamp(-1, 1) if clip_denoised else x

    if diff.mean_type == "prev_x":
        pred_x0 = process(_pred_x0_from_prev_x(diff, x_t, t, mean_part))
        mean = mean_part
    else:
        raw = mean_part if diff.mean_type == "x0" else pred_x0_from_eps(diff, x_t, t, mean_part)
        pred_x0 = process(raw)
        mean, _, _ = q_posterior(diff, pred_x0, x_t, t)
    return PMeanVar(mean, variance, log_variance, pred_x0)


# ---- likelihood primitives -----------------------------------------------------------------------


def normal_kl(
    mean1: Tensor, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    ref = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor))
    logvar1, logvar2 = (
        x if isinstance(x, Tensor) else torch.tensor(x).to(ref) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), as in the original."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data x ∈ {k/127.5 − 1} under N(means, e^{2·log_scales}) integrated over
    each bin of width 2/255 (Ho et al. §3.3); the edge bins extend to ±∞. In nats, elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# ---- variational bound and losses ----------------------------------------------------------------


def vb_terms_bpd(
    diff: Diffusion,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
) -> tuple[Tensor, Tensor]:
    """One term of the variational bound in bits/dim, per example: L_{t-1} = KL(q(x_{t-1}|x_t,x_0)
    || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL L_0 at t = 0. Returns (terms [N], pred_x0)."""
    true_mean, _, true_log_var = q_posterior(diff, x0, x_t, t)
    out = p_mean_variance(diff, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
        x0, means=out.mean, log_scales=0.5 * out.log_variance
    )
    nll = mean_flat(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl), out.pred_x0


def losses_from_output(
    diff: Diffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
) -> dict[str, Tensor]:
    """Per-example training losses from the network output at x_t = q_sample(x0, t, noise).

    MSE on the predicted quantity; with a learned variance the hybrid objective adds L_vlb computed
    on a *detached* mean so that it trains only Σ (Nichol & Dhariwal §3.1), scaled by T/1000 for
    "rescaled_mse". KL losses are the bound itself (times T for "rescaled_kl").
    Returns "loss" and "mse" (+ "vb" with a learned variance), or "loss" for KL losses.
    """
    if diff.loss_type in ("kl", "rescaled_kl"):
        loss, _ = vb_terms_bpd(diff, model_output, x0, x_t, t, clip_denoised=False)
        if diff.loss_type == "rescaled_kl":
            loss = loss * diff.num_steps
        return {"loss": loss}
    mean_part, v = split_output(diff, model_output, x_t)
    terms: dict[str, Tensor] = {}
    if v is not None:
        frozen = torch.cat([mean_part.detach(), v], dim=1)
        vb, _ = vb_terms_bpd(diff, frozen, x0, x_t, t, clip_denoised=False)
        if diff.loss_type == "rescaled_mse":
            # λ = 0.001 times T·L_t: the bound is a sum over T terms, the MSE a mean.
            vb = vb * (diff.num_steps / 1000.0)
        terms["vb"] = vb
    if diff.mean_type == "prev_x":
        target = q_posterior(diff, x0, x_t, t)[0]
    else:
        target = x0 if diff.mean_type == "x0" else noise
    terms["mse"] = mean_flat((target - mean_part) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


def training_losses(
    diff: Diffusion,
    model_fn: ModelFn,
    x0: Tensor,
    t: Tensor,
    *,
    noise: Tensor | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """Noise x0 to x_t, run `model_fn(x_t, original_t, **model_kwargs)` once, return the losses."""
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(diff, x0, t, noise)
    out = model_fn(x_t, diff.schedule.network_timesteps(t), **(model_kwargs or {}))
    return losses_from_output(diff, out, x0, x_t, t, noise)


def prior_bpd(diff: Diffusion, x0: Tensor) -> Tensor:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (the prior term of the bound)."""
    t = torch.full((x0.shape[0],), diff.num_steps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = q_mean_variance(diff, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def calc_bpd_loop(
    diff: Diffusion,
    model_fn: ModelFn,
    x0: Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    noises: Tensor | Sequence[Tensor] | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The full variational bound in bits/dim (Nichol & Dhariwal §3.1, Eq. 4-6).

    Runs t = T−1 down to 0 with fresh noise each step (`noises[k]` at loop step k if given, else
    drawn from `generator`). Per-timestep terms are [N, T] in loop order, as the original: column 0
    is t = T−1. Returns total_bpd, prior_bpd, vb, xstart_mse, mse.
    """
    vb, xstart_mse, mse = [], [], []
    steps = list(range(diff.num_steps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="bits/dim", leave=False)
    for k, i in enumerate(steps):
        t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
        noise = noises[k] if noises is not None else draw_noise(x0, generator)
        x_t = q_sample(diff, x0, t, noise)
        with torch.no_grad():
            out = model_fn(x_t, diff.schedule.network_timesteps(t), **(model_kwargs or {}))
            term, pred_x0 = vb_terms_bpd(diff, out, x0, x_t, t, clip_denoised=clip_denoised)
        vb.append(term)
        xstart_mse.append(mean_flat((pred_x0 - x0) ** 2))
        mse.append(mean_flat((eps_from_pred_x0(diff, x_t, t, pred_x0) - noise) ** 2))
    vb_t = torch.stack(vb, dim=1)
    prior = prior_bpd(diff, x0)
    return {
        "total_bpd": vb_t.sum(dim=1) + prior,
        "prior_bpd": prior,
        "vb": vb_t,
        "xstart_mse": torch.stack(xstart_mse, dim=1),
        "mse": torch.stack(mse, dim=1),
    }
