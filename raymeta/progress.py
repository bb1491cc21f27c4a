"""Progress lines for long work: stage, step, loss, items/s and ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``[stage] step i/n  k=v ...  x items/s  ETA m:ss`` every ``every`` steps."""

    def __init__(
        self, stage: str, total: int, every: int = 25, unit: str = "tasks", stream=None, quiet=False
    ):
        self.stage, self.total, self.every, self.unit = stage, total, max(1, every), unit
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.items = 0

    def update(self, step: int, items: int = 0, force: bool = False, **values: float) -> None:
        """Record ``items`` done at ``step`` (1-based) and print if it is a reporting step."""
        self.items += items
        if self.quiet or (not force and step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / max(step, 1)
        vals = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(
            f"[{self.stage}] step {step}/{self.total}  {vals}  {rate:.1f} {self.unit}/s  "
            f"elapsed {fmt_time(elapsed)}  ETA {fmt_time(eta)}",
            file=self.stream,
            flush=True,
        )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"
