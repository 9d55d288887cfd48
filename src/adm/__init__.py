"""adm: "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021) in modern PyTorch.

Reference-exact diffusion maths, the ADM networks under the original state-dict keys, samplers,
guidance, training and evaluation. See README.md for the commands and docs/ for depth.
"""

__version__ = "0.1.0"
