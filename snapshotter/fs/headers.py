"""Which tar headers of a mounted layer are known to match its zTOC: the one owner of that.

A zTOC is input: each entry it lists must be what the layer's own tar header at that place
says. An entry's header chain (PAX/GNU meta headers, then the real header) starts where the
previous entry (in tar order) ends, block-aligned, and ends where the entry's data starts.
It is checked

- when the span manager has a span's decompressed bytes (`observe_span`, called in the
  worker thread that inflated it): every chain lying wholly inside that span is checked at
  once, so one fetch vouches for many entries;
- on demand (`check`): the filesystem awaits it before it serves a file's data, and before it
  shows an entry that has no data to read but matters (see fs.tree); the chain is read
  through the layer (which fetches at most the spans holding it) unless a span already
  vouched for it.

An entry is UNCHECKED, GOOD or BAD; it only ever moves from UNCHECKED. Concurrent checks of
one entry share one read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import trio

from snapshotter.soci.tarheader import header_mismatch
from snapshotter.soci.ztoc import FileMetadata

log = logging.getLogger(__name__)

UNCHECKED: Final = 0
GOOD: Final = 1
BAD: Final = 2

ReadRange = Callable[[int, int], Awaitable[bytes]]
"""Read `length` uncompressed layer bytes at `offset` (the layer's verified bytes)."""


class HeaderVerifier:
    """The header check state of every entry of one layer.

    `starts[e]` and `ends[e]` bound entry e's header chain (`ends[e]` is where its data
    starts); `expected(e)` is the zTOC's view of entry e.
    """

    def __init__(
        self,
        name: str,
        starts: Sequence[int] | npt.NDArray[np.int64],
        ends: Sequence[int] | npt.NDArray[np.int64],
        expected: Callable[[int], FileMetadata],
    ) -> None:
        self.name = name
        n = len(starts)
        starts_a = np.asarray(starts, np.int64)
        order = np.argsort(starts_a, kind="stable")
        self._order = order.astype(np.int32)
        self._sorted_starts = starts_a[order]
        self._starts = starts_a
        self._ends = np.asarray(ends, np.int64)
        self._expected = expected
        self._state = bytearray(n)
        self._pending: dict[int, trio.Event] = {}
        self.mismatches = 0
        self.last_mismatch = ""

    def __len__(self) -> int:
        return len(self._state)

    def state(self, entry: int) -> int:
        """UNCHECKED, GOOD or BAD."""
        return self._state[entry]

    def checked(self) -> int:
        """Entries found GOOD so far."""
        return self._state.count(GOOD)

    def _judge(self, entry: int, buf: bytes | memoryview, base: int) -> int:
        """Check entry's chain inside `buf` (layer bytes from `base`) and record the outcome."""
        start, end = int(self._starts[entry]), int(self._ends[entry])
        expected = self._expected(entry)
        chain = bytes(buf[start - base : end - base])
        reason = header_mismatch(expected, chain, 0, base=start)
        if reason is None:
            outcome = GOOD
        else:
            outcome = BAD
            self.mismatches += 1
            self.last_mismatch = (
                f"tar header at {start} does not describe zTOC entry {expected.name!r} "
                f"(data at {self._ends[entry]}): {reason}"
            )
            log.error("layer %s: %s; refusing to serve it", self.name, self.last_mismatch)
        if self._state[entry] == UNCHECKED:
            self._state[entry] = outcome
        return self._state[entry]

    def observe_span(self, start: int, data: bytes) -> None:
        """Check every unchecked chain lying wholly inside the span [start, start+len(data))
        (called in a worker thread, with verified bytes)."""
        end = start + len(data)
        view = memoryview(data)
        lo, hi = np.searchsorted(self._sorted_starts, (start, end))
        inside = self._order[lo:hi]
        inside = inside[self._ends[inside] <= end]
        state = self._state
        for entry in inside.tolist():
            if state[entry] == UNCHECKED:
                self._judge(entry, view, start)

    async def check(self, entry: int, read: ReadRange) -> bool:
        """Whether entry's header matches, reading its chain through `read` if no span has
        vouched for it yet. Layer read errors propagate (nothing is recorded then)."""
        while self._state[entry] == UNCHECKED:
            pending = self._pending.get(entry)
            if pending is not None:
                await pending.wait()
                continue  # that check failed to read: try ourselves
            event = self._pending[entry] = trio.Event()
            try:
                start, end = int(self._starts[entry]), int(self._ends[entry])
                buf = await read(start, end - start)
                if self._state[entry] == UNCHECKED:  # the read may have fed observe_span
                    self._judge(entry, buf, start)
            finally:
                del self._pending[entry]
                event.set()
        return self._state[entry] == GOOD

    def status(self) -> dict[str, object]:
        """Counts for the layer's status file."""
        return {"headerMismatches": self.mismatches, "lastHeaderMismatch": self.last_mismatch}
