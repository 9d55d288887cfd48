"""The Gaussian diffusion maths and its samplers; tensors and callables in, tensors out.

- `schedule`: beta schedules (linear, cosine), derived float64 tables, timestep respacing
- `gaussian`: forward process, posterior, p_mean_variance, losses (MSE, hybrid, KL), bits/dim
- `samplers`: DDPM, DDIM and DPM-Solver++ sampling loops and single steps, guidance hooks
- `guidance`: classifier guidance (cond_fn) and classifier-free guidance (model_fn wrapper)
- `resample`: timestep samplers for training: uniform and loss-aware (importance sampling)
"""
