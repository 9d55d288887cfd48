"""Scores of inpainted images against their originals (docs/editing.md): the error in the
regenerated region and the seam, the mean jump in grey level across the mask boundary (RePaint,
Lugmayr et al. 2022, aims at a generated region that agrees with the known one).
"""

from __future__ import annotations

import numpy as np


def seam(images: np.ndarray, keep: np.ndarray) -> float:
    """Mean |x_a − x_b| over horizontally or vertically adjacent pixels a, b of which exactly one
    is known (`keep` [H, W] bool); images uint8 [N, H, W]. The originals' value is the floor to
    compare with: a seam far above it is visible."""
    x = images.astype(np.float64)
    h = keep[:, 1:] != keep[:, :-1]
    v = keep[1:, :] != keep[:-1, :]
    dh = np.abs(x[:, :, 1:] - x[:, :, :-1])[:, h]
    dv = np.abs(x[:, 1:, :] - x[:, :-1, :])[:, v]
    return float(np.concatenate([dh, dv], axis=1).mean())


def masked_error(edits: np.ndarray, originals: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(mean |edit − original|, RMSE) in grey levels over the regenerated pixels (`keep` False);
    uint8 images [N, H, W]."""
    diff = (edits.astype(np.float64) - originals)[:, ~keep]
    return float(np.abs(diff).mean()), float(np.sqrt((diff**2).mean()))
