"""Repeated timings for the benchmark scripts, with repetitions disturbed by other load flagged.

The machines these run on are shared: a repetition more than `SLOWER` times the fastest one is
marked disturbed and left out of the mean rather than averaged in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SLOWER = 1.25


@dataclass(frozen=True)
class Timings:
    times: list[float]  # seconds of each repetition after the warm-up

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def disturbed(self) -> list[bool]:
        return [t > SLOWER * self.best for t in self.times]

    @property
    def mean(self) -> float:
        """Mean of the undisturbed repetitions."""
        clean = [t for t, d in zip(self.times, self.disturbed, strict=True) if not d]
        return sum(clean) / len(clean)

    def describe(self) -> str:
        """Each repetition in seconds, disturbed ones starred."""
        return " ".join(
            f"{t:.2f}{'*' if d else ''}" for t, d in zip(self.times, self.disturbed, strict=True)
        )


def repeat(fn: Callable[[], object], repeats: int) -> Timings:
    """Time `fn` `repeats` times after one warm-up call (CUDA work included)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return Timings(times)
