"""A live progress bar on stderr (one redrawn line on a terminal, plain lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar.step("64K one_shot")`` after each finished point; ``bar.close()`` at the end.

    On a terminal the bar redraws one line with ``\\r``; when stderr is a file or pipe it writes one
    short line per point instead, so logs stay readable.  Disabled bars write nothing.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True, width: int = 30):
        self.total = max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self._start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, label: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        eta = elapsed / self.done * (self.total - self.done)
        if self._tty:
            filled = int(self.width * self.done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label:<28.28} eta {eta:5.0f}s")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {label} ({elapsed:.1f}s)\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
