"""A minimal progress bar for long runs, drawn on stderr only when it is a terminal.

Redirected or captured stderr (CI logs, pipes, pytest) gets nothing, so logs stay clean.
Redraws are throttled to ~10 per second so the bar costs nothing measurable even inside a
benchmark loop (it is never updated inside a timed region anyway).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 30
_MIN_INTERVAL_NS = 100_000_000


class Progress:
    """``with Progress(total, "bench") as bar: bar.update()``.

    Args:
        total: Expected number of steps, or None when unknown (only the count is shown).
        desc: Short label printed before the bar.
        stream: Where to draw (default ``sys.stderr``).
        enabled: Force on/off; by default on only when ``stream`` is a terminal.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._start_ns = time.perf_counter_ns()
        self._last_draw_ns = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, steps: int = 1, *, note: str = "") -> None:
        """Advance by ``steps`` and redraw if enough time has passed."""
        self.count += steps
        now = time.perf_counter_ns()
        if self.enabled and now - self._last_draw_ns >= _MIN_INTERVAL_NS:
            self._last_draw_ns = now
            self._draw(now, note)

    def render(self, now_ns: int | None = None, note: str = "") -> str:
        """The bar as text (without carriage return)."""
        now_ns = time.perf_counter_ns() if now_ns is None else now_ns
        elapsed = (now_ns - self._start_ns) / 1e9
        label = f"{self.desc} " if self.desc else ""
        if self.total:
            done = min(self.count, self.total)
            filled = int(_WIDTH * done / self.total)
            bar = "#" * filled + "." * (_WIDTH - filled)
            text = f"{label}[{bar}] {done}/{self.total} {elapsed:.1f}s"
        else:
            text = f"{label}{self.count} {elapsed:.1f}s"
        return f"{text} {note}".rstrip()

    def _draw(self, now_ns: int, note: str) -> None:
        self.stream.write("\r" + self.render(now_ns, note) + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(time.perf_counter_ns(), "")
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
