"""Recording one lazy layer's start, from the reads its FUSE directory serves.

The filesystem tells the recorder of every file read (and every header check of an entry it
must vouch for) before it happens: the tar entry and the uncompressed bytes. The recorder turns
that into spans with the layer's checkpoints: the spans of the entry's tar header chain on its
first read (the header is checked before the data is served, and may lie in the span before),
then those of the bytes read. Spans and files are kept in the order of their first read.

The window: recording starts at the layer's first read and ends once nothing new was read for
`quiet_period` seconds (a start's reads come in bursts between bouts of CPU work; a notebook
waiting for its user or a job in its main loop reads nothing new), or `max_duration` after the
first read (a job that keeps streaming from the image is not a start), or when `max_spans`
spans are recorded. A layer unmounted before that keeps what it has. Bounded: at most
`max_spans` spans and `max_files` file names (later files still add their spans).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from snapshotter.fs.tree import LayerTree
from snapshotter.prefetch.record import (
    DONE,
    QUIET,
    RECORDING,
    SPAN_LIMIT,
    TIME_LIMIT,
    UNMOUNTED,
    LayerRecording,
)
from snapshotter.soci.prefetch import clean_path, range_spans
from snapshotter.soci.zinfo import Zinfo


@dataclass(frozen=True)
class RecordLimits:
    """The window and the bounds of one layer's recording (`[prefetch]`)."""

    quiet_period: float = 10.0
    max_duration: float = 300.0
    max_spans: int = 65536
    max_files: int = 20000


class Recorder:
    """One layer's recording; fed from the FUSE thread (`observe`), closed by `tick`."""

    def __init__(
        self,
        layer_digest: str,
        ztoc_digest: str,
        zinfo: Zinfo,
        limits: RecordLimits,
        *,
        index_digest: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.layer_digest = layer_digest
        self.ztoc_digest = ztoc_digest
        self.index_digest = index_digest
        self.zinfo = zinfo
        self.limits = limits
        self._wall = wall_clock
        self._span_seen = bytearray(zinfo.num_spans)
        self._spans: list[int] = []
        self._headers: set[int] = set()
        """Entries whose header spans are recorded."""
        self._named: set[int] = set()
        """Entries whose file data was read (named in `files`, within the bound)."""
        self._files: list[str] = []
        self.files_dropped = 0
        self.span_bytes = 0
        self.read_bytes = 0
        self.state = RECORDING
        self.reason = ""
        self._first: float | None = None
        """Monotonic time (the caller's clock) of the first read."""
        self._last_new = 0.0
        self._started_wall = 0.0
        self._last_wall = 0.0
        self.dirty = False
        """Something changed since `taken()` was last called."""

    @property
    def active(self) -> bool:
        """Still recording (the filesystem keeps telling it of reads)."""
        return self.state == RECORDING

    @property
    def started(self) -> bool:
        """Something was read."""
        return self._first is not None

    @property
    def spans(self) -> list[int]:
        """The spans recorded so far, in first-read order."""
        return list(self._spans)

    def observe(self, tree: LayerTree, entry: int, start: int, length: int, now: float) -> None:
        """File bytes `[start, start + length)` of tar entry `entry` are about to be read
        (length 0: only its header is about to be checked). `now` is a monotonic time."""
        if not self.active:
            return
        if self._first is None:
            self._first = self._last_new = now
            self._started_wall = self._last_wall = self._wall()
        elif self._close_if_due(now):
            return
        self.read_bytes += length
        new = False
        if entry not in self._headers:
            self._headers.add(entry)
            header = int(tree.header_start[entry])
            data = int(tree.entries.offset[entry])
            new = self._add(range_spans(self.zinfo, header, max(data, header + 1)))
        if length > 0:
            if entry not in self._named:
                self._named.add(entry)
                if len(self._files) < self.limits.max_files:
                    name = clean_path(tree.entries.name(entry))
                    self._files.append(name.decode("utf-8", "surrogateescape"))
                else:
                    self.files_dropped += 1
            new = self._add(range_spans(self.zinfo, start, start + length)) or new
        if new:
            self._last_new = now
            self._last_wall = self._wall()
            self.dirty = True
            if len(self._spans) >= self.limits.max_spans:
                self._close(SPAN_LIMIT)

    def _add(self, spans: range) -> bool:
        added = False
        for s in spans:
            if not self._span_seen[s] and len(self._spans) < self.limits.max_spans:
                self._span_seen[s] = 1
                self._spans.append(s)
                lo, hi = self.zinfo.compressed_bounds(s)
                self.span_bytes += hi - lo
                added = True
        return added

    def tick(self, now: float) -> bool:
        """Close the window if it is due; whether the recording is (now) done."""
        if self.active and self._first is not None:
            self._close_if_due(now)
        return not self.active

    def _close_if_due(self, now: float) -> bool:
        assert self._first is not None
        if now - self._last_new >= self.limits.quiet_period:
            self._close(QUIET)
        elif now - self._first >= self.limits.max_duration:
            self._close(TIME_LIMIT)
        return not self.active

    def _close(self, reason: str) -> None:
        self.state = DONE
        self.reason = reason
        self.dirty = True

    def stop(self) -> None:
        """The layer is being unmounted: keep what was recorded."""
        if self.active:
            self._close(UNMOUNTED)

    def taken(self) -> LayerRecording:
        """The recording as it stands (clears `dirty`)."""
        self.dirty = False
        return LayerRecording(
            layer_digest=self.layer_digest,
            ztoc_digest=self.ztoc_digest,
            index_digest=self.index_digest,
            num_spans=self.zinfo.num_spans,
            state=self.state,
            reason=self.reason,
            started=self._started_wall,
            last_read=self._last_wall,
            spans=tuple(self._spans),
            files=tuple(self._files),
            files_dropped=self.files_dropped,
            span_bytes=self.span_bytes,
            read_bytes=self.read_bytes,
        )
