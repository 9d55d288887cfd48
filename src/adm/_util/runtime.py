"""Run-time speed settings for the networks: device, precision (torch.amp), channels_last, compile.

The configs and checkpoints stay fp32 (as the original saves them); precision is chosen when
running. On CUDA, bf16/fp16 run under `torch.autocast` (GroupNorm still normalises in fp32, as the
original's fp16 mode); on the CPU everything runs in fp32, where bf16 autocast is slower.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import nn

__all__ = [
    "Precision",
    "autocast",
    "compile_model",
    "default_device",
    "prepare_model",
    "resolve_precision",
]

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """The precision that will actually be used: as asked on CUDA, fp32 elsewhere (with a warning
    when something else was asked)."""
    if precision not in get_args(Precision):
        choices = ", ".join(get_args(Precision))
        raise ValueError(f"precision must be one of {choices}; got {precision!r}")
    if torch.device(device).type != "cuda" and precision != "fp32":
        warnings.warn(
            f"precision {precision} is only used on CUDA; running in fp32 on {device}", stacklevel=2
        )
        return "fp32"
    return precision  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on CUDA, a no-op otherwise. Enter it once around a whole
    sampling loop: the casts of the weights are then made once, not at every step."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[resolved])


def prepare_model(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    trainable: bool = False,
    label: str = "model",
) -> nn.Module:
    """Move `model` to `device` for fast inference (or training when `trainable`).

    `channels_last=None` picks NHWC on CUDA (faster convolutions with tensor cores) and, for
    inference, on the CPU (guided sampling ~7% faster there); CPU training stays NCHW, where
    GroupNorm's backward is slower in NHWC (docs/speed.md). `compile=True` wraps the model
    in `torch.compile` (`compile_model`: the first call compiles; see docs/speed.md).
    Inference models are put in eval mode with parameters frozen, which skips weight gradients
    when guidance differentiates through a classifier.
    """
    device = torch.device(device) if device is not None else default_device()
    if channels_last is None:
        channels_last = device.type == "cuda" or not trainable
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not trainable:
        model.eval().requires_grad_(False)
    if compile:
        model = compile_model(model, label=label, mode=compile_mode)
    return model


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_model(
    model: nn.Module,
    *,
    label: str = "model",
    mode: str | None = None,
    report: Callable[[str], None] = _stderr,
) -> nn.Module:
    """`torch.compile(model)`, reporting how long its first call took (that call compiles).

    The compiled module forwards attribute access (`.config`, `.parameters()`) to `model` and
    shares its parameters; a new input shape (e.g. a smaller last batch) compiles again.
    """
    compiled: nn.Module = torch.compile(model, mode=mode)  # type: ignore[assignment]
    start: list[float] = []

    def before(_module: nn.Module, _args: object) -> None:
        start.append(time.perf_counter())

    def after(_module: nn.Module, _args: object, _out: object) -> None:
        seconds = time.perf_counter() - start[0]
        pre.remove()
        post.remove()
        report(f"{label}: torch.compile: the first call (compiling) took {seconds:.1f} s")

    pre = compiled.register_forward_pre_hook(before)
    post = compiled.register_forward_hook(after)
    return compiled
