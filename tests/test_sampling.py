"""Sampler properties: oracle recovery, DDIM invertibility, determinism, batch-split invariance."""

from __future__ import annotations

import pytest
import torch

from adm.diffusion import samplers
from adm.diffusion.gaussian import Diffusion, DiffusionConfig

BASE = DiffusionConfig(steps=1000, noise_schedule="linear", var_type="learned_range")


def diffusion(respacing: str) -> Diffusion:
    return Diffusion.from_config(
        DiffusionConfig(**{**BASE.__dict__, "timestep_respacing": respacing})
    )


def oracle_eps(x0: torch.Tensor):
    """ε that a perfect network would predict if every sample were a noised `x0`."""
    ac = Diffusion.from_config(BASE).schedule.table("alphas_cumprod")

    def model_fn(x_t, t):
        ab = ac[t].float().view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn


def test_ddim_with_oracle_eps_recovers_x0():
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    out = samplers.ddim_sample(oracle_eps(x0), diffusion("ddim20"), torch.randn(2, 3, 8, 8))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_network_receives_original_timesteps():
    seen = []

    def model_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    samplers.ddpm_sample(model_fn, diffusion("10"), torch.randn(1, 3, 4, 4))
    assert [s[0] for s in seen] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_reverse_then_forward_ddim_is_identity_at_eta_zero():
    """With ε independent of x_t the DDIM ODE steps invert exactly: encoding x_0 (read as the
    sample at the first kept step) and decoding back to that step returns it."""
    const = torch.randn(1, 3, 8, 8)

    def model_fn(x, t):
        return torch.cat([const.expand_as(x), torch.zeros_like(x)], dim=1)

    diff = diffusion("ddim10")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    latent = samplers.ddim_reverse_sample(model_fn, diff, x0, clip_denoised=False)
    steps = samplers.ddim_sample_progressive(model_fn, diff, latent, clip_denoised=False)
    back = next(s.sample for s in steps if s.t == 1)  # the sample at the level of t = 0
    torch.testing.assert_close(back, x0, rtol=1e-4, atol=1e-4)


def small_model_fn():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 6, 3, padding=1)

    def model_fn(x, t):
        return net(x) * 0.1 + (t.float() / 1000).view(-1, 1, 1, 1)

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
def test_contract_shapes_determinism_and_per_sample_generators(sampler):
    model_fn, diff = small_model_fn(), diffusion("8")

    def run(batch_indices, seed=0):
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in batch_indices]
        noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
        if sampler == "ddpm":
            return samplers.ddpm_sample(model_fn, diff, noise, generator=gens)
        eta = 0.0 if sampler == "ddim_eta0" else 1.0
        return samplers.ddim_sample(model_fn, diff, noise, eta=eta, generator=gens)

    full = run(range(4))
    assert full.shape == (4, 3, 8, 8) and torch.isfinite(full).all()
    torch.testing.assert_close(run(range(4)), full, rtol=0, atol=0)
    # sample i depends only on its own generator: batches of 1 give the same images
    singles = torch.cat([run([i]) for i in range(4)])
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(range(4), seed=1), full)


@pytest.mark.parametrize("sampler", [samplers.ddpm_sample, samplers.ddim_sample])
def test_guidance_with_zero_gradient_equals_no_guidance(sampler):
    model_fn, diff = small_model_fn(), diffusion("8")
    noise = torch.randn(2, 3, 8, 8)

    def zero_cond_fn(x, t, **_):
        return torch.zeros_like(x)

    a = sampler(model_fn, diff, noise, generator=torch.Generator().manual_seed(3))
    b = sampler(
        model_fn, diff, noise, generator=torch.Generator().manual_seed(3), cond_fn=zero_cond_fn
    )
    torch.testing.assert_close(a, b)


def test_progressive_yields_every_step_in_order():
    steps = list(
        samplers.ddim_sample_progressive(
            small_model_fn(), diffusion("ddim5"), torch.randn(1, 3, 4, 4)
        )
    )
    assert [s.t for s in steps] == [4, 3, 2, 1, 0]


def test_ddim_eta_one_stays_finite_where_the_cosine_alpha_bar_is_almost_zero():
    # respaced "8" keeps t = 999, where ᾱ ≈ 2e-9: 1 − ᾱ_prev − σ² rounded below 0 in float32
    diff = Diffusion.from_config(
        DiffusionConfig(steps=1000, noise_schedule="cosine", timestep_respacing="8")
    )
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = samplers.ddim_sample(lambda x, t, **_: torch.tanh(x), diff, noise, eta=1.0)
    assert torch.isfinite(out).all()
