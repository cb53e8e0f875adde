"""Stop a training loop cleanly when the cluster asks it to.

SLURM sends SIGTERM before it kills or preempts a job (and SIGUSR1 when the job was submitted with
`--signal=USR1@seconds`). The handler only records the signal; the loop checks it once per iteration
at a point where its state is consistent, writes last.ckpt and raises `Preempted`, so the job exits
non-zero and its rerun (or requeue) resumes from the step the signal arrived at.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from sraseg.errors import Preempted

__all__ = ["SIGNALS", "StopRequest", "Preempted", "stop_on_signals"]

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """The signal received while the loop ran (None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def stop(self, where: str, ckpt_path) -> Preempted:
        """The exception to raise once last.ckpt is written; its message is the job's one log line."""
        name = signal.Signals(self.signum).name
        return Preempted(f"received {name} at {where}: wrote {ckpt_path}, exiting; rerun to resume", self.signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGTERM/SIGUSR1 in the yielded StopRequest instead of dying; the previous handlers
    come back on exit. Off the main thread (where Python cannot set handlers) nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):  # only a flag: the loop finishes its step and writes the checkpoint
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)  # None: set outside Python
