"""Guidance (Dhariwal & Nichol 2021 §4; Ho & Salimans 2021): classifier and classifier-free.

`classifier_cond_fn(classifier, scale)` returns `cond_fn(x_t, t, y=...)` = scale·∇_x log p(y|x_t)
from a noisy classifier that receives the original timesteps. Samplers apply it as a mean shift
(ancestral, Algorithm 1) or a noise shift (DDIM and ODE solvers, Algorithm 2).
`classifier_free_model_fn(model_fn, w, null_label=...)` wraps a label-dropout-trained model.
Both work with every sampler, together too. `unconditional_model_fn(model)` guides a model that
takes no labels (the labels in `model_kwargs` then go to the classifier only).

Guidance interval (Kynkäänniemi et al. 2024): `interval=(lo, hi)` on either guidance applies it only
where σ = √((1−ᾱ_t)/ᾱ_t) of the timestep the network receives lies in [lo, hi]; elsewhere the
classifier gradient is zero and classifier-free guidance returns the conditional prediction
(its w = 1), in one forward instead of two. The σ table comes from the diffusion (`diff`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adm.diffusion.gaussian import Diffusion


def classifier_cond_fn(
    classifier: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
    diff: Diffusion | None = None,
) -> Callable[..., Tensor]:
    """`cond_fn(x_t, t, y, **_) -> scale · ∇_{x_t} Σ_i log softmax(classifier(x_t, t))[i, y_i]`.

    Extra keyword arguments (other model conditioning) are ignored. The gradient is taken on a
    detached copy of x_t with grad enabled, so it works inside `torch.no_grad()` sampling loops.
    With `interval=(lo, hi)` (and `diff`), the gradient is zero outside σ ∈ [lo, hi] and the
    classifier is not run there.
    """
    active = _interval_test(interval, diff)

    def cond_fn(x_t: Tensor, t: Tensor, y: Tensor | None = None, **_: object) -> Tensor:
        if y is None:
            raise ValueError("classifier guidance needs target labels: pass y=... in model_kwargs")
        mask = active(t)
        if mask is not None and not mask.any():
            return torch.zeros_like(x_t)
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        if mask is not None:
            grad = grad * mask.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad * scale

    return cond_fn


def classifier_free_model_fn(
    model_fn: Callable[..., Tensor],
    scale: float,
    *,
    null_label: int,
    interval: tuple[float, float] | None = None,
    diff: Diffusion | None = None,
) -> Callable[..., Tensor]:
    """Classifier-free guidance (Ho & Salimans 2021) as a `model_fn` wrapper.

    Returns `guided(x_t, t, y, **kw)` whose noise channels are ε_u + w·(ε_c − ε_u) with w =
    `scale` (w = 1: conditional, w = 0: unconditional), computed in ONE batched forward of
    [conditional; unconditional] halves; the unconditional half gets `null_label`. Learned-Σ
    channels (beyond the image channels) are taken from the conditional pass. Works with every
    sampler and composes with `classifier_cond_fn`. With `interval=(lo, hi)` (and `diff`), steps
    outside σ ∈ [lo, hi] get the plain conditional prediction from one forward.
    """
    active = _interval_test(interval, diff)

    def guided(x_t: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs labels: pass y=... in model_kwargs")
        mask = active(t)
        if mask is not None and not mask.any():
            return model_fn(x_t, t, y=y, **kwargs)
        n, channels = x_t.shape[0], x_t.shape[1]
        null = torch.full_like(y, null_label)
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **doubled)
        cond, uncond = out[:n], out[n:]
        w: float | Tensor = scale
        if mask is not None:  # w = 1 (conditional only) for samples outside the interval
            w = torch.where(mask.to(out.device), float(scale), 1.0).to(out.dtype)
            w = w.view(-1, *([1] * (out.dim() - 1)))
        eps = uncond[:, :channels] + w * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided


def unconditional_model_fn(model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`model_fn` for a network without class labels in a classifier-guided run: the samplers pass
    `model_kwargs` (with `y`, the target classes) to both the model and `cond_fn`; this wrapper
    keeps `y` from the model and passes everything else (e.g. `low_res`) on."""

    def model_fn(x_t: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        return model(x_t, t, **kwargs)

    return model_fn


def check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi, as floats; anything else is a ValueError naming the values."""
    lo, hi = (float(v) for v in interval)
    if not (np.isfinite(lo) and lo >= 0 and hi >= lo and not np.isnan(hi)):
        raise ValueError(
            f"a guidance interval needs 0 <= LO <= HI (in σ); got LO={lo:g}, HI={hi:g}"
        )
    return lo, hi


def _interval_test(
    interval: tuple[float, float] | None, diff: Diffusion | None
) -> Callable[[Tensor], Tensor | None]:
    """t (network timesteps) -> bool mask of samples whose σ is in the interval (None: always)."""
    if interval is None:
        return lambda t: None
    if diff is None:
        raise ValueError("a guidance interval needs the diffusion (diff=...) for its σ table")
    lo, hi = check_interval(interval)
    schedule = diff.schedule.original
    ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    sigma = torch.from_numpy(np.sqrt((1 - ac) / ac))
    per_unit = schedule.num_steps / 1000.0 if schedule.rescale_timesteps else 1.0

    def active(t: Tensor) -> Tensor:
        index = (t.detach().cpu().double() * per_unit).round().long().clamp(0, len(sigma) - 1)
        s = sigma[index]
        return ((s >= lo) & (s <= hi)).to(t.device)

    return active
