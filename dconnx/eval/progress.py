"""A small text progress bar on stderr (no dependency); silent when stderr is not a
terminal or when quiet."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "pixel flipping") as p: ... p()`` advances by one.

    Draws ``label [#####.....] 12/40 3.1s`` on one line, redrawn at most 10 times a
    second; prints nothing unless ``stream`` is a TTY (or ``force``) and not ``quiet``.
    Forced onto a stream that is not a terminal (a log file), it writes one line per
    tenth of the work instead of redrawing."""

    def __init__(self, total: int, label: str = "", *, quiet: bool = False, stream=None,
                 width: int = 28, force: bool = False):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.isatty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = not quiet and (force or self.isatty)
        self._tenth = -1
        self.width = width
        self.count = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if not self.enabled:
            return
        if not self.isatty:
            tenth = int(10 * self.count / self.total) if self.total else 10
            if tenth > self._tenth:
                self._tenth = tenth
                self._draw(now, end="\n")
        elif now - self._last > 0.1 or self.count >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        frac = min(self.count / self.total, 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        start = "\r" if self.isatty else ""
        self.stream.write(f"{start}{self.label:<28.28} [{bar}] {self.count}/{self.total} {now - self.t0:6.1f}s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.isatty:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        elif self.enabled and self._tenth < 10:
            self._draw(time.perf_counter(), end="\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
