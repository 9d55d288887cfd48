"""What the user sees of a training run (rank 0 only): a CSV log, TensorBoard when installed,
a loss-curve PNG and image grids. Replaces the original's OpenAI-baselines logger configured by
environment variables; everything lands in the run folder given on the command line.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adm._util.atomic import atomic_path


class MetricMeter:
    """Accumulates per-step values between two log lines; `means()` averages them."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.latest: dict[str, float] = {}

    def add(self, name: str, value: float, count: int = 1) -> None:
        if count and math.isfinite(value):
            self.sums[name] += value * count
            self.counts[name] += count

    def add_by_quartile(self, name: str, values: Tensor, t: Tensor, num_steps: int) -> None:
        """Per-example values also logged by quarter of the timestep range (`name_q0..q3`), as
        the original's `log_loss_dict` (quartile = int(4·t / T))."""
        values, t = values.detach().double().cpu(), t.cpu()
        self.add(name, values.mean().item(), len(values))
        quartile = (4 * t // num_steps).clamp(max=3)
        for q in range(4):
            sel = values[quartile == q]
            if len(sel):
                self.add(f"{name}_q{q}", sel.mean().item(), len(sel))

    def set(self, name: str, value: float) -> None:
        """A value logged as its latest setting (the learning rate, the loss scale)."""
        self.latest[name] = value

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        return {**out, **self.latest}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.latest.clear()


class CSVLog:
    """`log.csv` with a fixed header; a resumed run first drops rows past its step."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None = None):
        self.path, self.columns = Path(path), list(columns)
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if _step(r) <= resume_step]
            self._write(rows)
        elif not self.path.exists() or resume_step is None:
            self._write([])

    def _write(self, rows: list[dict]) -> None:
        """The header and `rows`, written atomically (a kill leaves the old log or the new)."""
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: _fmt(v) for k, v in row.items()}
            )

    def read(self) -> dict[str, np.ndarray]:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {
            c: np.array([float(r[c]) if r.get(c) else np.nan for r in rows]) for c in self.columns
        }


def _step(row: dict) -> float:
    """The step of a CSV row; a row cut short by a kill counts as past every checkpoint."""
    try:
        return int(row["step"]) if None not in row else math.inf
    except (TypeError, ValueError):
        return math.inf


def _fmt(v: float) -> str | float:
    return f"{v:.6g}" if isinstance(v, float) else v


def open_tensorboard(run_dir: Path):
    """A TensorBoard SummaryWriter under `run_dir/tensorboard`, or None when not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"))


def plot_curves(log: CSVLog, path: Path, keys: Sequence[str]) -> bool:
    """Loss curves (log scale) from the CSV log to a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = log.read()
    if not len(data["step"]):
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        y = data.get(key)
        if y is not None and np.isfinite(y).any():
            ax.plot(data["step"], y, label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def save_grid(images: Tensor, path: Path, nrow: int | None = None) -> None:
    """[N, C, H, W] images in [-1, 1] -> one PNG grid (quantised as the original's samples)."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    arr = ((images.float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(c, ncol * h, nrow * w, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = arr[i]
    out = grid.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(out[..., 0] if c == 1 else out).save(tmp, format="PNG")
