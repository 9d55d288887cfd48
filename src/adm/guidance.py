"""Guidance (Dhariwal & Nichol 2021 §4): classifier guidance as a `cond_fn` for every sampler.

`classifier_cond_fn(classifier, scale)` returns `cond_fn(x_t, t, y=...)` = scale·∇_x log p(y|x_t)
from a noisy classifier that receives the original timesteps. Samplers apply it as a mean shift
(ancestral, Algorithm 1) or a noise shift (DDIM and ODE solvers, Algorithm 2). Needs only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def classifier_cond_fn(
    classifier: Callable[[Tensor, Tensor], Tensor], scale: float
) -> Callable[..., Tensor]:
    """`cond_fn(x_t, t, y, **_) -> scale · ∇_{x_t} Σ_i log softmax(classifier(x_t, t))[i, y_i]`.

    Extra keyword arguments (other model conditioning) are ignored. The gradient is taken on a
    detached copy of x_t with grad enabled, so it works inside `torch.no_grad()` sampling loops.
    """

    def cond_fn(x_t: Tensor, t: Tensor, y: Tensor | None = None, **_: object) -> Tensor:
        if y is None:
            raise ValueError("classifier guidance needs target labels: pass y=... in model_kwargs")
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad * scale

    return cond_fn
