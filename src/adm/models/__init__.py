"""The released models: typed presets, the original's flags, overrides, checkpoint files.

- `presets`: one typed preset per released checkpoint (and tiny/demo ones); building networks
- `flags`: the original's command-line flags translated to typed configs
- `overrides`: `--set section.field=value` and pasted flag lines applied to a preset
- `checkpoint`: loading (strict, no code execution), recognising and saving checkpoints
- `fetch`: verified, resumable download of the released checkpoints into the cache
"""
