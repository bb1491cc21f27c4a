"""Progress lines for long work: stage, step, loss, items/s and ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``[stage] step i/n  k=v ...  x items/s  ETA m:ss`` (items/s since the previous
    line: the figure the job logs as ``tasks_per_s``) every ``every`` steps, at the
    last step, and (``every_s`` > 0) at the first update ``every_s`` seconds after the last
    line."""

    def __init__(
        self,
        stage: str,
        total: int,
        every: int = 25,
        unit: str = "tasks",
        stream=None,
        quiet=False,
        every_s: float = 0.0,
    ):
        self.stage, self.total, self.every, self.unit = stage, total, max(1, every), unit
        self.quiet = quiet
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.start = self.last_line = time.perf_counter()
        self.items = 0
        self.rate = 0.0
        """Items per second between the last two reporting steps (the one printed)."""
        self._window = 0

    def update(self, step: int, items: int = 0, force: bool = False, **values: float) -> bool:
        """Record ``items`` done at ``step`` (1-based); at a reporting step set :attr:`rate` (the
        rate since the previous reporting step), print the line (unless quiet) and return True."""
        self.items += items
        self._window += items
        now = time.perf_counter()
        due = force or step % self.every == 0 or step == self.total
        if self.every_s > 0 and now - self.last_line >= self.every_s:
            due = True
        if not due:
            return False
        self.rate = self._window / (now - self.last_line) if now > self.last_line else 0.0
        self.last_line, self._window = now, 0
        if self.quiet:
            return True
        elapsed = now - self.start
        eta = (self.total - step) * elapsed / max(step, 1)
        vals = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(
            f"[{self.stage}] step {step}/{self.total}  {vals}  {self.rate:.1f} {self.unit}/s  "
            f"elapsed {fmt_time(elapsed)}  ETA {fmt_time(eta)}",
            file=self.stream,
            flush=True,
        )
        return True

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"
