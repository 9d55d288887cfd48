"""The `adm` command: parse arguments, resolve typed configs, call one library function.

- `main`: the `adm` entry point and the small commands (demo, flags)
- `evaluate`: `adm eval`, `adm stats`: any input kind, a metric subset, KID, FD-DINOv2
- `models`: `adm presets`, `adm info`, `adm convert`, `adm fetch`, `adm flags`
- `sample`: `adm sample`, `adm upsample`, `adm nll`
- `edit`: `adm inpaint` (RePaint, replacement) and `adm edit` (SDEdit)
- `train`: `adm train`, `adm train-classifier`, `adm train-superres`
- `checks`: argument checks shared by the commands (counts, ranges, writable folders)
- `demo`: `adm demo`: classifier guidance on Fashion-MNIST with the bundled models
- `demo_edit`: `adm demo --edit`: inpainting and SDEdit on Fashion-MNIST, judged
- `sweep`: `adm sweep`: solver × grid × steps × guidance scale, each cell measured
- `sweep_run`: the sweep's cells, checks, sampling with shared noise, resumable sweep.json
- `sweep_subjects`: what a sweep samples and scores (bundled models + judge, or a checkpoint +
  the Inception metrics)
- `sweep_report`: sweep.md (table, best cell per NFE budget) and sweep.png (FID against NFE)
"""
