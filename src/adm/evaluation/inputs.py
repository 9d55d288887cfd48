"""What `adm eval` compares, and which metric needs what.

Each side is images (an npz batch, a folder, a glob of image files) and/or stored statistics (adm's
reference batch: `mu`, `sigma`, `mu_s`, `sigma_s` next to `arr_0`; a pytorch-fid statistics file:
`mu`, `sigma` only; `mu_dinov2`, `sigma_dinov2` for FD-DINOv2). Every check runs before any work.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adm._util.npz import NpzError, load_npz
from adm.evaluation.batches import BatchError, ImageSource, open_source

# the report's order: the original's first
METRICS = ("is", "fid", "sfid", "pr", "kid", "fd_dinov2")
DEFAULT_METRICS = ("is", "fid", "sfid", "pr")  # the paper's five numbers
# feature kind -> (mean key, covariance key, dimension) in a statistics file
STATS_KEYS = {
    "pool": ("mu", "sigma", 2048),
    "spatial": ("mu_s", "sigma_s", 2023),
    "dinov2": ("mu_dinov2", "sigma_dinov2", 1024),
}
STATS_OF = {"fid": "pool", "sfid": "spatial", "fd_dinov2": "dinov2"}
MIN_IMAGES = {"pr": 4, "kid": 2, "is": 1, "stats": 2}  # pr: k + 1 for the k = 3 radii
NEEDS = {
    "is": "the samples' images (Inception logits)",
    "fid": "images or pool statistics (mu, sigma) on both sides",
    "sfid": "images or spatial statistics (mu_s, sigma_s) on both sides",
    "pr": "images on both sides (features of real images, not just statistics)",
    "kid": "images on both sides (features of real images, not just statistics)",
    "fd_dinov2": "images or DINOv2 statistics (mu_dinov2, sigma_dinov2) on both sides",
}


@dataclass(frozen=True)
class EvalInput:
    """One side of an evaluation: its images (or None) and the statistics its file stores."""

    spec: str
    images: ImageSource | None
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # kind -> (mu [D], sigma [D, D]) float64

    def describe(self) -> str:
        if self.images is None:
            keys = [k for kind in self.stats for k in STATS_KEYS[kind][:2]]
            return f"{self.spec} is a statistics file ({', '.join(keys)})"
        return f"{self.spec} holds {self.images.n} images"


def parse_metrics(text: str) -> tuple[str, ...]:
    """`"fid,kid"` -> ("fid", "kid") in the report's order; an unknown name is one clear line."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        what = f"unknown metric {unknown[0]!r}" if unknown else "no metric named"
        raise BatchError(f"--metrics: {what}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def _npz_keys(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None


def read_stats(path: Path, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The complete (mean, covariance) pairs a file stores, shape- and NaN-checked."""
    out = {}
    for kind, (mu_key, sigma_key, dim) in STATS_KEYS.items():
        present = [k for k in (mu_key, sigma_key) if k in keys]
        if not present:
            continue
        if len(present) == 1:
            missing = sigma_key if present[0] == mu_key else mu_key
            raise BatchError(f"{path}: has {present[0]} but not {missing}")
        try:
            data = load_npz(path, (mu_key, sigma_key))
        except NpzError as err:
            raise BatchError(str(err)) from None
        mu = np.asarray(data[mu_key], dtype=np.float64)
        sigma = np.asarray(data[sigma_key], dtype=np.float64)
        for key, v, want in ((mu_key, mu, (dim,)), (sigma_key, sigma, (dim, dim))):
            if v.shape != want:
                raise BatchError(f"{path}: {key} has shape {list(v.shape)}, expected {list(want)}")
            if not np.isfinite(v).all():
                bad = int((~np.isfinite(v)).sum())
                raise BatchError(f"{path}: {key} holds {bad} NaN or infinite values")
        out[kind] = (mu, sigma)
    return out


def open_input(spec: str | os.PathLike) -> EvalInput:
    """An npz batch (with or without stored statistics), a statistics-only npz, an image folder
    or a glob of image files: headers and statistics checked, no image decoded."""
    path = Path(spec)
    keys = _npz_keys(path) if path.is_file() else None
    if keys is not None and "arr_0" not in keys:
        stats = read_stats(path, keys)
        if not stats:
            raise BatchError(
                f"{path}: neither images (arr_0) nor statistics (mu and sigma) (keys: {keys})"
            )
        return EvalInput(str(spec), None, stats)
    images = open_source(spec)
    stats = read_stats(path, keys) if keys is not None else {}
    return EvalInput(str(spec), images, stats)


def uses_stats(metric: str, inp: EvalInput, side: str) -> bool:
    """Whether a Fréchet metric takes this side's stored statistics: always on the reference side
    (as the original does with its reference batches), on the sample side only without images."""
    kind = STATS_OF.get(metric)
    if kind is None or kind not in inp.stats:
        return False
    return side == "ref" or inp.images is None


def check_requirements(metrics: tuple[str, ...], ref: EvalInput, sample: EvalInput) -> None:
    """Each chosen metric can be computed from these inputs, else one line saying what it needs."""
    for metric in metrics:
        sides = (("sample", sample),) if metric == "is" else (("ref", ref), ("sample", sample))
        for side, inp in sides:
            if inp.images is None and not uses_stats(metric, inp, side):
                raise BatchError(f"{metric} needs {NEEDS[metric]}; {inp.describe()}")
            if inp.images is None:
                continue
            if metric in ("is", "pr", "kid"):
                low = MIN_IMAGES[metric]
            else:  # a Fréchet distance: statistics of >= 2 images unless stored ones serve
                low = 0 if uses_stats(metric, inp, side) else MIN_IMAGES["stats"]
            if inp.images.n < low:
                raise BatchError(f"{inp.spec}: {inp.images.n} images; {metric} needs >= {low}")


def needs_inception(metric: str, inp: EvalInput, side: str) -> bool:
    """Whether `metric` needs Inception features of this side's images."""
    if metric == "is":
        return side == "sample"
    if metric in ("pr", "kid"):
        return True
    return metric in ("fid", "sfid") and not uses_stats(metric, inp, side)


def networks_needed(
    metrics: tuple[str, ...], ref: EvalInput, sample: EvalInput
) -> tuple[bool, bool]:
    """(Inception, DINOv2): whether any chosen metric needs features of either side's images."""
    sides = (("ref", ref), ("sample", sample))
    inception = any(needs_inception(m, inp, s) for m in metrics for s, inp in sides)
    dinov2 = "fd_dinov2" in metrics and any(not uses_stats("fd_dinov2", inp, s) for s, inp in sides)
    return inception, dinov2
