"""Plumbing importable from every part: atomic writes, torch.distributed, run-time settings.

- `atomic`: atomic file writes (temporary file + rename)
- `dist`: torch.distributed helpers for torchrun
- `runtime`: device, precision (torch.amp), channels_last, compile
- `errors`: UserError: bad input shown as one line
"""
