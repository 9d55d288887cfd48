"""Timestep samplers for training (guided-diffusion `resample.py`; Nichol & Dhariwal 2021 §3.3).

The loss is an expectation over t; drawing t from p_t and weighting the per-example loss by
1 / (T·p_t) keeps it unbiased. `uniform` is p_t = 1/T. `loss-second-moment` is importance
sampling with p_t ∝ sqrt(E[L_t²]) over the last 10 losses of every t (Eq. 18 of improved DDPM),
mixed with 0.1% of uniform, and uniform until every t has 10 losses. Draws come from an explicit
`torch.Generator`; the history is plain state that checkpoints save and resume restores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

SamplerName = Literal["uniform", "loss-second-moment"]


class UniformSampler:
    """p_t = 1/T; every importance weight is 1."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def weights(self) -> np.ndarray:
        return np.ones([self.num_steps], dtype=np.float64)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """n timesteps t ~ p and their weights 1 / (T·p_t): ([n] int64, [n] float32)."""
        w = self.weights()
        p = w / w.sum()
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        idx = np.minimum(np.searchsorted(np.cumsum(p), u, side="right"), len(p) - 1)
        weights = 1.0 / (len(p) * p[idx])
        return (
            torch.from_numpy(idx.astype(np.int64)).to(device),
            torch.from_numpy(weights).float().to(device),
        )

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the per-example losses of ALL ranks (identical on every rank)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """p_t ∝ sqrt(mean of the last `history_per_term` squared losses at t) (improved DDPM Eq. 18).

    Unlike the original (which crashes on numpy >= 1.24 through `np.int`), the counts are int64.
    """

    def __init__(self, num_steps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_steps)
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self.loss_history = np.zeros([num_steps, history_per_term], dtype=np.float64)
        self.loss_counts = np.zeros([num_steps], dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones([self.num_steps], dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, loss in zip(t.tolist(), losses.double().tolist(), strict=True):
            if self.loss_counts[ti] == self.history_per_term:  # shift out the oldest
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "loss_history": torch.from_numpy(self.loss_history.copy()),
            "loss_counts": torch.from_numpy(self.loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        history, counts = state["loss_history"].numpy(), state["loss_counts"].numpy()
        if history.shape != self.loss_history.shape:
            raise ValueError(
                f"timestep-sampler history has shape {list(history.shape)}, "
                f"expected {list(self.loss_history.shape)}"
            )
        self.loss_history, self.loss_counts = history.astype(np.float64), counts.astype(np.int64)


def create_sampler(name: SamplerName, num_steps: int) -> UniformSampler:
    """The original's `create_named_schedule_sampler` (names "uniform", "loss-second-moment")."""
    if name == "uniform":
        return UniformSampler(num_steps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_steps)
    raise ValueError(f"unknown timestep sampler {name!r}: expected uniform or loss-second-moment")
