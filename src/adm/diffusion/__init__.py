"""The Gaussian diffusion maths and its samplers; tensors and callables in, tensors out.

- `schedule`: beta schedules (linear, cosine), derived float64 tables, timestep respacing
- `gaussian`: forward process, posterior, p_mean_variance, losses (MSE, hybrid, KL), bits/dim
- `grids`: named timestep grids (uniform, ddim, logsnr, quadratic, karras, trailing)
- `samplers`: DDPM and DDIM loops and single steps, the guidance hooks shared by all samplers
- `solvers`: DPM-Solver++ (2M, 3M, 2M SDE) and UniPC multistep solvers, and their single updates
- `edm`: the EDM Heun and stochastic samplers on the discrete σ table
- `registry`: every sampler by name, its options and its NFE
- `names`: sampler and grid names without torch (for the command line)
- `inpaint`: inpainting by known-region replacement and RePaint's resampling (jump schedule)
- `sdedit`: image-to-image editing (SDEdit): noise to t = S·T, denoise with any sampler
- `guidance`: classifier guidance (cond_fn) and classifier-free guidance (model_fn wrapper)
- `resample`: timestep samplers for training: uniform and loss-aware (importance sampling)
"""
