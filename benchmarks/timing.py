"""Repeated timings for the benchmark scripts, with repetitions disturbed by other load flagged.

The machines these run on are shared: a repetition more than `SLOWER` times the fastest one is
marked disturbed and left out of the mean rather than averaged in. `interleaved` times several
calls in turn (A, B, A, B, ...) so that load from other jobs falls on all of them alike, and
`machine()` describes what every figure must be read with: load average, CPU capability, threads.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SLOWER = 1.25


@dataclass(frozen=True)
class Timings:
    times: list[float]  # seconds of each repetition after the warm-up
    cpu: list[float] = field(default_factory=list)  # the process's CPU seconds, when recorded

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
    return Timings([time_call(fn) for _ in range(repeats)])


def time_call(fn: Callable[[], object]) -> float:
    """Seconds of one call (CUDA work included)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, Timings]:
    """`warmup` rounds, then `repeats` rounds of every call in turn (round k of each call is
    the k-th pair/tuple), so that load from other jobs falls on all of them alike. Each timing
    also records the process's CPU time, which time taken by other processes does not inflate
    (with one thread it estimates the undisturbed wall time)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, fn in calls.items():
            start = time.process_time()
            elapsed = time_call(fn)
            if round_ >= warmup:
                times[name].append(elapsed)
                cpu[name].append(time.process_time() - start)
    return {name: Timings(times[name], cpu[name]) for name in calls}


def paired(ours: Timings, theirs: Timings) -> dict:
    """Per-pair ratios theirs / ours (> 1: ours is faster) of two `interleaved` Timings: their
    median over the pairs where neither side was disturbed (all pairs when every pair was), its
    min-max and quartiles, the disturbed count, the median over all pairs and of the CPU-time
    ratios, and each side's median time over the kept pairs."""
    bad = [x or y for x, y in zip(ours.disturbed, theirs.disturbed, strict=True)]
    keep = [i for i, b in enumerate(bad) if not b] or list(range(len(bad)))
    ratios = [theirs.times[i] / ours.times[i] for i in keep]
    all_ratios = [t / o for o, t in zip(ours.times, theirs.times, strict=True)]
    cpu_ratios = [t / o for o, t in zip(ours.cpu, theirs.cpu, strict=True)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_iqr": [q[0], q[-1]],
        "disturbed": sum(bad),
        "pairs": len(bad),
        "ratio_all_pairs": statistics.median(all_ratios),
        "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
        "ours_s": statistics.median(ours.times[i] for i in keep),
        "theirs_s": statistics.median(theirs.times[i] for i in keep),
    }


def machine() -> dict[str, object]:
    """What every figure is read with: CPU model and capability, threads, load, versions."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    info: dict[str, object] = {
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
