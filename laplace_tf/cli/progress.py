"""Progress bars of the ``laplace-tf`` command, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import keras


class ProgressBar:
    """A single-line progress bar on ``stream`` (default: stderr), drawn only on a terminal.

    Use as a context manager; ``update(done)`` redraws the line, ``advance()`` adds one.
    With ``total=None`` it shows the step's name and, when done, its duration.
    """

    width = 30

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.done = 0
        self._start = time.perf_counter()

    def __enter__(self) -> ProgressBar:
        self._draw()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self._start
            self._draw(f" {elapsed:.1f} s\n")

    def update(self, done: int) -> None:
        """Redraw with ``done`` of ``total`` units finished."""
        self.done = done
        self._draw()

    def advance(self) -> None:
        """Redraw with one more unit finished."""
        self.update(self.done + 1)

    def _draw(self, end: str = "") -> None:
        if not self.enabled:
            return
        if self.total:
            filled = int(self.width * min(self.done, self.total) / self.total)
            line = f"{self.label} [{'#' * filled:<{self.width}}] {self.done}/{self.total}"
        else:
            line = f"{self.label} ..."
        self.stream.write(f"\r{line}{end}")
        self.stream.flush()


class EpochProgress(keras.callbacks.Callback):
    """Advances a :class:`ProgressBar` at the end of each training epoch."""

    def __init__(self, bar: ProgressBar):
        super().__init__()
        self.bar = bar

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.update(epoch + 1)
