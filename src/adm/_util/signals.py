"""A clean stop on SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and `kill` send).

Inside `stop_on_signals()`, the first SIGINT or SIGTERM only sets a flag; long loops (training
steps, sampling batches, sweep cells) look at it at their next boundary with `requested()`, save
what they have, and raise `Interrupted`, which the CLI prints as one line and turns into exit
status 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once:
every file adm writes goes through an atomic rename, so an immediate exit leaves the previous
version of each file whole, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None


class Interrupted(Exception):
    """A loop stopped at a boundary because of a signal; `str()` says what was kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal received since `stop_on_signals()` began, or None."""
    return _requested


def _handler(signum: int, frame) -> None:
    global _requested
    if _requested is not None:  # the second signal: stop now (all writes are atomic)
        print(f"\nadm: second {name(signum)}: stopping at once", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _requested = signum
    print(f"\nadm: {name(signum)} received: stopping at the next step boundary "
          "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip


def stop_if_requested(kept: str) -> None:
    """At a loop boundary: raise `Interrupted` ("stopped by SIGINT <kept>") if a signal came."""
    if _requested is not None:
        raise Interrupted(_requested, f"stopped by {name(_requested)} {kept}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a request checked by `requested()` for the block (main
    thread only; elsewhere the block runs with the handlers unchanged)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _requested = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None
