"""Reused output buffers for inflating span runs.

A span run inflates into megabytes. A fresh buffer each time costs a zero-fill and, since the
data plane keeps big allocations in mappings of their own (dataplane/memory.py), a page fault
per 4 KiB on first touch: together as much CPU as a second inflate pass. The inflated bytes are
copied out of the buffer span by span anyway (the cache keeps `bytes`), so one buffer can serve
run after run.
"""

from __future__ import annotations

import threading
from typing import Final

KEEP: Final = 8
"""Buffers kept for reuse (about one per thread that inflates at once)."""
MAX_KEPT_BYTES: Final = 64 << 20
"""Bigger buffers are not kept."""


class BufferPool:
    """Writable buffers handed out as views of exactly the size asked for."""

    def __init__(self, keep: int = KEEP, max_kept_bytes: int = MAX_KEPT_BYTES) -> None:
        self._keep, self._max = keep, max_kept_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A view of `size` writable bytes (their content is undefined)."""
        with self._lock:
            fits = [b for b in self._free if len(b) >= size]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                return memoryview(buf)[:size]
        return memoryview(bytearray(size))

    def give(self, view: memoryview) -> None:
        """Return a view from `take`; nothing may use it (or a view of it) afterwards."""
        buf = view.obj
        view.release()
        if not isinstance(buf, bytearray) or len(buf) > self._max:
            return
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)
            else:  # keep the biggest ones: they fit every run
                small = min(self._free, key=len)
                if len(small) < len(buf):
                    self._free.remove(small)
                    self._free.append(buf)


SPAN_BUFFERS: Final = BufferPool()
"""The data plane's pool for inflated span runs."""
