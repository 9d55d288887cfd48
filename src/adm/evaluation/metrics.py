"""Sample-quality metrics of the ADM evaluator as plain functions of feature matrices.

FID / sFID (Heusel et al. 2017; Nash et al. 2021), Inception Score (Salimans et al. 2016, the
evaluator's consecutive splits) and improved precision / recall (Kynkäänniemi et al. 2019, k = 3),
with the numerics of guided-diffusion `evaluations/evaluator.py`; KID (Bińkowski et al. 2018) with
torch-fidelity's subsets. Independent of any network (FD-DINOv2 is `frechet_distance` too).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

DistanceMode = Literal["original", "exact"]


# --------------------------------------------------------------------------- Gaussian statistics


@dataclass(frozen=True)
class GaussianStats:
    """Mean [D] and unbiased (N - 1) covariance [D, D] of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray


class StatsAccumulator:
    """Streaming mean and covariance in float64 (shifted sums: no catastrophic cancellation)."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | Tensor) -> None:
        """Add rows of a [B, D] feature matrix."""
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        d = x - self._shift
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d
        self.n += x.shape[0]

    def finalize(self) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 rows, got {self.n}")
        mean_d = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return GaussianStats(self._shift + mean_d, (sigma + sigma.T) / 2)


def compute_statistics(features: np.ndarray | Tensor, chunk: int = 4096) -> GaussianStats:
    """Row mean and unbiased covariance of [N, D] features, accumulated in float64 (as `np.cov`)."""
    acc = StatsAccumulator()
    for start in range(0, len(features), chunk):
        acc.update(features[start : start + chunk])
    return acc.finalize()


def frechet_distance(sample: GaussianStats, ref: GaussianStats, eps: float = 1e-6) -> float:
    """‖μ_s − μ_r‖² + tr Σ_s + tr Σ_r − 2 tr (Σ_s Σ_r)^½ (FID; sFID on spatial features).

    tr (Σ_s Σ_r)^½ = Σ_i Re √λ_i over the eigenvalues λ_i of Σ_s·Σ_r in float64: the trace of the
    reference's `scipy.linalg.sqrtm` without its cost. If the eigen-solver fails, retry with eps·I
    added to both covariances, as the reference does when sqrtm is not finite.
    """
    mu1, mu2 = np.asarray(sample.mu, np.float64), np.asarray(ref.mu, np.float64)
    s1, s2 = np.asarray(sample.sigma, np.float64), np.asarray(ref.sigma, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {s1.shape} vs {s2.shape}"
        )
    for name, a in (("mu", mu1), ("mu", mu2), ("sigma", s1), ("sigma", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"non-finite values in {name}")
    try:
        eigenvalues = np.linalg.eigvals(s1 @ s2)
    except np.linalg.LinAlgError:
        warnings.warn(
            f"eigenvalues of Σ_s·Σ_r failed; retrying with {eps}·I added to both", stacklevel=2
        )
        offset = np.eye(len(s1)) * eps
        eigenvalues = np.linalg.eigvals((s1 + offset) @ (s2 + offset))
    tr_covmean = np.sqrt(eigenvalues.astype(np.complex128)).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_to_features(sample_features: np.ndarray | Tensor, ref: GaussianStats) -> float:
    """The Fréchet distance of a SMALL sample set (N < D) to reference statistics, exactly.

    With Σ_s = AᵀA/(N−1) for the centred features A [N, D], the non-zero eigenvalues of Σ_s·Σ_r
    are those of A Σ_r Aᵀ/(N−1) [N, N], so tr (Σ_s Σ_r)^½ costs an N×N eigenproblem instead of a
    D×D one. Equal to `frechet_distance(compute_statistics(features), ref)`.
    """
    x = _as_float64(sample_features)
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != len(ref.mu):
        raise ValueError(f"features must be [N >= 2, {len(ref.mu)}], got shape {x.shape}")
    mu = x.mean(axis=0)
    a = x - mu
    small = a @ np.asarray(ref.sigma, np.float64) @ a.T / (len(x) - 1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh((small + small.T) / 2).clip(min=0)).sum()
    tr_sample = float((a * a).sum() / (len(x) - 1))
    diff = mu - np.asarray(ref.mu, np.float64)
    return float(diff @ diff + tr_sample + np.trace(ref.sigma) - 2 * tr_covmean)


# --------------------------------------------------------------------------- Inception Score


def inception_score_splits(logits: np.ndarray | Tensor, split_size: int = 5000) -> np.ndarray:
    """Per-split Inception Scores of [N, C] logits over consecutive, unshuffled chunks of
    `split_size` rows (the last one may be shorter): exp(mean_i KL(p_i ‖ p̄)), p = softmax."""
    x = _as_float64(logits)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"logits must be a non-empty [N, C] matrix, got shape {x.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, len(x), split_size):
        part = x[start : start + split_size]
        log_p = part - part.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log-softmax
        p = np.exp(log_p)
        # Where p_ij underflows to 0 the term is 0 (the float32 reference would give NaN).
        with np.errstate(divide="ignore", invalid="ignore"):
            log_p_mean = np.log(p.mean(axis=0))
            kl = np.where(p > 0, p * (log_p - log_p_mean), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return np.asarray(scores)


def inception_score(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """Mean over `inception_score_splits` (the evaluator reports no standard deviation)."""
    return float(inception_score_splits(logits, split_size).mean())


def inception_score_std(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """Standard deviation (ddof 0, as torch-fidelity's `np.std`) of `inception_score_splits`;
    0 for a single split."""
    return float(inception_score_splits(logits, split_size).std())


# --------------------------------------------------------------------------- KID


@dataclass(frozen=True)
class KernelDistance:
    mean: float  # KID: the mean over subsets of the unbiased MMD²
    std: float  # its standard deviation over subsets (ddof 0)
    subset_size: int  # rows per subset (clamped to the smaller set)
    subsets: int


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² of [m, D] sets x, y with k(a, b) = (a·b / D + coef0)^degree (Bińkowski et al.
    2018, Eq. 4): mean of k over distinct pairs within x and within y, minus twice the mean of k
    over all x-y pairs."""
    m = len(x)
    k_xx = (x @ x.T / x.shape[1] + coef0) ** degree
    k_yy = (y @ y.T / x.shape[1] + coef0) ** degree
    k_xy = (x @ y.T / x.shape[1] + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_distance(
    sample_features: np.ndarray | Tensor,
    ref_features: np.ndarray | Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 2020,
) -> KernelDistance:
    """Kernel Inception Distance of [N_s, D] sample vs [N_r, D] reference features.

    torch-fidelity's procedure (`kid_features_to_metric`, input1 = samples, input2 = reference):
    `subsets` times, draw `subset_size` rows of each set without replacement from one
    `np.random.RandomState(seed)` (samples first), take `polynomial_mmd2`; report mean and std.
    Computed in float64 (torch-fidelity: float32). A subset larger than a set is clamped to it.
    """
    x, y = _as_float64(sample_features), _as_float64(ref_features)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature shapes do not match: {x.shape}, {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 of >= 2 rows, got {subsets} of {m}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        mmds[i] = polynomial_mmd2(xs, ys, degree, coef0)
    return KernelDistance(float(mmds.mean()), float(mmds.std()), m, subsets)


# --------------------------------------------------------------------------- precision / recall


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # fraction of samples inside the reference manifold
    recall: float  # fraction of reference points inside the sample manifold
    fp16_fallback: bool  # some distance block overflowed float16 and was recomputed in float32


def _sq_distances(u: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """max(‖u‖² − 2 u·v + ‖v‖², 0) in the reference's order of operations, [B1, B2] in `dtype`.

    float16 follows a GPU: fp16 inputs and elementwise ops, matmul and sums accumulated in fp32.
    """
    u, v = u.to(dtype), v.to(dtype)
    if dtype == torch.float16:
        nu = u.square().float().sum(1).half()
        nv = v.square().float().sum(1).half()
        uv = (u.float() @ v.float().T).half()
    else:
        nu, nv, uv = u.square().sum(1), v.square().sum(1), u @ v.T
    d = (nu[:, None] - 2 * uv) + nv[None, :]
    return torch.maximum(d, torch.zeros((), dtype=dtype, device=d.device))  # NaN stays NaN


def distance_block(u: Tensor, v: Tensor, mode: DistanceMode = "original") -> tuple[Tensor, bool]:
    """Squared distances [B1, B2] and whether the float16 block overflowed.

    "original": the evaluator's `DistanceBlock` — float16, recomputed in float32 if any entry is
    not finite, returned as float32. "exact": float64 throughout.
    """
    if mode == "exact":
        return _sq_distances(u, v, torch.float64), False
    if mode != "original":
        raise ValueError(f"mode must be 'original' or 'exact', got {mode!r}")
    d = _sq_distances(u, v, torch.float16)
    if bool(torch.isfinite(d).all()):
        return d.float(), False
    return _sq_distances(u, v, torch.float32), True


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def manifold_radii(
    features: Tensor,
    *,
    k: int = 3,
    mode: DistanceMode = "original",
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> tuple[Tensor, bool]:
    """Squared distance of each row to its k-th nearest neighbour in the same set (itself excluded:
    the (k+1)-th smallest of its row), from block-wise running top-k; and the fallback flag."""
    n = len(features)
    if n < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} points for k-NN radii, got {n}")
    radii, fell_back = [], False
    for rows in _blocks(n, row_batch_size):
        best = None
        for cols in _blocks(n, col_batch_size):
            d, fb = distance_block(features[rows], features[cols], mode)
            fell_back |= fb
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii), fell_back


def precision_recall(
    ref_features: np.ndarray | Tensor,
    sample_features: np.ndarray | Tensor,
    *,
    k: int = 3,
    mode: DistanceMode = "original",
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    device: str | torch.device | None = None,
) -> PrecisionRecall:
    """Improved precision and recall of [N_r, D] reference vs [N_s, D] sample features.

    A point is inside a set's manifold if its squared distance to ANY point of that set is <= that
    point's k-NN radius. Distances are computed in (row_batch_size x col_batch_size) blocks (memory
    bounded; the float16 overflow fallback is decided per block, as in the reference).
    """
    ref, sample = (
        _as_float32_tensor(ref_features, device),
        _as_float32_tensor(sample_features, device),
    )
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature shapes do not match: {tuple(ref.shape)}, {tuple(sample.shape)}")
    blocks = {
        "k": k,
        "mode": mode,
        "row_batch_size": row_batch_size,
        "col_batch_size": col_batch_size,
    }
    ref_radii, fb_ref = manifold_radii(ref, **blocks)
    sample_radii, fb_sample = manifold_radii(sample, **blocks)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    fell_back = fb_ref or fb_sample
    for rows in _blocks(len(ref), row_batch_size):
        for cols in _blocks(len(sample), col_batch_size):
            d, fb = distance_block(ref[rows], sample[cols], mode)
            fell_back |= fb
            ref_inside[rows] |= (d <= sample_radii[cols][None, :]).any(1)
            sample_inside[cols] |= (d <= ref_radii[rows][:, None]).any(0)
    return PrecisionRecall(
        precision=float(sample_inside.double().mean()),
        recall=float(ref_inside.double().mean()),
        fp16_fallback=fell_back,
    )


# --------------------------------------------------------------------------- helpers


def _as_float64(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_float32_tensor(x: np.ndarray | Tensor, device: str | torch.device | None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device or t.device, dtype=torch.float32)
