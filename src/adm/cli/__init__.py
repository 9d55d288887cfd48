"""The `adm` command: parse arguments, resolve typed configs, call one library function.

- `main`: the `adm` entry point and the small commands (demo, eval, stats)
- `models`: `adm presets`, `adm info`, `adm convert`, `adm fetch`, `adm flags`
- `sample`: `adm sample`, `adm upsample`, `adm nll`
- `train`: `adm train`, `adm train-classifier`, `adm train-superres`
- `checks`: argument checks shared by the commands (counts, ranges, writable folders)
- `demo`: `adm demo`: classifier guidance on Fashion-MNIST with the bundled models
"""
