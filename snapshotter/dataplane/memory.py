"""How the data plane gives freed memory back to the system.

Spans are inflated into buffers of megabytes, in threads. glibc raises its mmap threshold
after the first such buffer is freed, so the next ones come from the threads' heap arenas,
where what is freed stays mapped and fragments. A fixed threshold keeps big buffers in
mappings of their own, which go back to the kernel when freed. That costs CPU (an mmap, a page
fault per 4 KiB and an munmap per span): measured on the `ml` cold start, the data plane used
12 % less CPU without the pin, but its peak RSS grew from 490 to 540-706 MiB and the start was
no faster within the run's noise, so the pin stays. What small allocations free is given back
by `malloc_trim` (every arena) when a layer is unmounted, once reads have gone quiet, and
every 30 s.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from snapshotter.fetch.spans import ForegroundActivity

log = logging.getLogger(__name__)

QUIET_SEC: Final = 2.0
"""Foreground silence after which the heap is trimmed (once per quiet period)."""
PERIOD_SEC: Final = 30.0
"""And at least this often, for memory freed while the background fetcher runs on."""
_CHECK_SEC: Final = 1.0


M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 1 << 20
"""Allocations from this size get a mapping of their own (a span, a window run, a blob part)."""


_LIBC: Final = ctypes.CDLL(None)
"""The process's own symbols: no library search (find_library runs ldconfig) at import."""


def pin_mmap_threshold() -> bool:
    """Keep big buffers in mappings of their own; False where the C library has no mallopt."""
    mallopt = getattr(_LIBC, "mallopt", None)  # absent outside glibc
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt is not available: big buffers may stay in the heap once freed")
        return False
    return True


def _malloc_trim() -> Any:
    trim = getattr(_LIBC, "malloc_trim", None)  # absent outside glibc
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


_MALLOC_TRIM: Final = _malloc_trim()


def return_freed_memory() -> bool:
    """Give the free pages of every heap arena back to the system; False without glibc."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def _trim_in_thread() -> None:
    # malloc_trim walks every arena, which takes milliseconds: not on the event loop.
    await trio.to_thread.run_sync(return_freed_memory)


async def trim_when_quiet(
    activity: ForegroundActivity, trim: Callable[[], Awaitable[None]] = _trim_in_thread
) -> None:
    """Trim the heap once after each burst of foreground reads, and every PERIOD_SEC; runs
    until cancelled."""
    trimmed = -math.inf
    while True:
        await trio.sleep(_CHECK_SEC)
        now = trio.current_time()
        quiet = now - activity.last_activity >= QUIET_SEC and activity.last_activity > trimmed
        if quiet or now - trimmed >= PERIOD_SEC:
            await trim()
            trimmed = now
