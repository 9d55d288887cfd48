"""Checks of option values shared by the commands: one-line `UserError`s before any work starts.

Light on purpose (no torch): the commands call these first, so that a zero, a negative count or an
output folder that cannot be made is reported at once, not after a model has loaded or hours of
training have run.
"""

from __future__ import annotations

import argparse
import math
import os

from adm._util.atomic import check_writable_dir
from adm._util.errors import UserError

# The help of `--compile` (adm sample, upsample, sweep, train*).
COMPILE_HELP = (
    "torch.compile the networks: the first call compiles (its time is printed), later calls "
    "may run faster; pays off only on long runs (docs/speed.md)"
)


def flag(dest: str) -> str:
    """The option spelling of an argparse dest: "batch_size" -> "--batch-size"."""
    return "--" + dest.replace("_", "-")


def at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Each named option, where given (not None), is >= its minimum."""
    for dest, low in minimums.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise UserError(f"{flag(dest)} must be at least {low}, got {value}")


def in_range(args: argparse.Namespace, dest: str, low: float, high: float | None = None) -> None:
    """`low <= value` (and `value < high` where given) for an option given (not None)."""
    value = getattr(args, dest, None)
    if value is None or (value >= low and (high is None or value < high)):
        return
    bounds = f"at least {low:g}" if high is None else f"in [{low:g}, {high:g})"
    raise UserError(f"{flag(dest)} must be {bounds}, got {value:g}")


def writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """`path` is a folder, or can be made one, that files can be written to (nothing is left)."""
    try:
        check_writable_dir(path, what)
    except ValueError as err:
        raise UserError(str(err)) from None


def finite(args: argparse.Namespace, *dests: str) -> None:
    """Each named float option, where given, is a finite number (not nan, inf or -inf)."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag(dest)} must be a finite number, got {value}")


def cfg_null_label(
    flag_value: int | None, model_null: int | None, model_classes: int | None
) -> int:
    """The label classifier-free guidance feeds as "no label": `--cfg-null-label`, else the one
    the model was trained with (its `sampling.null_label`), else the last label index."""
    if model_classes is None:
        raise UserError("--cfg-scale needs a class-conditional model (trained with label dropout)")
    null = flag_value if flag_value is not None else model_null
    null = model_classes - 1 if null is None else null
    if not 0 <= null < model_classes:
        raise UserError(f"--cfg-null-label {null} is out of range (0..{model_classes - 1})")
    return null


def sampled_classes(
    num_classes: int | None,
    model_classes: int | None,
    null_label: int | None,
    model_null: int | None,
) -> int | None:
    """How many classes to draw from: a null label in the last row (training's convention), used
    by `--cfg-scale` or recorded by label-dropout training, is not a class to sample."""
    if num_classes is None or model_classes is None or num_classes != model_classes:
        return num_classes
    if null_label is not None or model_null == model_classes - 1:
        return model_classes - 1
    return num_classes
