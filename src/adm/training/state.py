"""What a training run keeps on disk, and how it comes back after a kill.

A checkpoint at step s is `model_{s:06d}.safetensors`, one `ema_{rate}_{s:06d}.safetensors` per EMA
rate (both with the resolved config embedded, via `adm.models.checkpoint`) and `state_{s:06d}.pt`:
optimizer, grad scaler, timestep-sampler history, every rank's RNG states, the data position and
counters. Every file is written to a temporary name and renamed; the state file is written last, so
a checkpoint exists exactly when its state file does. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adm._util.atomic import atomic_write, atomic_write_text

STATE_FORMAT = "adm-train-state-1"
_STATE_RE = re.compile(r"^state_(\d+)\.pt$")


def format_rate(rate: float) -> str:
    """EMA rate as in the original's file names (`ema_0.9999_200000.pt`)."""
    return str(rate)


def model_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"model_{step:06d}.safetensors"


def ema_path(run_dir: Path, rate: float, step: int) -> Path:
    return Path(run_dir) / f"ema_{format_rate(rate)}_{step:06d}.safetensors"


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"state_{step:06d}.pt"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (its state file exists), ascending."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = (_STATE_RE.match(p.name) for p in run_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_step(run_dir: Path) -> int | None:
    steps = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (state file first, so a half-deleted
    checkpoint is never taken for a complete one)."""
    for step in checkpoint_steps(run_dir)[:-keep] if keep > 0 else []:
        state_path(run_dir, step).unlink(missing_ok=True)
        for p in Path(run_dir).glob(f"*_{step:06d}.safetensors"):
            p.unlink(missing_ok=True)


def save_state(run_dir: Path, step: int, state: dict[str, Any]) -> None:
    """The training-state file: plain tensors, numbers, strings, lists and dicts only, so it
    loads with `torch.load(weights_only=True)`."""
    payload = {"format": STATE_FORMAT, "step": step, **state}
    atomic_write(state_path(run_dir, step), lambda tmp: torch.save(payload, tmp))


def load_state(run_dir: Path, step: int) -> dict[str, Any]:
    path = state_path(run_dir, step)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an adm training-state file")
    return state


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")


class EMA:
    """Exponential moving averages of a model's parameters, one copy per rate:
    ema ← rate·ema + (1 − rate)·θ after every optimizer step taken (the original's update)."""

    def __init__(self, model: nn.Module, rates: Sequence[float]):
        self.rates = tuple(float(r) for r in rates)
        self.names = [name for name, _ in model.named_parameters()]
        self.params = {
            rate: [p.detach().clone().float() for p in model.parameters()] for rate in self.rates
        }

    @torch.no_grad()
    def update(self, params: Iterable[Tensor]) -> None:
        params = [p.detach() for p in params]
        for rate, ema in self.params.items():
            torch._foreach_mul_(ema, rate)
            torch._foreach_add_(ema, [p.float() for p in params], alpha=1 - rate)

    def state_dict(self, model: nn.Module, rate: float) -> dict[str, Tensor]:
        """The model's state dict with the parameters replaced by the EMA of `rate`."""
        averaged = dict(zip(self.names, self.params[rate], strict=True))
        return {k: averaged.get(k, v) for k, v in model.state_dict().items()}

    def load(self, rate: float, state_dict: dict[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in state_dict]
        if missing:
            raise ValueError(f"EMA {rate}: checkpoint lacks {len(missing)} parameters")
        for dst, name in zip(self.params[rate], self.names, strict=True):
            dst.copy_(state_dict[name])
