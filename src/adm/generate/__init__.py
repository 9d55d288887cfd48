"""Sampling runs on top of the samplers: per-sample seeds, batches, resume, processes.

- `sample`: `adm sample`/`adm upsample` runs: jobs, labels, guided model_fn, npz/grid outputs
- `edit`: `adm inpaint`/`adm edit` runs: RePaint or replacement inpainting, SDEdit, resumable
- `edit_io`: editing inputs (images and masks from .npz or folders, checked) and their grid
"""
