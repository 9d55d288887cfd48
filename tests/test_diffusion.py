"""Diffusion maths: closed-form properties (Bayes' rule, learned-range endpoints, moments)."""

from __future__ import annotations

import math

import pytest
import torch

from adm.diffusion import gaussian
from adm.diffusion.gaussian import Diffusion, DiffusionConfig
from adm.diffusion.schedule import NoiseSchedule


def make(var_type="learned_range", mean_type="eps", loss_type="mse", steps=100, name="cosine"):
    return Diffusion(NoiseSchedule.from_name(name, steps), mean_type, var_type, loss_type)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    diff = make()
    s = diff.schedule
    x0, x_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 40, 99])
    mean, var, _ = gaussian.q_posterior(diff, x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        beta, ab_prev = s.betas[ti], s.alphas_cumprod_prev[ti]
        # likelihood N(x_t; sqrt(1-β) x, β), prior N(x; sqrt(ab_prev) x0, 1-ab_prev)
        precision = (1 - beta) / beta + 1 / (1 - ab_prev)
        m = math.sqrt(1 - beta) / beta * x_t[i] + math.sqrt(ab_prev) / (1 - ab_prev) * x0[i]
        torch.testing.assert_close(mean[i], (m / precision).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            var[i], torch.full_like(var[i], 1 / precision), rtol=1e-5, atol=0
        )


def test_learned_range_endpoints_give_posterior_and_beta():
    diff = make()
    x_t = torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 70])
    eps = torch.randn_like(x_t)
    for v, table in ((-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        pmv = gaussian.p_mean_variance(diff, out, x_t, t)
        expected = diff.schedule.extract(table, t, x_t).expand_as(x_t)
        torch.testing.assert_close(pmv.log_variance, expected)


def test_fixed_variances_and_prev_x_mean():
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([0, 50])
    out = torch.randn_like(x_t)
    large = gaussian.p_mean_variance(make("fixed_large"), out, x_t, t)
    small = gaussian.p_mean_variance(make("fixed_small"), out, x_t, t)
    s = make().schedule
    assert large.variance[1, 0, 0, 0].item() == pytest.approx(s.betas[50], rel=1e-6)
    assert large.variance[0, 0, 0, 0].item() == pytest.approx(s.posterior_variance[1], rel=1e-6)
    assert small.variance[0].abs().max() == 0  # the original's FIXED_SMALL has var 0 at t=0
    prev = gaussian.p_mean_variance(make("fixed_large", "prev_x"), out, x_t, t, clip_denoised=False)
    torch.testing.assert_close(prev.mean, out)
    # the x0 implied by the predicted mean reproduces that mean through the posterior
    again, _, _ = gaussian.q_posterior(make(), prev.pred_x0, x_t, t)
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-4)


def test_q_sample_moments():
    diff = make(steps=1000, name="linear")
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 300)
    x_t = gaussian.q_sample(
        diff, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    )
    ab = diff.schedule.alphas_cumprod[300]
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.03)


def test_eps_x0_conversions_are_inverse():
    diff = make()
    x_t, t, eps = torch.randn(2, 3, 4, 4), torch.tensor([3, 77]), torch.randn(2, 3, 4, 4)
    x0 = gaussian.pred_x0_from_eps(diff, x_t, t, eps)
    torch.testing.assert_close(
        gaussian.eps_from_pred_x0(diff, x_t, t, x0), eps, rtol=1e-4, atol=1e-4
    )


def test_hybrid_loss_trains_only_sigma_through_the_bound():
    diff = make(loss_type="rescaled_mse")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t, noise = torch.tensor([10, 60]), torch.randn(2, 3, 4, 4)
    x_t = gaussian.q_sample(diff, x0, t, noise)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    losses = gaussian.losses_from_output(diff, out, x0, x_t, t, noise)
    (grad,) = torch.autograd.grad(losses["loss"].sum(), out)
    mse_grad = -2 * (noise - out[:, :3]) / (3 * 4 * 4)
    torch.testing.assert_close(grad[:, :3], mse_grad.detach())
    assert grad[:, 3:].abs().sum() > 0
    assert set(losses) == {"loss", "mse", "vb"}


def test_kl_losses_scale_with_steps():
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 60]), torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4)
    kl, rkl = make(loss_type="kl"), make(loss_type="rescaled_kl")
    x_t = gaussian.q_sample(kl, x0, t, noise)
    a = gaussian.losses_from_output(kl, out, x0, x_t, t, noise)["loss"]
    b = gaussian.losses_from_output(rkl, out, x0, x_t, t, noise)["loss"]
    torch.testing.assert_close(b, a * 100)


def test_normal_kl_of_identical_gaussians_is_zero_and_bpd_loop_shapes():
    m, lv = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(gaussian.normal_kl(m, lv, m, lv), torch.zeros(5))
    diff = make(steps=8)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1

    def model_fn(x, t):
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    out = gaussian.calc_bpd_loop(diff, model_fn, x0, generator=torch.Generator().manual_seed(1))
    assert out["vb"].shape == (2, 8) and out["total_bpd"].shape == (2,)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


def test_discretized_likelihood_sums_to_one_over_the_bins():
    values = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    mean, log_scale = torch.tensor(0.1), torch.tensor(-1.0)
    logp = gaussian.discretized_gaussian_log_likelihood(
        values, means=mean.expand(256), log_scales=log_scale.expand(256)
    )
    # the tanh CDF approximation is accurate to ~1e-3
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_wrong_output_channels_fail_clearly():
    x_t, t = torch.randn(1, 3, 4, 4), torch.tensor([1])
    with pytest.raises(ValueError, match="needs 6 output channels"):
        gaussian.p_mean_variance(make(), torch.randn(1, 3, 4, 4), x_t, t)
    with pytest.raises(ValueError, match="needs 3 output channels"):
        gaussian.p_mean_variance(make("fixed_large"), torch.randn(1, 6, 4, 4), x_t, t)


def test_config_builds_respaced_diffusion():
    diff = Diffusion.from_config(
        DiffusionConfig(steps=1000, noise_schedule="linear", timestep_respacing="ddim25")
    )
    assert diff.num_steps == 25 and diff.schedule.timestep_map[1] == 40
