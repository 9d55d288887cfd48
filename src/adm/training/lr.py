"""The learning rate of a run: constant, or the original's linear anneal to zero (guided-diffusion
`TrainLoop._anneal_lr`: lr·(1 − (step + resume_step)/lr_anneal_steps); `classifier_train.py`
with `anneal_lr`), and what a resumed run does when `--steps`, `--anneal-lr` or `--lr` changed.

The LR of step s is a function of the current flags only: lr·(1 − s/steps) with `--anneal-lr`,
else lr. A resumed run with a new `--steps` therefore continues the anneal over the new total,
as if the run had been started with it (the original's rule); the LR may rise or fall at the
resume point, and `resume_note` says so in one line. Every training-state file records the
schedule its steps were trained with, so the note can tell what changed. Dropping `--anneal-lr`
on resume is refused. Reasons: docs/training.md, "Changing --steps, --anneal-lr or --lr on resume".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["LRSchedule", "ScheduleConflict", "resume_note"]


class ScheduleConflict(ValueError):
    """The flags of a resumed run contradict the LR schedule its checkpoint was trained with."""


@dataclass(frozen=True)
class LRSchedule:
    """`lr` (`--lr`), `total` (`--steps`) and whether the LR is annealed (`--anneal-lr`)."""

    lr: float
    total: int
    anneal: bool

    def at(self, step: int) -> float:
        """The LR of the optimisation step `step` (0-based; step 0 uses `lr`)."""
        return self.lr * (1 - step / self.total) if self.anneal else self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRSchedule:
        return cls(lr=float(d["lr"]), total=int(d["total"]), anneal=bool(d["anneal"]))


def resume_note(saved: LRSchedule, now: LRSchedule, step: int) -> str | None:
    """One line on what happens to the LR when a run whose checkpoint at `step` was trained with
    `saved` continues with `now` (None: nothing changed, or nothing is left to train).
    Raises `ScheduleConflict` when `--anneal-lr` is dropped."""
    if step >= now.total or saved == now:
        return None
    last, first = saved.at(step - 1), now.at(step)
    if saved.anneal and not now.anneal:
        raise ScheduleConflict(
            f"the run was trained with --anneal-lr ({last:.2e} at step {step - 1}); without it "
            f"the LR would jump back up to --lr {now.lr:g}: resume with --anneal-lr, or "
            "fine-tune its checkpoint with --init-from into a new --out"
        )
    was = f" (was {saved.total})" if saved.total != now.total else ""
    where = f"at step {step} of {now.total}{was}"
    if not now.anneal:
        if first == last:
            return f"{where}: the LR stays constant at {first:.2e}"
        return f"{where}: the constant LR changes from {last:.2e} to {first:.2e}"
    how = "continues" if saved.anneal else "starts"
    move = "rises" if first > last else "falls" if first < last else None
    change = f"{move} from {last:.2e} (step {step - 1}) to" if move else "stays at"
    return (
        f"{where}: --anneal-lr {how} linearly to 0 at step {now.total}, "
        f"lr·(1 − step/{now.total}) as if the run had been started with --steps {now.total} "
        f"and --lr {now.lr:g}; the LR {change} {first:.2e}"
    )
