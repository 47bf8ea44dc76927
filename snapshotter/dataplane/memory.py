"""How the data plane's allocator gives memory back.

Spans are inflated into buffers of megabytes, in threads (a stream inflater per fetch). glibc
raises its mmap threshold after the first such buffer is freed, so the next ones come from the
threads' heap arenas, where what is freed stays mapped: after a container's layers went, RSS
stayed tens of MB above where it started. A fixed threshold keeps big buffers in their own
mappings, which go back to the kernel when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 1 << 20
"""Allocations from this size get a mapping of their own (a span, a window run, a blob part)."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def pin_mmap_threshold() -> bool:
    """Keep big buffers in mappings of their own; False where the C library has no mallopt."""
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt is not available: big buffers may stay in the heap once freed")
        return False
    return True
