"""Progress lines on stderr for long work: done/total and rate, at most every few seconds."""

from __future__ import annotations

import logging
import time


class Progress:
    """Call :meth:`advance` as work completes; it logs ``done/total, rate`` every ``interval`` seconds."""

    def __init__(self, what: str, total: int | None, unit: str = "items", interval: float = 5.0,
                 logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.log = logger or logging.getLogger("mmprep.progress")
        self.done = 0
        self.extra: dict[str, object] = {}
        self.started = self._last = time.monotonic()

    def advance(self, count: int = 1, **extra: object) -> None:
        self.done += count
        self.extra.update(extra)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info("%s", self.line())

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        extras = "".join(f", {k}={v}" for k, v in self.extra.items())
        return f"{self.what}: {self.done}{total} {self.unit}, {self.rate:.1f} {self.unit}/s{extras}"

    def finish(self) -> None:
        self.log.info("%s (done in %.1fs)", self.line(), time.monotonic() - self.started)
