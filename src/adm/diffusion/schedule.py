"""Noise schedules and timestep respacing (Ho et al. 2020 §4, Nichol & Dhariwal 2021 §3.2, §4).

Owns the beta schedules (linear, cosine), the immutable `NoiseSchedule` with every derived table
in float64, and respacing from the original's strings ("250", "10,10,10", "ddim25") to a shorter
schedule whose `timestep_map` sends each respaced index back to its original timestep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

ScheduleName = Literal["linear", "cosine"]


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule 1e-4..0.02 for T=1000, scaled by 1000/T for other T."""
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ᾱ(u) = cos²((u + s)/(1 + s)·π/2), s=0.008.

    β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), computed with Python floats as the original.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def named_betas(name: str, num_steps: int) -> np.ndarray:
    """Betas of the named schedule ("linear" or "cosine") with `num_steps` steps, float64."""
    if num_steps < 1:
        raise ValueError(f"number of diffusion steps must be positive, got {num_steps}")
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}: expected 'linear' or 'cosine'")


def space_timesteps(num_steps: int, respacing: str | list[int] | tuple[int, ...]) -> list[int]:
    """Original timesteps kept by a respacing, sorted (improved-diffusion `space_timesteps`).

    "ddimN": the smallest integer stride s with len(range(0, T, s)) == N, i.e. 0, s, 2s, ...
    "a,b,c" (or a list): T is split into len(list) near-equal sections (the first T % n get one
    extra step); section i keeps count_i steps at `start + round(cur)` where `cur` grows by repeated
    float addition of (size-1)/(count-1) and `round` is half-to-even — both kept from the original
    because released results depend on exactly which steps are used ("25" has exact .5 ties).
    """
    spec = respacing if isinstance(respacing, str) else ",".join(str(c) for c in respacing)
    if isinstance(respacing, str) and respacing.startswith("ddim"):
        count = _parse_count(respacing, respacing[len("ddim") :])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return list(range(0, num_steps, stride))
        raise ValueError(
            f"invalid respacing {spec!r} for {num_steps} steps: no integer stride gives exactly "
            f"{count} steps"
        )
    counts = [_parse_count(spec, part) for part in spec.split(",")]
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"invalid respacing {spec!r} for {num_steps} steps: section {i} has {size} steps, "
                f"cannot take {count} (section larger than the number of steps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def _parse_count(spec: str, text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(
            f"invalid respacing {spec!r}: expected a step count such as '250', section counts "
            "such as '10,10,10', or 'ddimN' such as 'ddim25'"
        ) from None
    if count < 1:
        raise ValueError(f"invalid respacing {spec!r}: step counts must be positive, got {count}")
    return count


def _log0(a: np.ndarray) -> np.ndarray:
    """np.log without the divide-by-zero warning for exact zeros (they give -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(a)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete forward process: betas plus every derived table, all float64 and read-only.

    `timestep_map[k]` is the original timestep of index k (the identity when not respaced); the
    network and the classifier always receive original timesteps (`network_timesteps`).
    Coefficients are taken from these float64 tables and rounded to float32 at extraction
    (`extract`), exactly as the original, so that all tensor maths is float32.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    original_num_steps: int
    rescale_timesteps: bool = False
    base: NoiseSchedule | None = field(default=None, repr=False)  # the un-respaced schedule
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_next: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    log_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not (betas > 0).all():
            raise ValueError("every beta must be positive")
        if not (betas < 1).all():
            # The original accepts β = 1 and then produces inf/NaN (linear schedule, T <= 20).
            raise ValueError(
                f"every beta must be below 1, but beta[{int(np.argmax(betas >= 1))}] = "
                f"{betas.max():g} (the linear schedule's last beta is 0.02·1000/T, so it needs "
                "T > 20; use the cosine schedule for short chains)"
            )
        tmap = np.asarray(self.timestep_map, dtype=np.int64)
        if tmap.shape != betas.shape:
            raise ValueError(f"timestep_map has {len(tmap)} entries for {len(betas)} betas")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas,
            "timestep_map": tmap,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": ac_next,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            # The posterior variance is 0 at t=0; its log is clipped to the value at t=1.
            # (one step: log 0 = -inf, as the original; never used, the last step adds no noise)
            "posterior_log_variance_clipped": _log0(
                np.append(post_var[1], post_var[1:]) if len(betas) > 1 else post_var
            ),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        for name, value in tables.items():
            object.__setattr__(self, name, _readonly(value))
        object.__setattr__(self, "_torch_tables", {})

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @classmethod
    def from_name(
        cls, name: str, num_steps: int, *, rescale_timesteps: bool = False
    ) -> NoiseSchedule:
        """The named schedule ("linear" / "cosine") with `num_steps` steps, not respaced."""
        betas = named_betas(name, num_steps)
        return cls(betas, np.arange(num_steps), num_steps, rescale_timesteps)

    def respace(self, respacing: str | list[int] | tuple[int, ...]) -> NoiseSchedule:
        """Keep the timesteps chosen by `respacing` ("" = keep all) and re-derive the betas."""
        if respacing == "":
            self._check_original()
            return self
        return self.keep(space_timesteps(self.num_steps, respacing))

    def keep(self, timesteps: Sequence[int]) -> NoiseSchedule:
        """The schedule on these original timesteps (any order, distinct, in [0, T)).

        β'_k = 1 − ᾱ(kept_k) / ᾱ(kept_{k−1}), so ᾱ' equals ᾱ at every kept step.
        """
        self._check_original()
        kept = set(int(t) for t in timesteps)
        if len(kept) != len(timesteps) or not kept or not kept <= set(range(self.num_steps)):
            raise ValueError(
                f"timesteps to keep must be distinct and in [0, {self.num_steps - 1}], got "
                f"{sorted(timesteps)[:8]}"
            )
        betas, tmap, last = [], [], 1.0
        for i, ac in enumerate(self.alphas_cumprod):
            if i in kept:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return NoiseSchedule(
            np.array(betas), np.array(tmap), self.original_num_steps, self.rescale_timesteps, self
        )

    def _check_original(self) -> None:
        if self.num_steps != self.original_num_steps:
            raise ValueError("respace the original schedule, not an already respaced one")

    @property
    def original(self) -> NoiseSchedule:
        """The un-respaced schedule this one was respaced from (itself when not respaced)."""
        return self.base if self.base is not None else self

    def table(self, name: str) -> torch.Tensor:
        """A table as a CPU tensor (float64; int64 for timestep_map), cached; also accepts the
        derived names of `_derived`."""
        cache: dict[str, torch.Tensor] = self._torch_tables  # type: ignore[attr-defined]
        if name not in cache:
            cache[name] = torch.from_numpy(np.array(self._derived(name)))
        return cache[name]

    def _derived(self, name: str) -> np.ndarray:
        if name == "one_minus_alphas_cumprod":
            return 1.0 - self.alphas_cumprod
        if name == "log_betas":
            return np.log(self.betas)
        if name == "fixed_large_variance":
            # β_t, except at t=0 where the posterior variance at t=1 gives a better decoder NLL.
            return np.append(self.posterior_variance[1], self.betas[1:])
        if name == "fixed_large_log_variance":
            return np.log(self._derived("fixed_large_variance"))
        if name == "recip_posterior_mean_coef1":
            return 1.0 / self.posterior_mean_coef1
        if name == "posterior_mean_coef2_over_coef1":
            return self.posterior_mean_coef2 / self.posterior_mean_coef1
        return getattr(self, name)

    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at indices `t` [N], rounded to float32, shaped [N, 1, ...] to broadcast
        against `like` [N, ...] (the original's `_extract_into_tensor` rule)."""
        values = self.table(name)[t.detach().cpu().long()].to(torch.float32)
        values = values.to(like.device)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def network_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps the network receives for respaced indices `t`: the original timestep
        (int64), or `orig · 1000 / T_orig` as float32 when `rescale_timesteps`."""
        orig = self.table("timestep_map")[t.detach().cpu().long()].to(t.device)
        if self.rescale_timesteps:
            return orig.float() * (1000.0 / self.original_num_steps)
        return orig
