"""adm: "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021) in modern PyTorch.

Reference-exact diffusion maths, the ADM networks under the original state-dict keys, samplers,
guidance, training and evaluation. See README.md for the commands and docs/ for depth; the
sub-packages (nets, diffusion, data, models, generate, training, evaluation, cli, _util) each list
their modules in their `__init__`.
"""

import os
import sys

# OpenMP threads that sleep instead of spinning at barriers: 1.5-3x faster on a loaded CPU
# (benchmarks/RESULTS.md, "Networks"). OpenMP reads the policy once, when torch loads it, so this
# only takes effect when adm is imported before torch (always true for the `adm` command); an
# explicit setting in the environment wins. Imported after torch, adm says how to fix it.
_TORCH_FIRST = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


class PerformanceWarning(UserWarning):
    """A setting that makes adm run slower than it could (filter it like any warning)."""


def _warn_if_torch_came_first() -> None:
    if not _TORCH_FIRST:
        return
    torch = sys.modules["torch"]
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available():
        return  # the GPU does the work; idle CPU threads do not matter
    import warnings

    warnings.warn(
        "torch was imported before adm, so OpenMP threads spin while they wait (up to 2x slower "
        "on a busy CPU): import adm before torch, or set OMP_WAIT_POLICY=PASSIVE in the "
        "environment",
        PerformanceWarning,
        stacklevel=3,
    )


_warn_if_torch_came_first()
