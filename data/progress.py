"""A one-line progress bar for long data jobs: documents, MB done, MB/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """'1h02m03s', or '2m03s' under an hour: progress lines' ETAs (data preparation and training)."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Redraws one status line on a terminal; prints a line every `log_every` s otherwise.

    `total_bytes` is the input size on disk; `update()` takes how far into it the finished
    documents reach, so the rate is input MB/s and the ETA assumes that rate holds.
    """

    def __init__(
        self,
        label: str,
        total_bytes: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        log_every: float = 10.0,
    ) -> None:
        self.label = label
        self.total_bytes = max(total_bytes, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.is_tty else log_every
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.documents = 0
        self.done_bytes = 0

    def line(self) -> str:
        """The current status text."""
        elapsed = time.perf_counter() - self.start
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        left = self.total_bytes - self.done_bytes
        eta = format_duration(left / rate) if rate > 0 else "?"
        percent = 100.0 * self.done_bytes / self.total_bytes
        return (
            f"{self.label}: {self.documents} docs | {self.done_bytes / 1e6:.1f}/"
            f"{self.total_bytes / 1e6:.1f} MB ({percent:.0f}%) | {rate / 1e6:.2f} MB/s | "
            f"ETA {eta}"
        )

    def update(self, documents: int, done_bytes: int) -> None:
        """Adds `documents` finished documents; `done_bytes` is the input position reached."""
        self.documents += documents
        self.done_bytes = min(max(self.done_bytes, done_bytes), self.total_bytes)
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        end = "\r" if self.is_tty else "\n"
        self.stream.write(self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state (100%) and ends the line."""
        self.done_bytes = self.total_bytes
        if self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
