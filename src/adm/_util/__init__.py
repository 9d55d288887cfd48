"""Plumbing importable from every part: atomic writes, run-folder locks, torch.distributed,
run-time settings.

- `atomic`: atomic file writes (temporary file + rename)
- `lock`: one process per run folder (an OS lock that dies with its holder)
- `signals`: SIGINT/SIGTERM stop long loops at their next boundary (exit 130/143)
- `dist`: torch.distributed helpers for torchrun
- `runtime`: device, precision (torch.amp), channels_last, compile
- `digest`: SHA-256 of files (a checkpoint's identity)
- `errors`: UserError: bad input shown as one line
- `npz`: user `.npz` files read with every header checked before numpy allocates
"""
