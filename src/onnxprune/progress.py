"""Progress bars for long phases (tqdm), drawn on stderr only when it is a terminal.

Redirected or captured stderr (CI logs, pipes, pytest) gets nothing, so logs stay clean.
``ONNXPRUNE_PROGRESS=0`` turns every bar off, ``ONNXPRUNE_PROGRESS=1`` on (e.g. under a
terminal multiplexer that hides its tty). tqdm throttles redraws (``mininterval``), so a bar
costs nothing measurable even around a benchmark loop (it is never updated inside a timed
region anyway).
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress", "progress_enabled"]

_MIN_INTERVAL_S = 0.1


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (default stderr): ``ONNXPRUNE_PROGRESS`` if set,
    else whether the stream is a terminal."""
    forced = os.environ.get("ONNXPRUNE_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """``with Progress(total, "bench") as bar: bar.update()``.

    Args:
        total: Expected number of steps, or None when unknown (only the count is shown).
        desc: Short label printed before the bar.
        stream: Where to draw (default ``sys.stderr``).
        enabled: Force on/off; by default :func:`progress_enabled`.
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
        self.enabled = progress_enabled(self.stream) if enabled is None else enabled
        self._bar = tqdm(
            total=total,
            desc=desc or None,
            file=self.stream,
            disable=not self.enabled,
            mininterval=_MIN_INTERVAL_S,
            dynamic_ncols=True,
            leave=True,
        )

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
        """Advance by ``steps``; ``note`` is shown after the bar (e.g. the current loss)."""
        self.count += steps
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._bar.close()
