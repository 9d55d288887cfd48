"""Editing maths: RePaint's jump schedule and forward step, known-region replacement, SDEdit."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from adm.diffusion import inpaint, registry, samplers, sdedit
from adm.diffusion.gaussian import Diffusion, DiffusionConfig, draw_noise, q_sample
from adm.diffusion.names import SAMPLER_NAMES

CONFIG = DiffusionConfig(steps=1000, noise_schedule="cosine", var_type="fixed_small")


def _diff(steps: str = "8") -> Diffusion:
    import dataclasses

    return Diffusion.from_config(dataclasses.replace(CONFIG, timestep_respacing=steps))


def _model_fn(x: torch.Tensor, t: torch.Tensor, y=None, **_) -> torch.Tensor:
    """A cheap deterministic stand-in for a network: ε̂ depends on x and t, per sample."""
    return torch.tanh(x.flip(-1)) * 0.5 + 1e-3 * t.float().view(-1, 1, 1, 1)


def _gens(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]


def _inputs(n: int = 4):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1  # left half known
    noise = torch.randn(n, 3, 6, 6, generator=g)
    return x0, mask, noise


def test_jump_schedule_matches_repaint_on_a_small_case():
    # T' = 5, j = 2, r = 2: jump points 0 and 2, each segment [t, t + 2] denoised twice
    assert inpaint.jump_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert inpaint.jump_schedule(4, 10, 1) == [3, 2, 1, 0, -1]  # r = 1: no jumps


@pytest.mark.parametrize(("steps", "jump", "resample"), [(25, 10, 10), (50, 10, 10), (7, 3, 4)])
def test_jump_schedule_moves_one_level_at_a_time_and_counts_its_calls(steps, jump, resample):
    times = inpaint.jump_schedule(steps, jump, resample)
    assert times[0] == steps - 1 and times[-1] == -1
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(times))
    assert max(times) == steps - 1 and min(times) == -1
    points = len(range(0, steps - jump, jump))
    assert inpaint.network_calls(steps, jump, resample) == steps + (resample - 1) * jump * points


def test_a_jump_as_long_as_the_chain_is_refused():
    with pytest.raises(ValueError, match="smaller than the number of steps"):
        inpaint.jump_schedule(10, 10, 2)


def test_q_step_after_q_sample_is_the_marginal_of_the_next_level():
    diff = _diff("8")
    x0 = torch.full((1, 1, 2, 2), 0.7)
    a, b = torch.tensor([3]), torch.tensor([4])
    zero, one = torch.zeros_like(x0), torch.ones_like(x0)
    ac = diff.schedule.alphas_cumprod
    mean = inpaint.q_step(diff, q_sample(diff, x0, a, zero), b, zero)
    torch.testing.assert_close(mean, x0 * float(ac[4]) ** 0.5)
    # noise variance: (1 − β_b)(1 − ᾱ_a) + β_b = 1 − ᾱ_b
    from_first = inpaint.q_step(diff, q_sample(diff, 0 * x0, a, one), b, zero)
    from_second = inpaint.q_step(diff, 0 * x0, b, one)
    torch.testing.assert_close(from_first**2 + from_second**2, one * (1 - float(ac[4])))


def _resample(sampler: str, r: int) -> int:
    """RePaint's r where the sampler can resample, 1 (replacement) for the multistep solvers."""
    return r if sampler in inpaint.RESAMPLING_SAMPLERS else 1


@pytest.mark.parametrize("sampler", inpaint.INPAINT_SAMPLERS)
def test_known_region_is_the_input_exactly_and_an_all_ones_mask_returns_it(sampler):
    x0, mask, noise = _inputs()
    out = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, sampler=sampler,
                                 jump=3, resample=_resample(sampler, 3), generator=_gens(4, 1),
                                 known_generator=_gens(4, 2))  # fmt: skip
    assert torch.equal(out[..., :3], x0[..., :3])
    assert not torch.equal(out[..., 3:], x0[..., 3:])
    full = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, torch.ones_like(mask),
                                  sampler=sampler, resample=_resample(sampler, 2),
                                  jump=3)  # fmt: skip
    assert torch.equal(full, x0)


@pytest.mark.parametrize("sampler", inpaint.INPAINT_SAMPLERS)
def test_an_all_zero_mask_is_plain_sampling_with_the_same_generators(sampler):
    x0, mask, noise = _inputs()
    eta = {"eta": 0.5} if sampler in ("ddim", "dpm++2m-sde") else {}
    out = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, torch.zeros_like(mask),
                                 sampler=sampler, generator=_gens(4, 1),
                                 known_generator=_gens(4, 2), **eta)  # fmt: skip
    plain = registry.sample(sampler, _model_fn, _diff(), noise, generator=_gens(4, 1), **eta)
    assert torch.equal(out, plain)


def _replacement(diff, noise, x0, mask, gens, known) -> torch.Tensor:
    """The plain replacement method written out: replace the known region, take a DDPM step."""
    x = noise
    for i in range(diff.num_steps - 1, -1, -1):
        t = torch.full((len(x),), i)
        known_x = q_sample(diff, x0, t, draw_noise(x, known))
        x = mask * known_x + (1 - mask) * x
        x, _ = samplers.ddpm_step(_model_fn, diff, x, t, generator=gens)
    return torch.where(mask.bool().expand_as(x), x0, x)


@pytest.mark.parametrize("jump", [1, 3, 7])
def test_resampling_once_is_replacement(jump):
    x0, mask, noise = _inputs()
    expected = _replacement(_diff(), noise, x0, mask, _gens(4, 1), _gens(4, 2))
    out = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, jump=jump, resample=1,
                                 generator=_gens(4, 1), known_generator=_gens(4, 2))  # fmt: skip
    assert torch.equal(out, expected)
    resampled = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, jump=3, resample=2,
                                       generator=_gens(4, 1),
                                       known_generator=_gens(4, 2))  # fmt: skip
    assert not torch.equal(resampled, expected)


@pytest.mark.parametrize("sampler", inpaint.INPAINT_SAMPLERS)
def test_inpainting_does_not_depend_on_the_batch(sampler):
    x0, mask, noise = _inputs()
    kw = dict(sampler=sampler, jump=2, resample=_resample(sampler, 3))
    if sampler == "ddim":
        kw["eta"] = 1.0
    whole = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, generator=_gens(4, 1),
                                   known_generator=_gens(4, 2), **kw)  # fmt: skip
    ones = [
        inpaint.inpaint_sample(_model_fn, _diff(), noise[i : i + 1], x0[i : i + 1], mask,
                               generator=_gens(4, 1)[i : i + 1],
                               known_generator=_gens(4, 2)[i : i + 1], **kw)
        for i in range(4)
    ]  # fmt: skip
    torch.testing.assert_close(torch.cat(ones), whole, rtol=0, atol=1e-6)


def test_guidance_reaches_the_unknown_region_only():
    x0, mask, noise = _inputs()

    def cond_fn(x, t, **_):
        return torch.ones_like(x)

    kw = dict(jump=2, resample=2, generator=_gens(4, 1), known_generator=_gens(4, 2))
    plain = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, **kw)
    kw = dict(jump=2, resample=2, generator=_gens(4, 1), known_generator=_gens(4, 2))
    guided = inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, cond_fn=cond_fn, **kw)
    assert torch.equal(guided[..., :3], plain[..., :3])
    assert (guided[..., 3:] - plain[..., 3:]).mean() > 0.1  # pushed up where it is free


@pytest.mark.parametrize("sampler", inpaint.REPLACEMENT_SAMPLERS)
def test_the_solvers_see_the_forward_noised_input_at_every_grid_point(sampler):
    x0, mask, noise = _inputs(2)
    diff, seen = _diff("6"), []

    def recording(x, t, **kw):
        seen.append((x.clone(), int(t[0])))
        return _model_fn(x, t, **kw)

    out = inpaint.inpaint_sample(recording, diff, noise, x0, mask, sampler=sampler,
                                 generator=_gens(2, 1), known_generator=_gens(2, 2))  # fmt: skip
    timesteps = [int(t) for t in diff.schedule.timestep_map[::-1]]
    assert [t for _, t in seen] == timesteps  # one network call per grid point
    replay = _gens(2, 2)
    for i, (x, _) in enumerate(seen):  # the known region: q(x_t | x0) with fresh noise each time
        t = torch.full((2,), diff.num_steps - 1 - i)
        expected = q_sample(diff, x0, t, draw_noise(x0, replay))
        torch.testing.assert_close(x[..., :3], expected[..., :3], rtol=0, atol=1e-6)
    assert torch.equal(out[..., :3], x0[..., :3])


@pytest.mark.parametrize(("sampler", "resample", "message"), [
    ("heun", 1, "inpainting runs with ddpm, ddim, dpm++2m"),
    ("dpm++2m", 2, "RePaint's resampling runs with ddpm or ddim"),
    ("unipc", 10, "--sampler unipc does replacement only"),
])  # fmt: skip
def test_resampling_is_ddpm_and_ddim_only_and_heun_does_not_inpaint(sampler, resample, message):
    x0, mask, noise = _inputs(1)
    with pytest.raises(ValueError, match=re.escape(message)):
        inpaint.inpaint_sample(_model_fn, _diff(), noise, x0, mask, sampler=sampler,
                               resample=resample, jump=2)  # fmt: skip


# ---- SDEdit ---------------------------------------------------------------------------------


def test_sdedit_timesteps_start_at_strength_times_t():
    assert sdedit.sdedit_timesteps(1000, 0.0, 50) == []
    ts = sdedit.sdedit_timesteps(1000, 0.3, 50)
    assert ts[0] == 300 and ts[-1] == 0 and len(ts) == 15
    assert sdedit.sdedit_timesteps(1000, 1.0, 10)[0] == 999
    assert sdedit.sdedit_timesteps(1000, 0.002, 50) == [2]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
            sdedit.sdedit_timesteps(1000, bad, 50)


def test_strength_zero_returns_the_input():
    x0, _, noise = _inputs()
    out = sdedit.sdedit_sample("ddpm", _model_fn, _diff(""), x0, noise, strength=0.0, steps=20)
    assert torch.equal(out, x0)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sdedit_runs_every_sampler_from_the_noised_input(sampler):
    x0, _, noise = _inputs(2)
    diff = _diff("")
    out = sdedit.sdedit_sample(sampler, _model_fn, diff, x0, noise, strength=0.4, steps=10,
                               generator=_gens(2, 1))  # fmt: skip
    ts = sdedit.sdedit_timesteps(1000, 0.4, 10)
    start = q_sample(diff, x0, torch.full((2,), ts[0]), noise)
    expected = registry.sample(sampler, _model_fn, diff, start, timesteps=ts,
                               generator=_gens(2, 1))  # fmt: skip
    assert torch.equal(out, expected) and torch.isfinite(out).all()


def test_a_low_strength_stays_closer_to_the_input_than_a_high_one():
    x0, _, noise = _inputs()
    dist = []
    for s in (0.1, 0.9):
        out = sdedit.sdedit_sample("ddim", _model_fn, _diff(""), x0, noise, strength=s, steps=20)
        dist.append(float((out - x0).abs().mean()))
    assert dist[0] < dist[1]
