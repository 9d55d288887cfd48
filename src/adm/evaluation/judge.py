"""A clean-image classifier as the "Inception network" of small experiments (`adm demo`,
`adm sweep`): its accuracy on the requested classes measures fidelity to the class, FID and
precision / recall in its feature space against held-out real images measure quality and
diversity (the paper's metrics, §2.2 and App. B, with a judge the size of the data set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from adm.evaluation import metrics


class Judge:
    """The clean-image classifier: logits, and as features the 2048-d hidden layer of its
    "spatial" head (the activations before the last linear layer, like Inception's pool_3)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._features: Tensor | None = None
        hidden = model.out[1]  # spatial head: Linear(features, 2048), ReLU, Linear(2048, classes)
        hidden.register_forward_hook(lambda _m, _i, out: setattr(self, "_features", out))

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray, batch: int = 500) -> tuple[Tensor, Tensor]:
        """uint8 images [N, 28, 28] -> (logits [N, classes] float32, features [N, 2048] float64)."""
        logits, feats = [], []
        device = next(self.model.parameters()).device
        for start in range(0, len(images_uint8), batch):
            x = torch.from_numpy(images_uint8[start : start + batch]).to(device)
            x = x.float().reshape(len(x), 1, 28, 28) / 127.5 - 1
            logits.append(self.model(x, torch.zeros(len(x), dtype=torch.long, device=device)))
            feats.append(self._features)
        return torch.cat(logits).cpu(), torch.cat(feats).cpu().double()


@dataclass(frozen=True)
class JudgeReference:
    """Real images as the judge sees them: features, labels, feature statistics for FID, and
    the judge's own accuracy on them."""

    features: Tensor  # [N, 2048] float64
    labels: np.ndarray  # [N]
    stats: metrics.GaussianStats
    accuracy: float


def judge_reference(
    judge: Judge, images: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> JudgeReference:
    """A random subset of `size` real images (drawn with `seed`) through the judge."""
    rows = np.random.default_rng(seed).permutation(len(images))[:size]
    logits, feats = judge(images[rows])
    accuracy = float((logits.argmax(1).numpy() == labels[rows]).mean())
    return JudgeReference(feats, labels[rows], metrics.compute_statistics(feats), accuracy)


def judge_metrics(
    judge: Judge,
    images: np.ndarray,
    labels: np.ndarray,
    ref: JudgeReference,
    draws: int,
    seed: int,
) -> dict[str, float]:
    """Judge accuracy on the requested labels, FID against all reference images, and precision /
    recall against reference sets of the SAME size and class mix as the samples (k-NN radii are
    only comparable between equally sized sets), averaged over `draws` disjoint draws."""
    logits, feats = judge(images)
    rng = np.random.default_rng(seed)
    by_class = {c: rng.permutation(np.flatnonzero(ref.labels == c)) for c in np.unique(labels)}
    counts = {c: int((labels == c).sum()) for c in by_class}
    precision, recall = [], []
    for d in range(draws):
        rows = np.concatenate([by_class[c][d * counts[c] : (d + 1) * counts[c]] for c in by_class])
        pr = metrics.precision_recall(ref.features[rows], feats, mode="exact")
        precision.append(pr.precision)
        recall.append(pr.recall)
    return {
        "accuracy": float((logits.argmax(1).numpy() == labels).mean()),
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "fid": metrics.frechet_distance_to_features(feats, ref.stats),
    }
