"""Schedules and respacing: closed-form properties and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adm.diffusion.schedule import NoiseSchedule, named_betas, space_timesteps


def test_linear_schedule_is_hos_at_1000_and_scaled_elsewhere():
    betas = named_betas("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert named_betas("linear", 4000)[-1] == pytest.approx(0.02 / 4)


def test_cosine_alpha_bar_follows_the_closed_form():
    sched = NoiseSchedule.from_name("cosine", 1000)

    def f(u):
        return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(1, 1001) / 1000
    expected = f(t) / f(0)
    unclipped = expected[:-20]  # the last betas are clipped to 0.999
    np.testing.assert_allclose(sched.alphas_cumprod[:-20], unclipped, rtol=1e-10)


def test_tables_are_float64_and_read_only():
    sched = NoiseSchedule.from_name("linear", 100)
    assert sched.alphas_cumprod.dtype == np.float64
    with pytest.raises(ValueError):
        sched.betas[0] = 0.5


@pytest.mark.parametrize(
    ("spec", "steps", "expected"),
    [
        ("ddim25", 1000, list(range(0, 1000, 40))),
        ("10", 1000, [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
        ("1,2,3", 30, [0, 10, 19, 20, 24, 29]),
    ],
)
def test_space_timesteps_examples(spec, steps, expected):
    assert space_timesteps(steps, spec) == expected


def test_section_respacing_keeps_ends_and_uses_half_to_even():
    kept = space_timesteps(1000, "25")
    assert kept[0] == 0 and kept[-1] == 999
    assert 166 in kept and 500 in kept and 832 in kept  # .5 ties: 166.5->166, 499.5->500


def test_respacing_preserves_alpha_bar_at_kept_steps():
    base = NoiseSchedule.from_name("cosine", 1000)
    spaced = base.respace("50")
    np.testing.assert_allclose(
        spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-9
    )
    assert spaced.original_num_steps == 1000 and spaced.num_steps == 50


def test_network_timesteps_map_and_rescale():
    sched = NoiseSchedule.from_name("linear", 4000, rescale_timesteps=True).respace("ddim50")
    t = torch.tensor([0, 1, 49])
    got = sched.network_timesteps(t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.0, 80 * 0.25, 3920 * 0.25]))
    plain = NoiseSchedule.from_name("linear", 1000).respace("ddim10")
    assert plain.network_timesteps(t[:2]).tolist() == [0, 100]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("ddim600", "no integer stride"),
        ("2000", "section larger"),
        ("abc", "expected a step count"),
        ("10,,10", "expected a step count"),
        ("0", "must be positive"),
        ("ddimx", "expected a step count"),
    ],
)
def test_invalid_respacing_names_string_and_reason(spec, reason):
    with pytest.raises(ValueError, match=reason) as err:
        NoiseSchedule.from_name("linear", 1000).respace(spec)
    assert repr(spec) in str(err.value)


def test_unusable_schedules_fail_clearly():
    with pytest.raises(ValueError, match="T > 20"):
        NoiseSchedule.from_name("linear", 20)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        named_betas("quadratic", 100)
    with pytest.raises(ValueError, match="already respaced"):
        NoiseSchedule.from_name("linear", 1000).respace("10").respace("5")
