"""adm: "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021) in modern PyTorch.

Reference-exact diffusion maths, the ADM networks under the original state-dict keys, samplers,
guidance, training and evaluation. See README.md for the commands and docs/ for depth.
"""

import os

# OpenMP threads that sleep instead of spinning at barriers: 1.5-3x faster on a loaded CPU
# (benchmarks/RESULTS.md, "Networks"). Only takes effect if set before torch starts its thread
# pool, i.e. when adm is imported first (always true for the `adm` command); an explicit setting
# in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
