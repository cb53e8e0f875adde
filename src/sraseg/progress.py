"""Progress of a long loop: a tqdm bar on a terminal, a plain log line every few percent or every
minute otherwise (Snakemake and SLURM job logs), so a log file holds lines a person can read instead
of one bar frame per iteration."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "track"]

T = TypeVar("T")


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Count `total` units from `initial`; `due()` says when a line (or a bar postfix refresh) is due.

    Args:
        total: units of the whole loop.
        desc: name shown on each line.
        initial: units already done (a resumed run).
        unit: unit name.
        logger: where plain lines go (the caller's module logger keeps its name on the line).
        percent: a plain line every this many percent of `total` ...
        seconds: ... or after this many seconds, whichever comes first.
        terminal: bar (True) or lines (False); None = whether stderr is a terminal.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", logger: logging.Logger | None = None,
                 percent: float = 5.0, seconds: float = 60.0, terminal: bool | None = None):  # fmt: skip
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.log = logger or logging.getLogger(__name__)
        self.every = max(1, round(self.total * percent / 100))
        self.seconds = seconds
        self.terminal = _on_terminal() if terminal is None else terminal
        self._start_n, self._start = self.n, time.monotonic()
        self._last_n, self._last = self.n, self._start
        self.bar = (tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True)
                    if self.terminal else None)  # fmt: skip

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def due(self) -> bool:
        """A report is due: the count crossed a multiple of the step, the end, or `seconds` passed."""
        if self.n == self._last_n:
            return False
        crossed = self.n // self.every != self._last_n // self.every
        return crossed or self.n >= self.total or time.monotonic() - self._last >= self.seconds

    def report(self, **fields) -> None:
        """Show `fields` (already formatted or numbers): bar postfix on a terminal, one log line otherwise."""
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=True)
        else:
            rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
            eta = timedelta(seconds=round((self.total - self.n) / rate)) if rate > 0 else "?"
            extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in fields.items())
            self.log.info("%s: %d/%d %s (%d%%), %.3g %s/s, eta %s%s", self.desc, self.n, self.total, self.unit,
                          100 * self.n // max(self.total, 1), rate, self.unit, eta, extra)  # fmt: skip
        self._last_n, self._last = self.n, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          logger: logging.Logger | None = None, disable: bool = False) -> Iterator[T]:  # fmt: skip
    """Iterate `items` with a `Progress` (one unit per item); `disable` shows nothing."""
    if disable:
        yield from items
        return
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    progress = Progress(total, desc, unit=unit, logger=logger)
    try:
        for item in items:
            yield item
            progress.update()
            if progress.bar is None and progress.due():
                progress.report()
    finally:
        progress.close()
