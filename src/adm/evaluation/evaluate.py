"""`adm eval` and `adm stats`: Inception features of `.npz` batches -> IS, FID, sFID, P, R.

The pipeline of guided-diffusion `evaluations/evaluator.py` (Dhariwal & Nichol 2021, Sec. 4 and App.
B): reference and sample batches through the 2015 Inception graph (`adm.evaluation.inception`), the
metrics of `adm.evaluation.metrics`, reference statistics taken from the file when it stores them.
Features of a batch are cached next to it, keyed by the file's and the weights' SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adm._util.atomic import atomic_path
from adm.evaluation.batches import (
    BatchError,
    ImageSource,
    NpzWriter,
    iter_images,
    open_npz_batch,
    read_reference_stats,
)
from adm.evaluation.inception import InceptionV3, sha256_file
from adm.evaluation.metrics import (
    DistanceMode,
    GaussianStats,
    StatsAccumulator,
    frechet_distance,
    inception_score,
    precision_recall,
)

CACHE_FORMAT = "adm-eval-features-v1"
MIN_IMAGES = 4  # k + 1 for the k = 3 nearest-neighbour radii


@dataclass(frozen=True)
class BatchFeatures:
    """What the metrics need from one batch: pool features and logits per image, statistics."""

    pool: np.ndarray  # [N, 2048] float32
    logits: np.ndarray  # [N, 1008] float32 (no bias)
    pool_stats: GaussianStats  # of pool, 2048-d
    spatial_stats: GaussianStats  # of the 2023-d mixed_6/conv features


@dataclass(frozen=True)
class EvalResult:
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float
    n_ref: int
    n_sample: int
    ref_stats_from_file: bool  # FID/sFID used the reference file's mu/sigma/mu_s/sigma_s
    fp16_fallback: bool  # a float16 distance block overflowed and was recomputed in float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    # TF ran the graph in true float32: no TF32 convolutions or matmuls on Ampere+ GPUs.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def extract_features(
    source: ImageSource,
    model: InceptionV3,
    *,
    batch_size: int = 64,
    keep_features: bool = True,
    progress: bool = True,
) -> BatchFeatures:
    """Run every image of `source` through `model` (on the model's device), streaming."""
    bar = tqdm(
        total=source.n,
        unit="img",
        desc=f"Inception {source.path.name}",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        return _features(iter_images(source, batch_size), model, keep_features, bar.update)


def image_features(
    images: np.ndarray, model: InceptionV3, *, batch_size: int = 64
) -> BatchFeatures:
    """`extract_features` of uint8 [N, H, W, 3] images in memory (e.g. fresh samples)."""
    chunks = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return _features(chunks, model, True, lambda n: None)


def _features(
    chunks: Iterable[np.ndarray], model: InceptionV3, keep_features: bool, update
) -> BatchFeatures:
    device = next(model.parameters()).device
    pool, logits = [], []
    pool_acc, spatial_acc = StatsAccumulator(), StatsAccumulator()
    with _full_fp32(), torch.inference_mode():
        for chunk in chunks:
            out = model(torch.from_numpy(chunk).to(device))
            pool_np = out.pool.float().cpu().numpy()
            pool_acc.update(pool_np)
            spatial_acc.update(out.spatial.float().cpu().numpy())
            if keep_features:
                pool.append(pool_np)
                logits.append(out.logits.float().cpu().numpy())
            update(len(chunk))
    empty = np.zeros((0, 0), np.float32)
    return BatchFeatures(
        pool=np.concatenate(pool) if pool else empty,
        logits=np.concatenate(logits) if logits else empty,
        pool_stats=pool_acc.finalize(),
        spatial_stats=spatial_acc.finalize(),
    )


def feature_cache_path(batch_path: Path, weights_id: str) -> Path:
    """`<batch>.adm-features-<key>.npz` next to the batch; key = SHA-256 of batch, weights."""
    key = f"{CACHE_FORMAT}:{sha256_file(batch_path)}:{weights_id}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return batch_path.with_name(f"{batch_path.name}.adm-features-{digest}.npz")


def _load_cache(path: Path, n: int) -> BatchFeatures | None:
    try:
        with np.load(path) as d:
            f = BatchFeatures(
                d["pool"],
                d["logits"],
                GaussianStats(d["mu"], d["sigma"]),
                GaussianStats(d["mu_s"], d["sigma_s"]),
            )
    except (OSError, KeyError, ValueError):
        return None
    return f if len(f.pool) == n == len(f.logits) else None


def batch_features(
    source: ImageSource,
    model: InceptionV3,
    *,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> BatchFeatures:
    """`extract_features` of an npz batch, through the feature cache next to it."""
    cache = None
    if use_cache and model.weights_id and not source.is_folder:
        cache = feature_cache_path(source.path, model.weights_id)
        if cache.is_file() and (hit := _load_cache(cache, source.n)) is not None:
            return hit
    feats = extract_features(source, model, batch_size=batch_size, progress=progress)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.savez(
                    f,
                    pool=feats.pool,
                    logits=feats.logits,
                    mu=feats.pool_stats.mu,
                    sigma=feats.pool_stats.sigma,
                    mu_s=feats.spatial_stats.mu,
                    sigma_s=feats.spatial_stats.sigma,
                )
        except OSError as err:
            warnings.warn(f"could not write feature cache {cache}: {err}", stacklevel=2)
    return feats


def check_eval_inputs(
    ref_batch: str | os.PathLike, sample_batch: str | os.PathLike
) -> tuple[ImageSource, ImageSource, dict[str, np.ndarray] | None]:
    """Validate both batches (headers and stored statistics only) before any work."""
    ref, sample = open_npz_batch(ref_batch), open_npz_batch(sample_batch)
    for src in (ref, sample):
        if src.n < MIN_IMAGES:
            raise BatchError(f"{src.path}: {src.n} images; precision/recall need >= {MIN_IMAGES}")
    return ref, sample, read_reference_stats(ref.path)


@dataclass(frozen=True)
class Reference:
    """A reference batch ready to score samples against: its features (precision / recall) and
    the statistics FID and sFID use (the file's stored mu/sigma/mu_s/sigma_s when present)."""

    features: BatchFeatures
    pool_stats: GaussianStats
    spatial_stats: GaussianStats
    from_file: bool
    n: int


def load_reference(
    ref_src: ImageSource,
    stored: dict[str, np.ndarray] | None,
    model: InceptionV3,
    **kw,
) -> Reference:
    """The reference's features (through the feature cache; `kw` as `batch_features`)."""
    ref = batch_features(ref_src, model, **kw)
    if stored is None:
        return Reference(ref, ref.pool_stats, ref.spatial_stats, False, ref_src.n)
    pool = GaussianStats(stored["mu"], stored["sigma"])
    spatial = GaussianStats(stored["mu_s"], stored["sigma_s"])
    return Reference(ref, pool, spatial, True, ref_src.n)


def score(
    sample: BatchFeatures,
    ref: Reference,
    model: InceptionV3,
    *,
    split_size: int = 5000,
    distance_mode: DistanceMode = "original",
) -> EvalResult:
    """IS of the samples in splits of `split_size`; FID / sFID against the reference statistics;
    precision / recall between the reference's and the samples' pool features."""
    device = next(model.parameters()).device
    pr = precision_recall(ref.features.pool, sample.pool, mode=distance_mode, device=device)
    return EvalResult(
        inception_score=inception_score(sample.logits, split_size),
        fid=frechet_distance(sample.pool_stats, ref.pool_stats),
        sfid=frechet_distance(sample.spatial_stats, ref.spatial_stats),
        precision=pr.precision,
        recall=pr.recall,
        n_ref=ref.n,
        n_sample=len(sample.pool),
        ref_stats_from_file=ref.from_file,
        fp16_fallback=pr.fp16_fallback,
    )


def evaluate(
    ref_batch: str | os.PathLike,
    sample_batch: str | os.PathLike,
    model: InceptionV3,
    *,
    batch_size: int = 64,
    use_cache: bool = True,
    split_size: int = 5000,
    distance_mode: DistanceMode = "original",
    progress: bool = True,
) -> EvalResult:
    """The evaluator end to end. FID/sFID against the reference file's stored statistics when
    present (else those of its `arr_0`); precision/recall between the two `arr_0`s; IS of the
    samples in consecutive splits of `split_size`."""
    ref_src, sample_src, stored = check_eval_inputs(ref_batch, sample_batch)
    kw = {"batch_size": batch_size, "use_cache": use_cache, "progress": progress}
    ref = load_reference(ref_src, stored, model, **kw)
    sample = batch_features(sample_src, model, **kw)
    return score(sample, ref, model, split_size=split_size, distance_mode=distance_mode)


def build_reference_batch(
    source: ImageSource,
    out: str | os.PathLike,
    model: InceptionV3,
    *,
    num_images: int = 10000,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write a reference batch: `mu`, `sigma`, `mu_s`, `sigma_s` over every image of `source`,
    and `arr_0` = a seeded uniform subset of `num_images` of them (file order kept) for P&R."""
    if source.n < 2:
        raise BatchError(f"{source.path}: statistics need at least 2 images, got {source.n}")
    rng = np.random.default_rng(seed)
    keep = np.zeros(source.n, dtype=bool)
    keep[rng.choice(source.n, size=min(num_images, source.n), replace=False)] = True
    device = next(model.parameters()).device
    pool_acc, spatial_acc = StatsAccumulator(), StatsAccumulator()
    bar = tqdm(
        total=source.n,
        unit="img",
        desc=f"Inception {source.path.name}",
        disable=not progress,
        file=sys.stderr,
    )
    shape = (int(keep.sum()), source.height, source.width, 3)
    with atomic_path(out) as tmp, NpzWriter(tmp) as writer:
        with writer.stream("arr_0", shape) as write, bar, _full_fp32(), torch.inference_mode():
            start = 0
            for chunk in iter_images(source, batch_size):
                write(chunk[keep[start : start + len(chunk)]])
                feats = model(torch.from_numpy(chunk).to(device))
                pool_acc.update(feats.pool.float().cpu().numpy())
                spatial_acc.update(feats.spatial.float().cpu().numpy())
                start += len(chunk)
                bar.update(len(chunk))
        pool, spatial = pool_acc.finalize(), spatial_acc.finalize()
        for name, array in (
            ("mu", pool.mu),
            ("sigma", pool.sigma),
            ("mu_s", spatial.mu),
            ("sigma_s", spatial.sigma),
        ):
            writer.write_array(name, array)
    return Path(out)
