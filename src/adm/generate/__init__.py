"""Sampling runs on top of the samplers: per-sample seeds, batches, resume, processes.

- `sample`: `adm sample`/`adm upsample` runs: jobs, labels, guided model_fn, npz/grid outputs
"""
