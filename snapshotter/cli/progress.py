"""Progress lines for long CLI operations, on stderr."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from snapshotter.content.indexing import LayerProgress


def human_bytes(n: float) -> str:
    """`1536` → `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class LayerProgressPrinter:
    """Aggregates per-layer progress events into one throttled status line."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 0.5) -> None:
        self._stream = stream
        self._interval = interval
        self._lock = threading.Lock()
        self._layers: dict[str, tuple[int, int]] = {}
        self._last = 0.0
        self._start = time.monotonic()
        self._tty = stream.isatty()
        self._printed = False

    def __call__(self, event: LayerProgress) -> None:
        with self._lock:
            first = event.layer not in self._layers
            self._layers[event.layer] = (event.done, event.total)
            now = time.monotonic()
            finished = event.done >= event.total
            if not (first or finished or now - self._last >= self._interval):
                return
            self._last = now
            done = sum(d for d, _ in self._layers.values())
            total = sum(t for _, t in self._layers.values())
            rate = done / max(now - self._start, 1e-6)
            line = (
                f"indexing {len(self._layers)} layer(s): {human_bytes(done)} / "
                f"{human_bytes(total)} ({human_bytes(rate)}/s)"
            )
            if self._tty:
                self._stream.write("\r" + line.ljust(78))
            elif first or finished:
                self._stream.write(
                    f"{line} [{event.layer[:19]} {'done' if finished else 'started'}]\n"
                )
            self._printed = True
            self._stream.flush()

    def close(self) -> None:
        """End the status line."""
        if self._tty and self._printed:
            self._stream.write("\n")
            self._stream.flush()
