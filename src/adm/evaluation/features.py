"""Features of an image source through a network, streamed in batches, cached next to npz batches.

Inception (`adm.evaluation.inception`): pool_3, bias-free logits and the pool / spatial statistics
(FID, sFID, IS, P&R, KID). DINOv2 (`adm.evaluation.dinov2`): the 1024-d CLS features and their
statistics (FD-DINOv2). The cache key holds the batch's SHA-256, the network, its preprocessing and
its weights' SHA-256, so a cache file is never served for another network or pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adm._util.atomic import atomic_path
from adm._util.digest import sha256_file
from adm.evaluation.batches import ImageSource, iter_images
from adm.evaluation.inception import InceptionV3
from adm.evaluation.metrics import GaussianStats, StatsAccumulator

CACHE_FORMAT = "adm-eval-features-v2"


@dataclass(frozen=True)
class BatchFeatures:
    """What the Inception metrics need from one batch: pool features and logits, statistics."""

    pool: np.ndarray  # [N, 2048] float32
    logits: np.ndarray  # [N, 1008] float32 (no bias)
    pool_stats: GaussianStats  # of pool, 2048-d
    spatial_stats: GaussianStats  # of the 2023-d mixed_6/conv features


@dataclass(frozen=True)
class DinoFeatures:
    """DINOv2 CLS features [N, 1024] float32 and their statistics (FD-DINOv2)."""

    features: np.ndarray
    stats: GaussianStats


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    # TF ran the graph in true float32: no TF32 convolutions or matmuls on Ampere+ GPUs.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def progress_bar(source: ImageSource, what: str, progress: bool) -> tqdm:
    """A bar counting images, with images/s (tqdm's rate in the unit "img")."""
    return tqdm(total=source.n, unit="img", desc=f"{what} {source.path.name}",
                disable=not progress, file=sys.stderr)  # fmt: skip


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inception_arrays(chunks: Iterable[np.ndarray], model: InceptionV3, update) -> BatchFeatures:
    device = _device_of(model)
    pool, logits = [], []
    pool_acc, spatial_acc = StatsAccumulator(), StatsAccumulator()
    with full_fp32(), torch.inference_mode():
        for chunk in chunks:
            out = model(torch.from_numpy(chunk).to(device, non_blocking=True))
            pool_np = out.pool.float().cpu().numpy()
            pool_acc.update(pool_np)
            spatial_acc.update(out.spatial.float().cpu().numpy())
            pool.append(pool_np)
            logits.append(out.logits.float().cpu().numpy())
            update(len(chunk))
    return BatchFeatures(np.concatenate(pool), np.concatenate(logits), pool_acc.finalize(),
                         spatial_acc.finalize())  # fmt: skip


def extract_features(
    source: ImageSource, model: InceptionV3, *, batch_size: int = 64, progress: bool = True
) -> BatchFeatures:
    """Run every image of `source` through Inception (on the model's device), streaming."""
    with progress_bar(source, "Inception", progress) as bar:
        return _inception_arrays(iter_images(source, batch_size), model, bar.update)


def image_features(
    images: np.ndarray, model: InceptionV3, *, batch_size: int = 64
) -> BatchFeatures:
    """`extract_features` of uint8 [N, H, W, 3] images in memory (e.g. fresh samples)."""
    chunks = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return _inception_arrays(chunks, model, lambda n: None)


def extract_dinov2(
    source: ImageSource, model: torch.nn.Module, *, batch_size: int = 64, progress: bool = True
) -> DinoFeatures:
    """DINOv2 CLS features of every image of `source`, streaming."""
    device, feats, acc = _device_of(model), [], StatsAccumulator()
    with progress_bar(source, "DINOv2", progress) as bar, full_fp32(), torch.inference_mode():
        for chunk in iter_images(source, batch_size):
            out = model(torch.from_numpy(chunk).to(device, non_blocking=True)).float().cpu().numpy()
            acc.update(out)
            feats.append(out)
            bar.update(len(chunk))
    return DinoFeatures(np.concatenate(feats), acc.finalize())


# --------------------------------------------------------------------------- the feature cache


def cache_key(batch_path: Path, network_id: str) -> str:
    """What a cache file must match: format, the batch file's SHA-256, network + preprocessing +
    weights (`network_id`)."""
    return f"{CACHE_FORMAT}|{sha256_file(batch_path)}|{network_id}"


def feature_cache_path(batch_path: Path, key: str) -> Path:
    """`<batch>.adm-features-<digest of key>.npz` next to the batch."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return batch_path.with_name(f"{batch_path.name}.adm-features-{digest}.npz")


def cached_arrays(
    source: ImageSource,
    network_id: str | None,
    compute: Callable[[], dict[str, np.ndarray]],
    *,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """`compute()` through the cache file of an npz `source`: read when its stored key equals this
    one and its per-image arrays ("rows_*") have one row per image; else computed and written
    atomically. Folders, globs and networks without a weights file are not cached."""
    if not use_cache or network_id is None or source.is_folder:
        return compute()
    key = cache_key(source.path, network_id)
    path = feature_cache_path(source.path, key)
    if path.is_file():
        try:
            with np.load(path) as d:
                hit = {k: d[k] for k in d.files}
            rows_ok = all(len(v) == source.n for k, v in hit.items() if k.startswith("rows_"))
            if str(hit.pop("key")) == key and rows_ok:
                return hit
        except (OSError, KeyError, ValueError, EOFError):
            pass
    arrays = compute()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
    except OSError as err:
        warnings.warn(f"could not write feature cache {path}: {err}", stacklevel=2)
    return arrays


def batch_features(
    source: ImageSource,
    model: InceptionV3,
    *,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> BatchFeatures:
    """`extract_features` of a source, through the feature cache next to an npz batch."""

    def compute() -> dict[str, np.ndarray]:
        f = extract_features(source, model, batch_size=batch_size, progress=progress)
        return {"rows_pool": f.pool, "rows_logits": f.logits, "mu": f.pool_stats.mu,
                "sigma": f.pool_stats.sigma, "mu_s": f.spatial_stats.mu,
                "sigma_s": f.spatial_stats.sigma}  # fmt: skip

    layout = "|channels_last" if model.channels_last else ""  # roundoff-level differences
    network = f"{model.network_id}|{model.weights_id}{layout}" if model.weights_id else None
    d = cached_arrays(source, network, compute, use_cache=use_cache)
    return BatchFeatures(d["rows_pool"], d["rows_logits"], GaussianStats(d["mu"], d["sigma"]),
                         GaussianStats(d["mu_s"], d["sigma_s"]))  # fmt: skip


def batch_dinov2(
    source: ImageSource,
    model: torch.nn.Module,
    *,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> DinoFeatures:
    """`extract_dinov2` of a source, through the feature cache next to an npz batch."""

    def compute() -> dict[str, np.ndarray]:
        f = extract_dinov2(source, model, batch_size=batch_size, progress=progress)
        return {"rows_dinov2": f.features, "mu": f.stats.mu, "sigma": f.stats.sigma}

    weights_id = getattr(model, "weights_id", None)
    network = f"{model.network_id}|{weights_id}" if weights_id else None
    d = cached_arrays(source, network, compute, use_cache=use_cache)
    return DinoFeatures(d["rows_dinov2"], GaussianStats(d["mu"], d["sigma"]))
