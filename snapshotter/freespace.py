"""The free-space reserve: how much of ROOT's filesystem pysoci leaves free.

What pysoci writes under ROOT stops before the filesystem's free space would drop below the
reserve, the larger of `min_free_bytes` and `min_free_percent` of the filesystem's size
(`[cache]` in the config): the span cache at the reserve, local unpacks (a Prepare waits for
them, and the cache of running images may have grown to the reserve) at half of it. "Free"
is what an unprivileged process may still use (`f_bavail`), so the blocks ext4 keeps for root
are never counted as room.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged process can still write on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class FreeSpaceReserve:
    """Free space to leave on a filesystem: the larger of the two bounds (0 and 0: none)."""

    min_free_bytes: int = 0
    min_free_percent: int = 0
    divisor: int = 1
    """The reserve is the larger bound divided by this (2: half of it)."""

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0 or not 0 <= self.min_free_percent <= 100 or self.divisor < 1:
            raise ValueError(
                f"bad free-space reserve {self.min_free_bytes} bytes / {self.min_free_percent} %"
            )

    def bytes_on(self, path: Path | str) -> int:
        """The reserve, in bytes, for the filesystem holding `path`."""
        if not self.min_free_percent:
            return self.min_free_bytes // self.divisor
        st = os.statvfs(path)
        size = st.f_blocks * st.f_frsize
        return max(self.min_free_bytes, size * self.min_free_percent // 100) // self.divisor

    def room(self, path: Path | str, nbytes: int) -> int:
        """Bytes that can still be written on `path`'s filesystem, after `nbytes` more, before
        the reserve is reached (negative: that many bytes too many)."""
        return free_bytes(path) - nbytes - self.bytes_on(path)
