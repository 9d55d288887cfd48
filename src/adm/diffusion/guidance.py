"""Guidance (Dhariwal & Nichol 2021 §4; Ho & Salimans 2021): classifier and classifier-free.

`classifier_cond_fn(classifier, scale)` returns `cond_fn(x_t, t, y=...)` = scale·∇_x log p(y|x_t)
from a noisy classifier that receives the original timesteps. Samplers apply it as a mean shift
(ancestral, Algorithm 1) or a noise shift (DDIM and ODE solvers, Algorithm 2).
`classifier_free_model_fn(model_fn, w, null_label=...)` wraps a label-dropout-trained model.
Both work with every sampler, together too. `unconditional_model_fn(model)` guides a model that
takes no labels (the labels in `model_kwargs` then go to the classifier only). Needs only torch.
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


def classifier_free_model_fn(
    model_fn: Callable[..., Tensor], scale: float, *, null_label: int
) -> Callable[..., Tensor]:
    """Classifier-free guidance (Ho & Salimans 2021) as a `model_fn` wrapper.

    Returns `guided(x_t, t, y, **kw)` whose noise channels are ε_u + w·(ε_c − ε_u) with w =
    `scale` (w = 1: conditional, w = 0: unconditional), computed in ONE batched forward of
    [conditional; unconditional] halves; the unconditional half gets `null_label`. Learned-Σ
    channels (beyond the image channels) are taken from the conditional pass. Works with every
    sampler and composes with `classifier_cond_fn`.
    """

    def guided(x_t: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs labels: pass y=... in model_kwargs")
        n, channels = x_t.shape[0], x_t.shape[1]
        null = torch.full_like(y, null_label)
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **doubled)
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided


def unconditional_model_fn(model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`model_fn` for a network without class labels in a classifier-guided run: the samplers pass
    `model_kwargs` (with `y`, the target classes) to both the model and `cond_fn`; this wrapper
    keeps `y` from the model and passes everything else (e.g. `low_res`) on."""

    def model_fn(x_t: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        return model(x_t, t, **kwargs)

    return model_fn
