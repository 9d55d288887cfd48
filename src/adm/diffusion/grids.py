"""Timestep grids: which of the T trained timesteps a sampler visits, for every sampler.

A grid is a strictly decreasing list of original timesteps (T−1 … 0). Respacing a schedule to a
grid keeps ᾱ exactly at the chosen steps (`NoiseSchedule.respace`), so every sampler runs on any
grid unchanged. The names, for N steps:

- `uniform`: the original's "N" respacing (evenly spaced, rounded half-to-even).
- `ddim`: the DDIM strides 0, s, 2s, … (the original's "ddimN").
- `logsnr`: uniform in λ = log(ᾱ/(1−ᾱ)) = −2 log σ from λ_min to λ(0) (Lu et al. 2022,
  DPM-Solver), with λ_min = λ at σ_max below.
- `quadratic`: uniform in √t, i.e. quadratic in time (DPM-Solver's "time_quadratic").
- `karras`: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ with ρ = 7 and
  σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022, Eq. 5), from σ_max to σ_min = σ(0).

Both continuous grids start at σ_max = min(80, σ(T−1)), EDM's setting for the ADM models: the
cosine schedule's σ(T−1) is ~10⁴ (λ ≈ −20), where nothing is left of the image, and a grid
uniform in λ from there put a third of its steps below σ = 80 — measured on the bundled cosine
model: FID 70–190 at 10 steps instead of 16–30 (docs/sampling.md).
- `trailing`: round(T − k·T/N) − 1, which starts exactly at T−1 (Lin et al. 2024, Table 2).

Continuous targets (λ, √t, σ) are mapped to the *nearest* trained timestep (nearest in λ, √t or
log σ), not interpolated: ADM networks were trained on integer timesteps only, and nearest steps
keep the respaced tables exact. Where two targets round to one step (large N, at the low-noise end
of `logsnr`/`karras`), the later ones are moved to the next free steps, so a grid always has
exactly N distinct steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from adm.diffusion.names import GRID_NAMES as GRIDS
from adm.diffusion.schedule import space_timesteps

KARRAS_RHO = 7.0
KARRAS_SIGMA_MAX = 80.0  # Karras et al. 2022, Table 1 (their ADM / iDDPM sampling range)


def timestep_grid(
    name: str,
    steps: int,
    alphas_cumprod: Sequence[float] | np.ndarray,
    *,
    rho: float = KARRAS_RHO,
    sigma_max: float = KARRAS_SIGMA_MAX,
) -> list[int]:
    """The grid `name` with `steps` original timesteps, largest first, for a schedule whose
    un-respaced ᾱ table is `alphas_cumprod` (length T). `rho` shapes `karras`; `sigma_max` caps
    where `karras` and `logsnr` start."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    num = len(ac)
    if name not in GRIDS:
        raise ValueError(f"unknown timestep grid {name!r}: expected one of {', '.join(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    if steps > num:
        raise ValueError(f"{steps} steps asked, but the diffusion has only {num} timesteps")
    if name == "uniform":
        return sorted(space_timesteps(num, str(steps)), reverse=True)
    if name == "ddim":
        return sorted(space_timesteps(num, f"ddim{steps}"), reverse=True)
    if name == "trailing":
        kept = np.round(np.arange(num, 0, -num / steps)).astype(np.int64) - 1
        return _distinct(kept[:steps], num)
    if steps == 1:
        return [num - 1]
    if name == "quadratic":
        targets, axis = np.linspace(np.sqrt(num - 1), 0.0, steps), np.sqrt(np.arange(num))
    elif name == "logsnr":
        axis = np.log(ac) - np.log1p(-ac)  # λ(t), decreasing in t
        targets = np.linspace(max(axis[-1], -2 * np.log(sigma_max)), axis[0], steps)
    else:  # karras
        axis = 0.5 * (np.log1p(-ac) - np.log(ac))  # log σ(t), increasing in t
        s_max, s_min = min(np.exp(axis[-1]), sigma_max), np.exp(axis[0])
        ramp = np.linspace(0.0, 1.0, steps)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        targets = np.log(sigmas)
    nearest = np.abs(axis[None, :] - targets[:, None]).argmin(axis=1)
    return _distinct(nearest, num)


def _distinct(timesteps: np.ndarray, num: int) -> list[int]:
    """Make a non-increasing list of n timesteps in [0, num) strictly decreasing: a repeated step
    moves to the next free one below it (and, at the bottom, back up), keeping both ends."""
    ts = [int(t) for t in np.clip(timesteps, 0, num - 1)]
    n = len(ts)
    for k in range(1, n):  # downwards: each step below the previous one
        ts[k] = min(ts[k], ts[k - 1] - 1)
    for k in range(n - 1, -1, -1):  # upwards: room for the steps still to come
        ts[k] = max(ts[k], n - 1 - k)
        if k < n - 1:
            ts[k] = max(ts[k], ts[k + 1] + 1)
    return ts


def check_timesteps(timesteps: Sequence[int], num: int) -> list[int]:
    """`timesteps` as a list of ints after checking it is a usable grid for `num` trained steps:
    non-empty, integers, strictly decreasing, within [0, num)."""
    ts = list(timesteps)
    if not ts:
        raise ValueError("timesteps is empty: give at least one timestep")
    if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ts):
        raise ValueError(f"timesteps must be integers (original timesteps), got {ts[:5]}")
    ts = [int(t) for t in ts]
    bad = [t for t in ts if not 0 <= t < num]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {num - 1}]; got {bad[0]}")
    for a, b in itertools.pairwise(ts):
        if b >= a:
            raise ValueError(
                f"timesteps must be strictly decreasing (largest first), but {a} is followed by {b}"
            )
    return ts
