"""How the data plane gives freed memory back to the system.

Spans are inflated into buffers of megabytes, in threads. glibc keeps what is freed in the
threads' heap arenas, so after a container's layers went RSS would stay at its high-water
mark. Pinning the mmap threshold (every big buffer in a mapping of its own) gave it back at
once, but cost 13 % of the data plane's CPU on a cold read of a whole layer: every span then
paid an mmap, a page fault per 4 KiB and an munmap. Instead, the heap is reused while reads go
on, and trimmed (`malloc_trim`, which covers every arena) when a layer is unmounted and once
the foreground has gone quiet, when nothing is about to reuse the pages.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from snapshotter.fetch.spans import ForegroundActivity

QUIET_SEC: Final = 2.0
"""Foreground silence after which the heap is trimmed (once per quiet period)."""
PERIOD_SEC: Final = 30.0
"""And at least this often, for memory freed while the background fetcher runs on."""
_CHECK_SEC: Final = 1.0


def _malloc_trim() -> Any:
    # The process's own symbols: no library search (find_library runs ldconfig) at import.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent outside glibc
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
