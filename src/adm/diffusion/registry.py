"""Samplers by name, for the command line, the demo and sweeps: one call, the options that apply
to each sampler, and its number of network calls (NFE) per grid of N timesteps.

| name | method | NFE | stochastic | options |
| --- | --- | --- | --- | --- |
| `ddpm` | ancestral sampling (Ho et al. 2020) | N | yes | |
| `ddim` | DDIM (Song et al. 2021) | N | if η > 0 | `eta` (default 0) |
| `dpm++2m` | DPM-Solver++(2M) (Lu et al. 2022) | N | no | |
| `dpm++3m` | DPM-Solver++(3M) | N | no | |
| `dpm++2m-sde` | SDE-DPM-Solver++(2M) | N | yes | `eta` (default 1) |
| `unipc` | UniPC-bh2 (Zhao et al. 2023) | N | no | `order` 2 (default) or 3 |
| `heun` | EDM deterministic Heun (Karras et al. 2022, Alg. 1) | 2N − 1 | no | |
| `edm` | EDM stochastic (Alg. 2) | 2N − 1 | yes | `churn`, `s_noise`, `s_tmin`, `s_tmax` |

NFE counts forward passes of the diffusion network; classifier-free guidance batches its two
halves into one pass, and classifier guidance adds one classifier forward + backward per NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import get_args

from torch import Tensor

from adm.diffusion import edm, samplers, solvers
from adm.diffusion.gaussian import Diffusion, ModelFn
from adm.diffusion.names import SAMPLER_NAMES, SamplerName
from adm.diffusion.samplers import SampleStep, last_sample

assert get_args(SamplerName) == SAMPLER_NAMES


@dataclass(frozen=True)
class SamplerInfo:
    progressive: Callable[..., Iterator[SampleStep]]
    fixed: dict  # keyword arguments that define the sampler (e.g. order=3)
    options: tuple[str, ...]  # keyword options the user may set
    stochastic: bool
    calls_per_step: int  # network calls per grid point (the last one always costs 1)
    min_steps: int = 1


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(samplers.ddpm_sample_progressive, {}, (), True, 1),
    "ddim": SamplerInfo(samplers.ddim_sample_progressive, {}, ("eta",), False, 1),
    "dpm++2m": SamplerInfo(solvers.dpm_solver_sample_progressive, {"order": 2}, (), False, 1),
    "dpm++3m": SamplerInfo(solvers.dpm_solver_sample_progressive, {"order": 3}, (), False, 1),
    "dpm++2m-sde": SamplerInfo(
        solvers.dpm_solver_sde_sample_progressive, {"order": 2}, ("eta",), True, 1
    ),
    "unipc": SamplerInfo(solvers.unipc_sample_progressive, {}, ("order",), False, 1),
    "heun": SamplerInfo(edm.edm_sample_progressive, {"churn": 0.0}, (), False, 2, min_steps=2),
    "edm": SamplerInfo(
        edm.edm_sample_progressive,
        {"churn": edm.EDM_CHURN},
        ("churn", "s_noise", "s_tmin", "s_tmax"),
        True,
        2,
        min_steps=2,
    ),
}


def sampler_info(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "eta": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "order": (lambda v: v in (2, 3), "2 or 3"),
    "churn": (lambda v: v >= 0, ">= 0"),
    "s_noise": (lambda v: v > 0, "> 0"),
    "s_tmin": (lambda v: v >= 0, ">= 0"),
    "s_tmax": (lambda v: v >= 0, ">= 0"),
}


def check_options(name: str, **options: float | None) -> None:
    """Raise ValueError unless every option given (not None) belongs to sampler `name` and is in
    range (DDIM's eta may also exceed 1, as in the original)."""
    info = sampler_info(name)
    for key, value in options.items():
        if value is None:
            continue
        if key not in info.options:
            have = ", ".join(info.options) or "none"
            raise ValueError(f"sampler {name!r} has no option {key!r} (its options: {have})")
        ok, rule = _RULES[key]
        if name == "ddim" and key == "eta":
            ok, rule = (lambda v: v >= 0), ">= 0"
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"{key} of sampler {name!r} must be {rule}, got {value}")


def nfe(name: str, steps: int) -> int:
    """Network calls of sampler `name` over a grid of `steps` timesteps."""
    info = sampler_info(name)
    return info.calls_per_step * (steps - 1) + 1


def sample_progressive(
    name: str, model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs
) -> Iterator[SampleStep]:
    """Run sampler `name`. `kwargs`: the common keywords of every sampler (`timesteps`, `cond_fn`,
    `clip_denoised`, `denoised_fn`, `model_kwargs`, `generator`, `progress`) plus the sampler's own
    options (see the table); an option that is None takes the sampler's default, an option the
    sampler does not have is an error."""
    info = sampler_info(name)
    options = {k: kwargs.pop(k) for k in ("eta", "order", "churn", "s_noise", "s_tmin", "s_tmax")
               if k in kwargs}  # fmt: skip
    check_options(name, **options)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    steps = diff.num_steps if kwargs.get("timesteps") is None else len(kwargs["timesteps"])
    if steps < info.min_steps:
        raise ValueError(f"sampler {name!r} needs at least {info.min_steps} steps, got {steps}")
    return info.progressive(model_fn, diff, noise, **{**info.fixed, **kwargs})


def sample(name: str, model_fn: ModelFn, diff: Diffusion, noise: Tensor, **kwargs) -> Tensor:
    """Run sampler `name` from x_T = `noise`; returns x_0 (keywords as `sample_progressive`)."""
    return last_sample(sample_progressive(name, model_fn, diff, noise, **kwargs))
