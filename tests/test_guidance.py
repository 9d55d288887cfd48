"""Guidance and the fast solver: contracts shared by DDPM, DDIM and DPM-Solver++, ODE convergence,
classifier gradient vs finite differences, classifier-free guidance, both at once."""

from __future__ import annotations

import pytest
import torch

from adm.diffusion import guidance, samplers, solvers
from adm.diffusion.gaussian import Diffusion, DiffusionConfig


def diffusion(respacing: str, var_type: str = "learned_range") -> Diffusion:
    return Diffusion.from_config(
        DiffusionConfig(
            steps=1000, noise_schedule="cosine", var_type=var_type, timestep_respacing=respacing
        )
    )


class TinyEps(torch.nn.Module):
    """A smooth, class-conditional stand-in for a trained ε-network (4 classes; label 4 = null)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
        self.emb = torch.nn.Embedding(5, 6)

    def forward(self, x, t, y=None):
        out = self.conv(x) + 0.5 * torch.tanh(x).repeat(1, 2, 1, 1)
        out = out * (1 - t.float().view(-1, 1, 1, 1) / 2000)
        if y is not None:
            out = out + 0.1 * self.emb(y)[:, :, None, None]
        return out


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(3 * 8 * 8 + 1, 4)

    def forward(self, x, t):
        return self.lin(torch.cat([x.flatten(1), t.float()[:, None] / 1000], dim=1))


SAMPLERS = {
    "ddpm": lambda *a, **k: samplers.ddpm_sample(*a, **k),
    "ddim": lambda *a, **k: samplers.ddim_sample(*a, **k),
    "dpm++2m": lambda *a, **k: solvers.dpm_solver_sample(*a, **k),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_contract(name):
    net, diff = TinyEps(), diffusion("10")
    y = torch.tensor([0, 3])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kwargs = {"model_kwargs": {"y": y}}
    if name == "ddpm":
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    out = SAMPLERS[name](net, diff, noise, **kwargs)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    if name == "ddpm":
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(SAMPLERS[name](net, diff, noise, **kwargs), out, rtol=0, atol=0)
    # classifier guidance at scale 0 equals no guidance
    zero = guidance.classifier_cond_fn(TinyClassifier(), 0.0)
    if name == "ddpm":
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(SAMPLERS[name](net, diff, noise, cond_fn=zero, **kwargs), out)
    # and a real scale changes the result
    if name == "ddpm":
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    strong = guidance.classifier_cond_fn(TinyClassifier(), 5.0)
    assert not torch.allclose(SAMPLERS[name](net, diff, noise, cond_fn=strong, **kwargs), out)


def test_dpm_solver_first_order_is_ddim():
    net, diff = TinyEps(), diffusion("ddim20")
    noise = torch.randn(2, 3, 8, 8)
    a = solvers.dpm_solver_sample(net, diff, noise, order=1)
    b = samplers.ddim_sample(net, diff, noise)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def gaussian_oracle(mu: float, s: float):
    """The exact ε-prediction for data ~ N(mu, s²): ε* = σ (x_t − α mu) / (α² s² + σ²)."""
    ac = diffusion("").schedule.table("alphas_cumprod")

    def model_fn(x_t, t):
        ab = ac[t].float().view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn, ac


def test_dpm_solver_and_ddim_converge_to_the_exact_ode_solution():
    """For Gaussian data the probability-flow ODE is solvable: x_t = α mu + √(α²s² + σ²)·z."""
    mu, s = 0.2, 0.5
    model_fn, ac = gaussian_oracle(mu, s)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a_T, a_0 = ac[999].item(), ac[0].item()
    z = (noise - a_T**0.5 * mu) / (a_T * s**2 + 1 - a_T) ** 0.5
    x_at_0 = a_0**0.5 * mu + (a_0 * s**2 + 1 - a_0) ** 0.5 * z
    exact = mu + a_0**0.5 * s**2 * (x_at_0 - a_0**0.5 * mu) / (a_0 * s**2 + 1 - a_0)
    dpm_err, ddim_err = [], []
    for steps in (5, 10, 20, 40):
        d = diffusion(str(steps))
        dpm = solvers.dpm_solver_sample(model_fn, d, noise, clip_denoised=False)
        ddim = samplers.ddim_sample(model_fn, d, noise, clip_denoised=False)
        dpm_err.append((dpm - exact).abs().max().item())
        ddim_err.append((ddim - exact).abs().max().item())
    assert dpm_err == sorted(dpm_err, reverse=True) and ddim_err == sorted(ddim_err, reverse=True)
    assert dpm_err[2] < 0.02 and dpm_err[-1] < 0.01 and ddim_err[-1] < 0.1
    assert all(d < e for d, e in zip(dpm_err, ddim_err, strict=True))  # second order wins


def test_classifier_gradient_matches_finite_differences():
    clf = TinyClassifier().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    grad = guidance.classifier_cond_fn(clf, 2.0)(x, t, y=y)

    def objective(z):
        return 2.0 * torch.log_softmax(clf(z, t), -1)[torch.arange(2), y].sum()

    direction = torch.randn_like(x)
    eps = 1e-6
    numeric = (objective(x + eps * direction) - objective(x - eps * direction)) / (2 * eps)
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-6)


def test_classifier_free_guidance_wrapper():
    net = TinyEps()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100, 900]), torch.tensor([1, 2])
    calls = []

    def counted(x_in, t_in, y=None):
        calls.append(x_in.shape[0])
        return net(x_in, t_in, y=y)

    null = torch.full_like(y, 4)
    cond, uncond = net(x, t, y=y), net(x, t, y=null)
    for w in (0.0, 1.0, 3.0):
        out = guidance.classifier_free_model_fn(counted, w, null_label=4)(x, t, y=y)
        expected_eps = uncond[:, :3] + w * (cond[:, :3] - uncond[:, :3])
        torch.testing.assert_close(out[:, :3], expected_eps)
        torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # learned Σ from the conditional pass
    assert calls == [4, 4, 4]  # one batched forward per call


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfg_and_classifier_guidance_together(name):
    net, diff = TinyEps(), diffusion("8")
    model_fn = guidance.classifier_free_model_fn(net, 2.0, null_label=4)
    cond_fn = guidance.classifier_cond_fn(TinyClassifier(), 1.0)
    kwargs = {"model_kwargs": {"y": torch.tensor([0, 1])}, "cond_fn": cond_fn}
    if name == "ddpm":
        kwargs["generator"] = torch.Generator().manual_seed(0)
    out = SAMPLERS[name](model_fn, diff, torch.randn(2, 3, 8, 8), **kwargs)
    assert torch.isfinite(out).all()


class NoLabels(torch.nn.Module):
    """An unconditional network: like ADM's, it refuses labels."""

    def __init__(self):
        super().__init__()
        self.inner = TinyEps()

    def forward(self, x, t, low_res=None):
        return self.inner(x, t) + (0 if low_res is None else low_res.mean())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_unconditional_model_guided_by_a_classifier(name):
    net, diff, clf = NoLabels(), diffusion("6"), TinyClassifier()
    with pytest.raises(TypeError):  # labels reach the network without the wrapper
        net(torch.randn(1, 3, 8, 8), torch.tensor([1]), y=torch.tensor([0]))
    model_fn = guidance.unconditional_model_fn(net)
    low_res = torch.full((2, 3, 8, 8), 0.5)
    torch.testing.assert_close(
        model_fn(low_res, torch.tensor([3, 4]), y=torch.tensor([0, 1]), low_res=low_res),
        net(low_res, torch.tensor([3, 4]), low_res=low_res),
    )  # y dropped, everything else passed on
    noise, y = (
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
        torch.tensor([0, 1]),
    )
    runs = []
    for scale in (0.0, 4.0):
        kwargs = {"model_kwargs": {"y": y}, "cond_fn": guidance.classifier_cond_fn(clf, scale)}
        if name == "ddpm":
            kwargs["generator"] = torch.Generator().manual_seed(0)
        runs.append(SAMPLERS[name](model_fn, diff, noise, **kwargs))
    assert not torch.equal(runs[0], runs[1])  # the classifier (and only it) saw the labels


def test_guidance_needs_labels():
    with pytest.raises(ValueError, match="needs target labels"):
        guidance.classifier_cond_fn(TinyClassifier(), 1.0)(
            torch.randn(1, 3, 8, 8), torch.tensor([1])
        )
    with pytest.raises(ValueError, match="needs labels"):
        guidance.classifier_free_model_fn(TinyEps(), 1.0, null_label=4)(
            torch.randn(1, 3, 8, 8), torch.tensor([1])
        )


def test_dynamic_threshold_rescales_outliers_only():
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.9]]).view(1, 1, 2, 2)
    torch.testing.assert_close(samplers.dynamic_threshold(x0), x0)
    big = x0 * 10
    out = samplers.dynamic_threshold(big, percentile=1.0)
    assert out.abs().max().item() == pytest.approx(1.0)
