"""`adm eval` and `adm stats`: features of two inputs -> the chosen metrics.

The pipeline of guided-diffusion `evaluations/evaluator.py` (Dhariwal & Nichol 2021, Sec. 4 and App.
B) for its five numbers: both sides through the 2015 Inception graph (`adm.evaluation.inception`),
the metrics of `adm.evaluation.metrics`, reference statistics taken from the file when it stores
them. Added: any input kind (`adm.evaluation.inputs`), a metric subset, IS std, KID, FD-DINOv2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adm._util.atomic import atomic_path
from adm.evaluation.batches import BatchError, ImageSource, NpzWriter, iter_images
from adm.evaluation.features import (  # noqa: F401  (re-exported: the library API of `adm eval`)
    BatchFeatures,
    batch_dinov2,
    batch_features,
    default_device,
    extract_features,
    full_fp32,
    image_features,
    progress_bar,
)
from adm.evaluation.inception import InceptionV3
from adm.evaluation.inputs import (
    DEFAULT_METRICS,
    STATS_OF,
    EvalInput,
    check_requirements,
    needs_inception,
    networks_needed,  # noqa: F401  (re-exported)
    open_input,
    uses_stats,
)
from adm.evaluation.metrics import (
    DistanceMode,
    GaussianStats,
    StatsAccumulator,
    frechet_distance,
    inception_score,
    inception_score_std,
    kernel_distance,
    precision_recall,
)

MIN_IMAGES = 4  # k + 1 for the k = 3 nearest-neighbour radii of precision / recall


@dataclass(frozen=True)
class EvalResult:
    """The chosen metrics (None where not chosen); `metrics` lists them in the report's order."""

    inception_score: float | None = None
    fid: float | None = None
    sfid: float | None = None
    precision: float | None = None
    recall: float | None = None
    n_ref: int | None = None  # images of each side (None: a statistics file)
    n_sample: int | None = None
    ref_stats_from_file: bool = False  # FID used the reference file's stored mu/sigma
    fp16_fallback: bool = False  # a float16 distance block overflowed and was recomputed in fp32
    inception_score_std: float | None = None  # over the same splits (ddof 0)
    kid: float | None = None
    kid_std: float | None = None
    kid_subset_size: int | None = None
    fd_dinov2: float | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    stats_from_file: dict[str, list[str]] = field(default_factory=dict)  # side -> metrics


@dataclass(frozen=True)
class Settings:
    """How `evaluate_inputs` runs: batching, cache, IS splits, P&R distances, KID subsets."""

    batch_size: int = 64
    use_cache: bool = True
    split_size: int = 5000
    distance_mode: DistanceMode = "original"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    progress: bool = True


def check_eval_inputs(
    ref_spec: str | os.PathLike,
    sample_spec: str | os.PathLike,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> tuple[EvalInput, EvalInput]:
    """Open both inputs (headers and stored statistics only) and check that every chosen metric
    can be computed from them, before any work."""
    ref, sample = open_input(ref_spec), open_input(sample_spec)
    check_requirements(metrics, ref, sample)
    return ref, sample


def _side_stats(
    metric: str, inp: EvalInput, side: str, feats: BatchFeatures | None, dino
) -> GaussianStats:
    if uses_stats(metric, inp, side):
        return GaussianStats(*inp.stats[STATS_OF[metric]])
    if metric == "fd_dinov2":
        return dino.stats
    return feats.pool_stats if metric == "fid" else feats.spatial_stats


def evaluate_inputs(
    ref: EvalInput,
    sample: EvalInput,
    metrics: tuple[str, ...],
    inception: InceptionV3 | None,
    dinov2: torch.nn.Module | None = None,
    settings: Settings | None = None,
) -> EvalResult:
    """The chosen metrics of two checked inputs (`check_eval_inputs`). Only the features the
    metrics need are extracted: Inception of a side only for IS (samples), P&R, KID or a FID/sFID
    without stored statistics; DINOv2 only for FD-DINOv2 without stored statistics."""
    cfg = settings or Settings()
    kw = {"batch_size": cfg.batch_size, "use_cache": cfg.use_cache, "progress": cfg.progress}
    sides = {"ref": ref, "sample": sample}
    inc, dino = {}, {}
    for side, inp in sides.items():
        if any(needs_inception(m, inp, side) for m in metrics):
            inc[side] = batch_features(inp.images, inception, **kw)
        if "fd_dinov2" in metrics and not uses_stats("fd_dinov2", inp, side):
            dino[side] = batch_dinov2(inp.images, dinov2, **kw)
    out: dict = {"metrics": metrics}
    for m in ("fid", "sfid", "fd_dinov2"):
        if m in metrics:
            s, r = (_side_stats(m, sides[k], k, inc.get(k), dino.get(k)) for k in ("sample", "ref"))
            out[m] = frechet_distance(s, r)
    if "is" in metrics:
        out["inception_score"] = inception_score(inc["sample"].logits, cfg.split_size)
        out["inception_score_std"] = inception_score_std(inc["sample"].logits, cfg.split_size)
    if "pr" in metrics:
        device = next(inception.parameters()).device
        pr = precision_recall(inc["ref"].pool, inc["sample"].pool, mode=cfg.distance_mode,
                              device=device)  # fmt: skip
        out.update(precision=pr.precision, recall=pr.recall, fp16_fallback=pr.fp16_fallback)
    if "kid" in metrics:
        k = kernel_distance(inc["sample"].pool, inc["ref"].pool, subsets=cfg.kid_subsets,
                            subset_size=cfg.kid_subset_size)  # fmt: skip
        out.update(kid=k.mean, kid_std=k.std, kid_subset_size=k.subset_size)
    used = {s: [m for m in metrics if uses_stats(m, inp, s)] for s, inp in sides.items()}
    return EvalResult(
        **out,
        n_ref=ref.images.n if ref.images else None,
        n_sample=sample.images.n if sample.images else None,
        ref_stats_from_file="fid" in used["ref"],
        stats_from_file={s: v for s, v in used.items() if v},
    )


def evaluate(
    ref_batch: str | os.PathLike,
    sample_batch: str | os.PathLike,
    model: InceptionV3 | None,
    *,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    dinov2: torch.nn.Module | None = None,
    **settings,
) -> EvalResult:
    """The evaluator end to end (`settings`: the fields of `Settings`). With the default metrics:
    FID/sFID against the reference file's stored statistics when present (else those of its
    images); precision/recall between the two sides' images; IS of the samples in consecutive
    splits of `split_size`."""
    ref, sample = check_eval_inputs(ref_batch, sample_batch, metrics)
    return evaluate_inputs(ref, sample, metrics, model, dinov2, Settings(**settings))


# --------------------------------------------------------------------------- sweeps (one reference)


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
    """The paper's five numbers of in-memory sample features against a loaded `Reference`."""
    device = next(model.parameters()).device
    pr = precision_recall(ref.features.pool, sample.pool, mode=distance_mode, device=device)
    return EvalResult(
        inception_score=inception_score(sample.logits, split_size),
        inception_score_std=inception_score_std(sample.logits, split_size),
        fid=frechet_distance(sample.pool_stats, ref.pool_stats),
        sfid=frechet_distance(sample.spatial_stats, ref.spatial_stats),
        precision=pr.precision,
        recall=pr.recall,
        n_ref=ref.n,
        n_sample=len(sample.pool),
        ref_stats_from_file=ref.from_file,
        fp16_fallback=pr.fp16_fallback,
    )


def build_reference_batch(
    source: ImageSource,
    out: str | os.PathLike,
    model: InceptionV3,
    *,
    num_images: int = 10000,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    dinov2: torch.nn.Module | None = None,
) -> Path:
    """Write a reference batch: `mu`, `sigma`, `mu_s`, `sigma_s` (and with `dinov2`, `mu_dinov2`,
    `sigma_dinov2`) over every image of `source`, and `arr_0` = a seeded uniform subset of
    `num_images` of them (file order kept) for P&R and KID. One pass over the images."""
    if source.n < 2:
        raise BatchError(f"{source.path}: statistics need at least 2 images, got {source.n}")
    rng = np.random.default_rng(seed)
    keep = np.zeros(source.n, dtype=bool)
    keep[rng.choice(source.n, size=min(num_images, source.n), replace=False)] = True
    device = next(model.parameters()).device
    acc = {"": StatsAccumulator(), "_s": StatsAccumulator(), "_dinov2": StatsAccumulator()}
    bar = progress_bar(source, "Inception" + (" + DINOv2" if dinov2 else ""), progress)
    shape = (int(keep.sum()), source.height, source.width, 3)
    with atomic_path(out) as tmp, NpzWriter(tmp) as writer:
        with writer.stream("arr_0", shape) as write, bar, full_fp32(), torch.inference_mode():
            start = 0
            for chunk in iter_images(source, batch_size):
                write(chunk[keep[start : start + len(chunk)]])
                images = torch.from_numpy(chunk).to(device)
                feats = model(images)
                acc[""].update(feats.pool.float().cpu().numpy())
                acc["_s"].update(feats.spatial.float().cpu().numpy())
                if dinov2 is not None:
                    acc["_dinov2"].update(dinov2(images).float().cpu().numpy())
                start += len(chunk)
                bar.update(len(chunk))
        for suffix, stats in acc.items():
            if stats.n:
                done = stats.finalize()
                writer.write_array(f"mu{suffix}", done.mu)
                writer.write_array(f"sigma{suffix}", done.sigma)
    return Path(out)
