"""The names of the samplers and timestep grids, in plain Python (the command line lists them
without importing torch); `registry` and `grids` define what each name does."""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "heun", "edm"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
GridName = Literal["uniform", "ddim", "logsnr", "quadratic", "karras", "trailing"]
GRID_NAMES: tuple[str, ...] = get_args(GridName)
