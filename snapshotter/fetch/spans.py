"""The span manager: the one owner of a layer's span state.

A span's compressed bytes are ABSENT, LOGGED (in the disk cache's log from an earlier run,
not yet checked) or VERIFIED (on disk and matching the zTOC digest); a span being loaded has
a pending `_Load` every interested reader waits on, so one fetch serves them all. Decompressed
spans live in the shared, byte-bounded `SpanMemoryCache`. Once a gzip layer is complete, the
background fetcher also keeps its spans decompressed on disk (`keep_inflated`): a read after
that costs no inflate, however long ago the span left the memory cache. Prefetched spans (a
prefetch list, a reader's walk forward) are inflated as they arrive and kept so at once: the
reader they were fetched for finds them ready.

Bytes are served only after hashing: a span's compressed bytes are checked against its zTOC
digest right after they arrive and again each time they are read back from disk to be
inflated (hashing is a fraction of the inflate cost, and it makes the disk cache — crash
leftovers, tampering, a layer being dropped — unable to feed wrong bytes to a reader).
A decompressed span read back from disk is checked against the sha256 logged when it was
written from verified bytes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from snapshotter import metrics
from snapshotter.compression.buffers import SPAN_BUFFERS
from snapshotter.compression.gzip import LayerVerifier, check_windows, inflate_spans
from snapshotter.compression.span_stream import SpanStreamInflater
from snapshotter.errors import (
    CompressionError,
    DigestMismatchError,
    FormatError,
    LayerClosedError,
    RegistryResponseError,
    RegistryUnavailableError,
    ZtocMismatchError,
    ZtocRejectedError,
)
from snapshotter.fetch.cache import LayerCache
from snapshotter.fetch.config import FetchConfig
from snapshotter.logs import log_context
from snapshotter.soci.zinfo import GzipZinfo, Zinfo, decode_zinfo
from snapshotter.soci.ztoc import Ztoc

log = logging.getLogger(__name__)

ABSENT: Final = 0
LOGGED: Final = 1
VERIFIED: Final = 2

_SEQUENTIAL_SLACK: Final = 1 << 20
"""A read starting this close to the previous read's end counts as sequential."""
_MAX_ROUNDS: Final = 8
"""Loads a read may wait on before giving up (each round is a cancelled or evicted load)."""
_VERIFY_CHUNK: Final = 4 << 20


SpanObserver = Callable[[int, bytes], None]
"""Called with (uncompressed offset, verified decompressed bytes) of a span, in the worker
thread that has them; it must not touch trio (see `SpanManager.set_span_observer`)."""


class RangeSink(Protocol):
    """Sees the bytes of a one-range fetch as they arrive."""

    def restart(self) -> None:
        """An attempt begins (a retry, another host): forget what was fed before."""
        ...

    def data(self, chunk: bytes) -> None:
        """The next bytes of the range, in order."""
        ...


class RangeSource(Protocol):
    """Where compressed layer bytes come from (the registry, in the daemon)."""

    async def fetch(
        self, ranges: Sequence[tuple[int, int]], sink: RangeSink | None = None
    ) -> list[bytes]:
        """The bytes of each half-open range, in one request when possible; with one range,
        `sink` sees its bytes as they arrive (the returned bytes stay the authority).

        Raises RegistryError subclasses, or FormatError for a malformed answer.
        """
        ...


_RESTART: Final = object()
_END: Final = object()


class _StreamJob:
    """Inflates one fetched run of gzip spans in a thread of its own while its bytes arrive
    (it is the fetch's RangeSink). Its output is used only for spans whose compressed bytes
    then match their digests; anything wrong in the stream just leaves no output."""

    def __init__(self, zinfo: GzipZinfo, first: int, last: int, skip: int) -> None:
        self._zinfo, self._first, self._last, self._skip = zinfo, first, last, skip
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._result: memoryview | None = None
        self._thread = threading.Thread(target=self._run, name="span-stream", daemon=True)
        self._thread.start()

    def restart(self) -> None:
        self._queue.put(_RESTART)

    def data(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def _run(self) -> None:
        stream: SpanStreamInflater | None = None
        skip = 0
        try:
            while (item := self._queue.get()) is not _END:
                if item is _RESTART:
                    if stream is not None:
                        stream.close()
                    stream, skip = (
                        SpanStreamInflater(self._zinfo, self._first, self._last),
                        self._skip,
                    )
                    continue
                if stream is None:
                    continue
                chunk = memoryview(item)  # type: ignore[arg-type]
                if skip:
                    cut = min(skip, len(chunk))
                    skip -= cut
                    chunk = chunk[cut:]
                try:
                    stream.feed(chunk)
                except CompressionError:
                    stream.close()
                    stream = None
            if stream is not None:
                with suppress(CompressionError):
                    self._result = stream.finish()
        finally:
            if stream is not None:
                stream.close()

    def finish(self) -> memoryview | None:
        """Wait for the thread; the inflated run, or None when the stream did not make it."""
        self._queue.put(_END)
        self._thread.join()
        return self._result

    def abandon(self) -> None:
        """The fetch failed: let the thread end on its own."""
        self._queue.put(_END)


class SpanMemoryCache:
    """LRU of decompressed spans, keyed by (layer digest, span), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"negative memory cache bound {max_bytes}")
        self.max_bytes = max_bytes
        self.usage = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int]) -> bytes | None:
        """The cached bytes (marked most recently used), or None."""
        data = self._entries.get(key)
        if data is None:
            self.misses += 1
            metrics.MEMORY_MISSES.inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        metrics.MEMORY_HITS.inc()
        return data

    def peek(self, key: tuple[str, int]) -> bytes | None:
        """The cached bytes, or None, leaving the LRU order and the hit counts alone."""
        return self._entries.get(key)

    def put(self, key: tuple[str, int], data: bytes) -> bool:
        """Cache `data`, evicting least recently used spans; False if it can never fit."""
        if len(data) > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.usage -= len(old)
        self._entries[key] = data
        self.usage += len(data)
        while self.usage > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.usage -= len(evicted)
        return True

    def discard_layer(self, digest: str) -> None:
        """Drop every span of one layer."""
        for key in [k for k in self._entries if k[0] == digest]:
            self.usage -= len(self._entries.pop(key))


class ForegroundActivity:
    """What the background fetcher must yield to: reads waiting on the network, recent fetches.

    One per daemon, shared by every span manager and the background fetcher.
    """

    def __init__(self) -> None:
        self.waiting = 0
        self.last_activity = -math.inf
        self.preemptions = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._preemptible: set[trio.CancelScope] = set()

    def note_activity(self) -> None:
        """A foreground fetch (or a mount) just happened: restart the silence period."""
        self.last_activity = trio.current_time()
        self._lot.unpark_all()

    def begin_wait(self) -> None:
        """A read starts waiting on the network; cancels preemptible background requests."""
        self.waiting += 1
        for scope in self._preemptible:
            if not scope.cancel_called:
                scope.cancel()
                self.preemptions += 1

    def end_wait(self) -> None:
        """That read stopped waiting."""
        self.waiting -= 1
        self.note_activity()

    @contextmanager
    def preemptible(self, scope: trio.CancelScope) -> Iterator[None]:
        """Register a background request that foreground waits may cancel."""
        self._preemptible.add(scope)
        try:
            yield
        finally:
            self._preemptible.discard(scope)

    async def wait_no_readers(self) -> None:
        """Return once no read waits on the network."""
        while self.waiting > 0:
            await self._lot.park()

    async def wait_quiet(self, silence: float) -> None:
        """Return once no read waits and `silence` seconds passed since the last activity."""
        while True:
            if self.waiting > 0:
                await self._lot.park()
                continue
            remaining = self.last_activity + silence - trio.current_time()
            if remaining <= 0:
                return
            with trio.move_on_after(remaining):
                await self._lot.park()


@dataclass
class _DiskResult:
    good: list[int] = field(default_factory=list)
    """Spans whose compressed bytes on disk match their digest."""
    bad: list[int] = field(default_factory=list)
    """Spans to fetch again: damaged on disk, with no usable decompressed copy."""
    inflated: dict[int, bytes] = field(default_factory=dict)
    """Decompressed spans (when asked to inflate)."""
    fresh: dict[int, bytes] = field(default_factory=dict)
    """The part of `inflated` that came from compressed bytes (worth keeping)."""
    stale: list[int] = field(default_factory=list)
    """Decompressed copies on disk that failed their check."""


@dataclass(eq=False)
class _Load:
    """One in-flight operation bringing some spans to VERIFIED (and maybe into memory)."""

    spans: list[int]
    network: bool
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None
    cancelled: bool = False
    unkept: dict[int, bytes] = field(default_factory=dict)
    """Spans inflated that the memory cache did not keep (too big for it, or its bound is 0),
    for this load's waiters; without them a full disk would leave nowhere to find them."""


@dataclass(eq=False)
class SpanClaim:
    """Spans reserved for one background request (see `SpanManager.claim_missing`)."""

    spans: list[int]
    network_bytes: int
    _load: _Load


def _runs(spans: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted span ids → inclusive runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(spans)):
        if runs and runs[-1][1] == s - 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def _rethrow(err: Exception) -> Exception:
    """A fresh copy of an error shared by several waiting readers."""
    try:
        return copy.copy(err)
    except Exception:
        return RegistryUnavailableError(str(err))


class SpanManager:
    """Serves a layer's uncompressed bytes from verified spans; start `run()` in a nursery."""

    def __init__(
        self,
        layer_digest: str,
        ztoc: Ztoc,
        source: RangeSource,
        cache: LayerCache,
        *,
        memory: SpanMemoryCache,
        config: FetchConfig,
        activity: ForegroundActivity | None = None,
        ztoc_digest: str = "",
        diff_id: str = "",
        on_reject: Callable[[str], None] | None = None,
        memory_key: str = "",
    ) -> None:
        self.digest = layer_digest
        self.ztoc_digest = ztoc_digest
        self._diff_id = diff_id
        self._on_reject = on_reject
        self.rejected = ""
        """Why this layer's zTOC was proven to lie ("" while it was not): it serves nothing."""
        self._mem = memory_key or layer_digest
        """This manager's name in the memory cache: one zTOC's spans are not another's, so
        managers of one layer with different zTOCs need different ones (the layer id)."""
        self.config = config
        self.activity = activity or ForegroundActivity()
        self._zinfo: Zinfo = decode_zinfo(
            ztoc.compression_algorithm,
            ztoc.checkpoints,
            compressed_size=ztoc.compressed_archive_size,
            uncompressed_size=ztoc.uncompressed_archive_size,
        )
        n = self._zinfo.num_spans
        if n != ztoc.max_span_id + 1 or len(ztoc.span_digests) != n:
            raise FormatError(
                f"zTOC of {layer_digest}: {ztoc.max_span_id + 1} spans, "
                f"{len(ztoc.span_digests)} digests, checkpoints for {n}"
            )
        if cache.compressed_size != ztoc.compressed_archive_size:
            raise FormatError(
                f"cache of {layer_digest} is for {cache.compressed_size} bytes, the zTOC says "
                f"{ztoc.compressed_archive_size}"
            )
        self._gzip = isinstance(self._zinfo, GzipZinfo)
        self._span_digests = list(ztoc.span_digests)
        self._source = source
        self._cache = cache
        self._memory = memory
        self._size = ztoc.compressed_archive_size
        self._usize = ztoc.uncompressed_archive_size
        self._state = bytearray(n)
        for s in cache.present_spans():
            if s < n:
                self._state[s] = LOGGED
        self._keep_inflated = self._gzip and self.config.keep_inflated and cache.keeps_inflated
        self._inflated: dict[int, str] = {}
        """Spans kept decompressed on disk, and the sha256 hex of their bytes."""
        if self._keep_inflated:
            self._inflated = {s: d for s, d in cache.inflated_spans().items() if s < n}
        self._inflated_full_reported = False
        self._background_done = bytearray(n)
        """Spans the background has inflated (and kept, room permitting) and shown to the
        span observer."""
        self._pending: dict[int, _Load] = {}
        self._observer: SpanObserver | None = None
        self._verified = 0
        self._verified_bytes = 0
        self._nursery: trio.Nursery | None = None
        self._run_done: trio.Event | None = None
        self._close_done: trio.Event | None = None
        self._closed = False
        self._busy = 0
        self._idle = trio.lowlevel.ParkingLot()
        self._fill_scopes: set[trio.CancelScope] = set()
        self._prev_end = -1
        self._last_miss = -1
        self._bg_cursor = 0
        self._prefetch: deque[int] = deque()
        self._prefetch_queued: set[int] = set()
        self._waiting = 0
        self._last_error = ""
        self._cache_write_failed = False
        self._cache_error = ""
        """Why the last write to the span cache failed ("" once one succeeds again)."""
        self.layer_verified: bool | None = None
        """Whole-layer digest check: None until done, then its outcome."""
        self.network_requests = 0
        self.network_bytes = 0
        self.digest_mismatches = 0

    # ----------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the manager's nursery (loads, readahead) until `close()`."""
        if self._closed or self._run_done is not None:
            raise RuntimeError("SpanManager.run() called twice or after close()")
        self._run_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                metrics.LAYERS.track(self)
                task_status.started()
                await trio.sleep_forever()
        finally:
            metrics.LAYERS.untrack(self)
            self._nursery = None
            self._closed = True
            self._run_done.set()

    async def close(self) -> None:
        """Stop every load of this layer, wait for them, release the caches."""
        if self._close_done is not None:
            await self._close_done.wait()
            return
        self._close_done = trio.Event()
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for scope in self._fill_scopes:
            scope.cancel()
        if self._run_done is not None:
            await self._run_done.wait()
        while self._busy:
            await self._idle.park()
        self._memory.discard_layer(self._mem)
        self._cache.close()
        self._close_done.set()

    def _check_open(self) -> None:
        if self._closed:
            raise LayerClosedError(f"layer {self.digest} is closed")

    def _check_trusted(self) -> None:
        if self.rejected:
            raise ZtocRejectedError(self.rejected)

    def _reject(self, exc: ZtocMismatchError, stage: str) -> ZtocRejectedError:
        """The zTOC is proven to lie: serve nothing more from it (its bytes in memory are
        dropped, the background leaves it alone) and tell `on_reject` once."""
        if not self.rejected:
            self.rejected = (
                f"layer {self.digest}: zTOC {self.ztoc_digest or '(unknown)'} rejected: {exc}"
            )
            self._last_error = self.rejected
            self._memory.discard_layer(self._mem)
            self._prefetch.clear()
            self._prefetch_queued.clear()
            metrics.LAYERS_REJECTED.labels(stage).inc()
            log.error(
                "REJECTED zTOC %s of layer %s (%s check): %s; every read of it fails from now "
                "on and its next Prepare unpacks it locally",
                self.ztoc_digest or "(unknown)",
                self.digest,
                stage,
                exc,
            )
            if self._on_reject is not None:
                try:
                    self._on_reject(self.rejected)
                except Exception:  # recording it must not hide the rejection itself
                    log.exception("layer %s: recording the rejection failed", self.digest)
        return ZtocRejectedError(self.rejected)

    @contextmanager
    def _background_section(self) -> Iterator[None]:
        """A background job on this layer: busy, and cancelled by `close()` (then raising
        LayerClosedError, not returning as if the job were done)."""
        self._check_open()
        with trio.CancelScope() as scope, self._busy_section():
            self._fill_scopes.add(scope)
            try:
                yield
            finally:
                self._fill_scopes.discard(scope)
        if scope.cancelled_caught:
            self._check_open()

    @contextmanager
    def _busy_section(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.unpark_all()

    # --------------------------------------------------------------- foreground

    @property
    def fetched_bytes(self) -> int:
        """Compressed bytes verified on disk."""
        return self._verified_bytes

    @property
    def total_bytes(self) -> int:
        """Compressed size of the layer."""
        return self._size

    @property
    def num_spans(self) -> int:
        """Number of spans of the layer."""
        return len(self._state)

    @property
    def zinfo(self) -> Zinfo:
        """The layer's checkpoints (read-only: what span holds what)."""
        return self._zinfo

    @property
    def foreground_waiting(self) -> int:
        """Reads of this layer currently waiting on the network."""
        return self._waiting

    def set_span_observer(self, observer: SpanObserver | None) -> None:
        """Hand every span this manager decompresses (or reads back decompressed) to
        `observer`, in the worker thread doing it, before the span is served: the filesystem
        checks the tar headers inside. The manager itself knows nothing of tar."""
        self._observer = observer

    async def read(self, offset: int, length: int, *, readahead_until: int | None = None) -> bytes:
        """Uncompressed layer bytes [offset, offset + length), clipped at the layer's end.

        Sequential reads load the next spans ahead, but never fetch past `readahead_until`
        (the end of the file being read): small files sit next to each other in a tar, and
        reading ahead past one would fetch spans nobody asked for. Spans already on disk cost
        no network, so they are inflated ahead past it: a scan in tar order then finds them
        in memory.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid read: offset {offset}, length {length}")
        self._check_open()
        self._check_trusted()
        end = min(offset + length, self._usize)
        if offset >= end:
            return b""
        spans = self._zinfo.spans_for_range(offset, end - offset)
        sequential = (
            self._prev_end >= 0
            and self._prev_end - _SEQUENTIAL_SLACK <= offset <= self._prev_end + _SEQUENTIAL_SLACK
        )
        self._prev_end = end
        with self._busy_section():
            ahead_stop = len(self._state)
            if readahead_until is not None:
                ahead_stop = self._zinfo.span_of(max(min(readahead_until, self._usize) - 1, 0)) + 1
            pieces = await self._uncompressed(
                spans.start, spans.stop - 1, sequential, ahead_stop=ahead_stop
            )
        first = spans.start
        base = self._zinfo.uncompressed_bounds(first)[0]
        if len(spans) == 1:
            return pieces[first][offset - base : end - base]
        out = bytearray()
        for s in spans:
            s_start, s_end = self._zinfo.uncompressed_bounds(s)
            lo, hi = max(offset, s_start), min(end, s_end)
            out += memoryview(pieces[s])[lo - s_start : hi - s_start]
        return bytes(out)

    async def _uncompressed(
        self, first: int, last: int, sequential: bool, *, ahead_stop: int
    ) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for round_ in range(_MAX_ROUNDS):
            self._check_open()
            want: list[int] = []
            for s in range(first, last + 1):
                if s in out:
                    continue
                data = self._memory.get((self._mem, s))
                if data is None:
                    want.append(s)
                else:
                    out[s] = data
            if want:
                fresh = [s for s in want if s not in self._pending]
                if fresh:
                    self._start_load(fresh, inflate=True)
                    if round_ == 0:
                        self._follow_misses([s for s in fresh if self._state[s] == ABSENT], last)
            if round_ == 0 and sequential:
                self._readahead(last + 1, ahead_stop)
            if not want:
                return out
            loads = {s: self._pending[s] for s in want}
            await self._wait(set(loads.values()))
            direct: list[int] = []
            for s in want:
                if (self._mem, s) in self._memory:
                    continue
                if (data := loads[s].unkept.get(s)) is not None:
                    out[s] = data
                    continue
                if self._state[s] == VERIFIED or s in self._inflated:
                    direct.append(s)
                    continue
                err = loads[s].error
                if err is not None:
                    raise _rethrow(err) from err
            if direct:
                # Loaded but not in memory (too big for it, or already evicted).
                out.update(await self._inflate_from_disk(direct))
        raise RegistryUnavailableError(
            f"layer {self.digest}: spans {first}..{last} could not be loaded "
            f"(loads kept being cancelled)"
        )

    async def _wait(self, loads: set[_Load]) -> None:
        network = any(load.network for load in loads)
        if network:
            self._waiting += 1
            self.activity.begin_wait()
        try:
            for load in loads:
                await load.done.wait()
        finally:
            if network:
                self._waiting -= 1
                self.activity.end_wait()

    def _follow_misses(self, missed: list[int], last: int) -> None:
        """A reader whose misses walk forward through the layer (an `import` of a package
        whose files lie next to each other in the tar) gets the next spans loaded ahead:
        `miss_readahead_spans` of them, in one request beside its own. A reader that jumps
        around gets nothing more than it asked for."""
        if not missed:
            return
        ahead = self.config.miss_readahead_spans
        if ahead and self._last_miss >= 0 and 0 < missed[0] - self._last_miss <= 2:
            todo = [
                s
                for s in range(last + 1, min(last + 1 + ahead, len(self._state)))
                if self._state[s] == ABSENT
                and s not in self._pending
                and (self._mem, s) not in self._memory
            ]
            if todo:
                self._start_load(todo, inflate=True)
                missed = [*missed, *todo]
        self._last_miss = missed[-1]

    def _readahead(self, start: int, limit: int) -> None:
        todo: list[int] = []
        for s in range(start, min(start + self.config.readahead_spans, len(self._state))):
            if s >= limit and self._state[s] == ABSENT:
                break
            if s not in self._pending and (self._mem, s) not in self._memory:
                todo.append(s)
        # One load per kind: disk loads must not wait behind a network fetch.
        on_disk = [s for s in todo if self._state[s] != ABSENT]
        absent = [s for s in todo if self._state[s] == ABSENT]
        for spans in (on_disk, absent):
            if spans:
                self._start_load(spans, inflate=True)

    def _start_load(self, spans: list[int], *, inflate: bool) -> _Load:
        if self._nursery is None:
            raise LayerClosedError(f"layer {self.digest} is not running (run() not started)")
        load = self._register(spans, inflate=inflate)
        self._nursery.start_soon(self._load_task, load, inflate)
        return load

    def _register(self, spans: list[int], *, inflate: bool = False) -> _Load:
        network = any(self._state[s] == ABSENT and not self._has_copy(s, inflate) for s in spans)
        load = _Load(spans, network=network)
        for s in spans:
            self._pending[s] = load
        return load

    def _has_copy(self, span: int, inflate: bool) -> bool:
        # A load that inflates can use the span's decompressed copy instead of its bytes.
        return inflate and span in self._inflated

    def _settle(self, load: _Load) -> None:
        for s in load.spans:
            if self._pending.get(s) is load:
                del self._pending[s]
        load.done.set()

    async def _load_task(self, load: _Load, inflate: bool) -> None:
        # Errors are recorded in the load for its waiters; raising would cancel the nursery.
        with suppress(Exception), log_context(layer=self.digest):
            await self._load(load, inflate=inflate, kind=metrics.ON_DEMAND)

    async def _load(self, load: _Load, *, inflate: bool, kind: str) -> None:
        foreground = kind == metrics.ON_DEMAND
        try:
            absent: list[int] = []
            on_disk: list[int] = []
            for s in load.spans:
                usable = self._state[s] != ABSENT or self._has_copy(s, inflate)
                (on_disk if usable else absent).append(s)
            if on_disk:
                res = await self._from_disk(on_disk, inflate)
                absent = sorted([*absent, *res.bad])
                if foreground:
                    metrics.DISK_HITS.inc(len(on_disk) - len(res.bad))
            if absent:
                if foreground:
                    metrics.DISK_MISSES.inc(len(absent))
                load.unkept = await self._fetch(absent, inflate=inflate, kind=kind)
                if self.layer_verified is not False:
                    self._last_error = ""  # the registry serves again: the error is history
        except Exception as exc:
            err = self._reject(exc, "foreground") if isinstance(exc, ZtocMismatchError) else exc
            load.error = err
            self._last_error = f"{type(err).__name__}: {err}"
            if err is not exc:
                raise err from exc
            raise
        except BaseException:
            load.cancelled = True
            raise
        finally:
            self._settle(load)

    async def _inflate_from_disk(self, spans: list[int]) -> dict[int, bytes]:
        try:
            return (await self._from_disk(spans, True, to_memory=False)).inflated
        except ZtocMismatchError as e:
            raise self._reject(e, "foreground") from e

    async def _from_disk(
        self, spans: list[int], inflate: bool, *, to_memory: bool = True
    ) -> _DiskResult:
        res = await trio.to_thread.run_sync(self._disk_job, spans, inflate)
        for s in res.stale:
            self._inflated.pop(s, None)
        self._apply(res.good, res.inflated if to_memory else {})
        for s in res.bad:
            self._mark_absent(s)
        return res

    # -------------------------------------------------------------- the network

    def _fetch_start(self, span: int) -> int:
        # The gzip header before checkpoint 0 travels with span 0: a full cache file is the blob.
        return 0 if span == 0 else self._zinfo.compressed_bounds(span)[0]

    def _coalesce(self, spans: list[int], max_bytes: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for a, b in _runs(spans):
            start = a
            for s in range(a, b + 1):
                if s > start and (
                    self._zinfo.compressed_bounds(s)[1] - self._fetch_start(start) > max_bytes
                ):
                    out.append((start, s - 1))
                    start = s
            out.append((start, b))
        return out

    async def _fetch(self, spans: list[int], *, inflate: bool, kind: str) -> dict[int, bytes]:
        """Fetch, verify and keep spans; with `inflate`, the inflated ones that are not in the
        memory cache."""
        todo = spans
        unkept: dict[int, bytes] = {}
        retries = max(0, self.config.max_span_verification_retries)
        for attempt in range(retries + 1):
            runs = self._coalesce(todo, self.config.max_request_bytes)
            ranges = [(self._fetch_start(a), self._zinfo.compressed_bounds(b)[1]) for a, b in runs]
            job = None
            if inflate and len(runs) == 1 and self.config.stream_inflate:
                a, b = runs[0]
                if isinstance(self._zinfo, GzipZinfo):
                    skip = self._zinfo.compressed_bounds(a)[0] - ranges[0][0]
                    job = _StreamJob(self._zinfo, a, b, skip)
            try:
                datas = await self._request(ranges, kind, job)
            except BaseException:
                if job is not None:
                    job.abandon()
                raise
            streamed = None if job is None else await trio.to_thread.run_sync(job.finish)
            try:
                good, bad, inflated = await trio.to_thread.run_sync(
                    self._store_job, runs, ranges, datas, inflate, streamed
                )
            finally:
                if streamed is not None:
                    SPAN_BUFFERS.give(streamed)  # its spans were copied out
            self._apply(good, inflated)
            unkept.update((s, d) for s, d in inflated.items() if (self._mem, s) not in self._memory)
            if not bad:
                return unkept
            self.digest_mismatches += len(bad)
            metrics.registry_error("digest_mismatch")
            if attempt < retries:
                log.warning(
                    "layer %s: spans %s do not match their zTOC digests; refetching",
                    self.digest,
                    bad,
                )
            todo = bad
        log.error(
            "layer %s: spans %s still do not match their zTOC digests after %d attempts; "
            "refusing to serve them",
            self.digest,
            todo,
            retries + 1,
        )
        raise DigestMismatchError(
            f"layer {self.digest}: spans {todo} do not match their zTOC digests "
            f"after {retries + 1} fetches"
        )

    async def _request(
        self, ranges: list[tuple[int, int]], kind: str, sink: RangeSink | None = None
    ) -> list[bytes]:
        foreground = kind == metrics.ON_DEMAND
        if foreground:
            self.activity.note_activity()
        timeout = self.config.fetching_timeout_sec
        requests = 1 if not self.config.force_single_range_mode else len(ranges)
        self.network_requests += requests
        metrics.SPAN_FETCHES.labels(kind).inc(requests)
        started = trio.current_time()
        try:
            with trio.fail_after(timeout):
                if self.config.force_single_range_mode and len(ranges) > 1:
                    datas: list[bytes] = [b""] * len(ranges)
                    errors: list[Exception] = []

                    async def one(i: int) -> None:
                        # Caught here so the caller sees the typed error, not an ExceptionGroup.
                        try:
                            datas[i] = (await self._source.fetch([ranges[i]]))[0]
                        except Exception as exc:
                            errors.append(exc)

                    async with trio.open_nursery() as nursery:
                        for i in range(len(ranges)):
                            nursery.start_soon(one, i)
                    if errors:
                        raise errors[0]
                elif sink is not None and len(ranges) == 1:
                    datas = await self._source.fetch(ranges, sink)
                else:
                    datas = await self._source.fetch(ranges)
        except trio.TooSlowError:
            metrics.registry_error("timeout")
            raise RegistryUnavailableError(
                f"layer {self.digest}: fetching {len(ranges)} range(s) timed out after {timeout} s"
            ) from None
        finally:
            if foreground:
                self.activity.note_activity()
        if len(datas) != len(ranges):
            raise RegistryResponseError(
                f"layer {self.digest}: asked for {len(ranges)} ranges, got {len(datas)}"
            )
        for (start, end), data in zip(ranges, datas, strict=True):
            if len(data) != end - start:
                raise RegistryResponseError(
                    f"layer {self.digest}: range {start}-{end} returned {len(data)} bytes, "
                    f"expected {end - start}"
                )
        received = sum(len(d) for d in datas)
        self.network_bytes += received
        elapsed = trio.current_time() - started
        metrics.SPAN_FETCH_SECONDS.labels(kind).observe(elapsed)
        metrics.SPAN_FETCH_BYTES.labels(kind).inc(received)
        log.debug("%s fetch: %d range(s), %d bytes in %.3f s", kind, len(ranges), received, elapsed)
        return datas

    # ----------------------------------------------------- CPU work (in threads)

    def _verify(self, first: int, last: int, data: memoryview, base: int) -> list[bool]:
        ok: list[bool] = []
        for s in range(first, last + 1):
            start, end = self._zinfo.compressed_bounds(s)
            digest = "sha256:" + hashlib.sha256(data[start - base : end - base]).hexdigest()
            ok.append(digest == self._span_digests[s])
        return ok

    def _inflate(
        self,
        first: int,
        last: int,
        data: memoryview,
        base: int,
        streamed: memoryview | None = None,
    ) -> dict[int, bytes]:
        """Spans first..last decompressed from their bytes in `data` (at `base`), or taken
        from `streamed` (the same run, inflated while it arrived) when given."""
        c_start = self._zinfo.compressed_bounds(first)[0]
        c_end = self._zinfo.compressed_bounds(last)[1]
        chunk = data[c_start - base : c_end - base]
        if streamed is not None:
            plain = memoryview(streamed)
        elif isinstance(self._zinfo, GzipZinfo):
            plain = memoryview(inflate_spans(self._zinfo, first, last, chunk))
        else:
            plain = chunk
        if isinstance(self._zinfo, GzipZinfo):
            check_windows(self._zinfo, first, last, plain)
        u_base = self._zinfo.uncompressed_bounds(first)[0]
        out: dict[int, bytes] = {}
        for s in range(first, last + 1):
            u_start, u_end = self._zinfo.uncompressed_bounds(s)
            out[s] = bytes(plain[u_start - u_base : u_end - u_base])
            self._observe(u_start, out[s])
        return out

    def _observe(self, start: int, data: bytes) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            observer(start, data)
        except Exception:  # an observer's bug must not fail the read that fed it
            log.exception("layer %s: the span observer failed", self.digest)

    def _disk_job(self, spans: list[int], inflate: bool) -> _DiskResult:
        res = _DiskResult()
        todo = spans
        if inflate and self._inflated:
            todo = []
            for s in spans:
                plain = self._read_inflated(s)
                if plain is not None:
                    res.inflated[s] = plain
                    self._observe(self._zinfo.uncompressed_bounds(s)[0], plain)
                    continue
                if s in self._inflated:
                    res.stale.append(s)
                (res.bad if self._state[s] == ABSENT else todo).append(s)
        for a, b in _runs(todo):
            base = self._zinfo.compressed_bounds(a)[0]
            data = memoryview(self._cache.read(base, self._zinfo.compressed_bounds(b)[1]))
            flags = self._verify(a, b, data, base)
            run_bad = [s for s, ok in zip(range(a, b + 1), flags, strict=True) if not ok]
            res.good.extend(s for s, ok in zip(range(a, b + 1), flags, strict=True) if ok)
            res.bad.extend(run_bad)
            if run_bad:
                log.warning(
                    "layer %s: cached spans %s are damaged; refetching", self.digest, run_bad
                )
            if inflate:
                for x, y in _runs(s for s, ok in zip(range(a, b + 1), flags, strict=True) if ok):
                    fresh = self._inflate(x, y, data, base)
                    res.inflated.update(fresh)
                    res.fresh.update(fresh)
        return res

    def _read_inflated(self, span: int) -> bytes | None:
        digest = self._inflated.get(span)
        if digest is None:
            return None
        start, end = self._zinfo.uncompressed_bounds(span)
        try:
            data = self._cache.read_inflated(start, end)
        except (OSError, ValueError) as exc:
            log.warning("layer %s: cannot read decompressed span %d: %s", self.digest, span, exc)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("layer %s: decompressed span %d is damaged on disk", self.digest, span)
            return None
        return data

    # ------------------------------------------------ decompressed spans on disk

    def _persist_job(self, spans: dict[int, bytes]) -> dict[int, str]:
        """Store decompressed spans that fit under the cache bound; their digests."""
        kept: dict[int, str] = {}
        if not self._cache.fits(sum(len(d) for d in spans.values())):
            if not self._inflated_full_reported:
                self._inflated_full_reported = True
                log.info(
                    "layer %s: the cache bound leaves no room for decompressed spans; "
                    "they are inflated again when read again",
                    self.digest,
                )
            return kept
        for s, data in sorted(spans.items()):
            digest = hashlib.sha256(data).hexdigest()
            try:
                self._cache.write_inflated(s, self._zinfo.uncompressed_bounds(s)[0], data, digest)
            except (OSError, ValueError) as exc:
                self._cache_failed(exc)
                break
            kept[s] = digest
        return kept

    def _store_job(
        self,
        runs: list[tuple[int, int]],
        ranges: list[tuple[int, int]],
        datas: list[bytes],
        inflate: bool,
        streamed: memoryview | None = None,
    ) -> tuple[list[int], list[int], dict[int, bytes]]:
        """Verify fetched runs, keep their good spans on disk and, with `inflate`, decompress
        them (`streamed`: the one run already inflated as it arrived)."""
        good: list[int] = []
        bad: list[int] = []
        inflated: dict[int, bytes] = {}
        for (a, b), (base, _), raw in zip(runs, ranges, datas, strict=True):
            data = memoryview(raw)
            flags = self._verify(a, b, data, base)
            for x, y in _runs(s for s, ok in zip(range(a, b + 1), flags, strict=True) if ok):
                start = self._fetch_start(x)
                end = self._zinfo.compressed_bounds(y)[1]
                stored = True
                try:
                    self._cache.write(start, data[start - base : end - base])
                    self._cache.mark(range(x, y + 1))
                except OSError as exc:
                    stored = False
                    self._cache_failed(exc)
                if stored:
                    self._cache_error = ""
                    good.extend(range(x, y + 1))
                if inflate:
                    whole = streamed is not None and (x, y) == (a, b)
                    inflated.update(self._inflate(x, y, data, base, streamed if whole else None))
            bad.extend(s for s, ok in zip(range(a, b + 1), flags, strict=True) if not ok)
        return good, bad, inflated

    def _cache_failed(self, exc: OSError | ValueError) -> None:
        # Reads are still served (from memory); the status says why nothing is kept.
        self._cache_error = f"span cache: {exc}"
        if not self._cache_write_failed:
            self._cache_write_failed = True
            log.warning("layer %s: cannot write the span cache: %s", self.digest, exc)

    def _apply(self, good: list[int], inflated: dict[int, bytes]) -> None:
        for s in good:
            if self._state[s] != VERIFIED:
                self._state[s] = VERIFIED
                self._verified += 1
                self._verified_bytes += self._owned_bytes(s)
        for s, data in inflated.items():
            self._memory.put((self._mem, s), data)

    def _owned_bytes(self, span: int) -> int:
        # Spans share a byte when bits != 0; count [end of previous span, own end) instead.
        end = self._zinfo.compressed_bounds(span)[1]
        return end - (0 if span == 0 else self._zinfo.compressed_bounds(span - 1)[1])

    def _mark_absent(self, span: int) -> None:
        if self._state[span] == VERIFIED:
            self._verified -= 1
            self._verified_bytes -= self._owned_bytes(span)
        self._state[span] = ABSENT

    # --------------------------------------------------------------- background

    @property
    def complete(self) -> bool:
        """Every span is verified on disk."""
        return self._verified == len(self._state)

    def missing_spans(self) -> list[int]:
        """Spans not yet verified on disk (pending ones included)."""
        return [s for s, st in enumerate(self._state) if st != VERIFIED]

    def claim_missing(self, max_bytes: int) -> SpanClaim | None:
        """Reserve the next run of unverified, unclaimed spans (≤ max_bytes, ≥ one span)."""
        if self._closed or self.layer_verified is False or self.rejected:
            return None
        n = len(self._state)
        first = -1
        for i in range(n):
            s = (self._bg_cursor + i) % n
            if self._state[s] != VERIFIED and s not in self._pending:
                first = s
                break
        if first < 0:
            return None
        spans = [first]
        start = self._fetch_start(first)
        s = first + 1
        while (
            s < n
            and self._state[s] != VERIFIED
            and s not in self._pending
            and self._zinfo.compressed_bounds(s)[1] - start <= max_bytes
        ):
            spans.append(s)
            s += 1
        self._bg_cursor = s % n
        network_bytes = 0
        for x in spans:
            if self._state[x] == ABSENT:
                lo, hi = self._zinfo.compressed_bounds(x)
                network_bytes += hi - (0 if x == 0 else lo)
        return SpanClaim(spans, network_bytes, self._register(spans))

    async def fill(self, claim: SpanClaim, *, kind: str = metrics.BACKGROUND) -> None:
        """Bring claimed spans to VERIFIED on disk; errors are raised. `kind` names the
        requests in the metrics (background or prefetch). Prefetched gzip spans are inflated
        too, while they download, into the memory cache and (`keep_inflated`, within the
        cache bound) decompressed on disk: the reader they were fetched ahead of then waits
        for no inflate. The background fill only fetches."""
        inflate = kind == metrics.PREFETCH and self._gzip
        with self._background_section():
            await self._load(claim._load, inflate=inflate, kind=kind)
            if inflate and self._keep_inflated:
                fresh = {
                    s: data
                    for s in claim.spans
                    if s not in self._inflated
                    and (data := self._memory.peek((self._mem, s))) is not None
                }
                if fresh:
                    self._inflated.update(await trio.to_thread.run_sync(self._persist_job, fresh))

    # ----------------------------------------------------------------- prefetch

    def prefetch(self, spans: Iterable[int]) -> int:
        """Queue spans to fetch ahead of any read, in the order given (a recorded or published
        start: what is read first comes first); how many were queued. A Prefetcher fetches
        them (`claim_prefetch`); spans on disk or being loaded when their turn comes are
        skipped."""
        n = len(self._state)
        queued = 0
        for s in spans:
            if 0 <= s < n and self._state[s] != VERIFIED and s not in self._prefetch_queued:
                self._prefetch.append(s)
                self._prefetch_queued.add(s)
                queued += 1
        return queued

    @property
    def prefetch_pending(self) -> int:
        """Spans still queued for prefetching."""
        return len(self._prefetch)

    def claim_prefetch(self, max_bytes: int) -> SpanClaim | None:
        """Reserve the next queued spans: a run of consecutive ones (≤ max_bytes, ≥ one)."""
        if self._closed or self.layer_verified is False or self.rejected:
            return None
        spans: list[int] = []
        start = 0
        while self._prefetch:
            s = self._prefetch[0]
            if self._state[s] == VERIFIED or s in self._pending:
                self._prefetch.popleft()
                self._prefetch_queued.discard(s)
                continue
            if spans and (
                s != spans[-1] + 1 or self._zinfo.compressed_bounds(s)[1] - start > max_bytes
            ):
                break
            if not spans:
                start = self._fetch_start(s)
            spans.append(s)
            self._prefetch.popleft()
            self._prefetch_queued.discard(s)
        if not spans:
            return None
        network_bytes = 0
        for x in spans:
            if self._state[x] == ABSENT:
                lo, hi = self._zinfo.compressed_bounds(x)
                network_bytes += hi - (0 if x == 0 else lo)
        return SpanClaim(spans, network_bytes, self._register(spans))

    def claim_uninflated(self, max_bytes: int) -> SpanClaim | None:
        """Reserve verified spans the background has not processed yet (≤ max_bytes of tar,
        ≥ one span), once the whole layer is verified: first spans already kept decompressed
        (still to show to the span observer), then spans to inflate if they fit under the
        cache bound."""
        if not self._keep_inflated or self._closed or not self.layer_verified or self.rejected:
            return None
        for kept in (True, False):
            spans: list[int] = []
            total = 0
            for s in range(len(self._state)):
                if (
                    self._background_done[s]
                    or (s in self._inflated) != kept
                    or s in self._pending
                    or self._state[s] != VERIFIED
                ):
                    continue
                lo, hi = self._zinfo.uncompressed_bounds(s)
                if spans and total + hi - lo > max_bytes:
                    break
                spans.append(s)
                total += hi - lo
            if spans and (kept or self._cache.fits(total)):
                return SpanClaim(spans, 0, self._register(spans, inflate=True))
        return None

    async def inflate(self, claim: SpanClaim) -> None:
        """Keep claimed spans decompressed on disk, inflated from their verified bytes, and
        show each to the span observer; the memory cache is left alone (nobody is reading
        them)."""
        with self._background_section():
            try:
                res = await trio.to_thread.run_sync(self._disk_job, claim.spans, True)
            except ZtocMismatchError as e:
                raise self._reject(e, "background") from e
            for s in res.stale:
                self._inflated.pop(s, None)
            for s in res.bad:
                self._mark_absent(s)
            kept = await trio.to_thread.run_sync(self._persist_job, res.fresh)
            self._inflated.update(kept)
            for s in res.inflated:
                self._background_done[s] = 1

    @property
    def inflated_spans(self) -> int:
        """Spans kept decompressed on disk."""
        return len(self._inflated)

    def release(self, claim: SpanClaim) -> None:
        """Give up a claim that was not (fully) filled; idempotent."""
        if not claim._load.done.is_set():
            claim._load.cancelled = True
            self._settle(claim._load)

    async def verify_layer(self) -> bool:
        """Check the complete cache file against the layer digest; drop it on mismatch."""
        if not self.complete:
            raise RuntimeError("verify_layer() before every span is cached")
        algorithm = self.digest.partition(":")[0]
        with self._busy_section():
            self._check_open()
            got = await trio.to_thread.run_sync(self._cache.blob_digest, algorithm)
        if got == self.digest:
            await self._verify_checkpoints()
            self.layer_verified = True
            metrics.LAYER_VERIFICATIONS.labels("ok").inc()
            return True
        self.layer_verified = False
        metrics.LAYER_VERIFICATIONS.labels("mismatch").inc()
        metrics.registry_error("digest_mismatch")
        self._last_error = f"whole-layer digest {got} does not match"
        log.error(
            "layer %s: the complete cached blob hashes to %s; dropping its cache",
            self.digest,
            got,
        )
        self._cache.clear()
        self._inflated.clear()
        self._background_done = bytearray(len(self._state))
        for s in range(len(self._state)):
            self._mark_absent(s)
        return False

    async def _verify_checkpoints(self) -> None:
        """The complete, digest-checked layer proves its zTOC: every checkpoint window and
        the diff ID (ZtocRejectedError when they do not match)."""
        if not isinstance(self._zinfo, GzipZinfo):
            return
        zinfo = self._zinfo

        def job() -> None:
            verifier = LayerVerifier(zinfo, self._diff_id)
            for start in range(0, self._size, _VERIFY_CHUNK):
                verifier.feed(self._cache.read(start, min(self._size, start + _VERIFY_CHUNK)))
            verifier.finish()
            lo, hi = zinfo.compressed_bounds(zinfo.num_spans - 1)
            verifier.check_last_span(self._cache.read(lo, hi))

        with self._busy_section():
            self._check_open()
            try:
                await trio.to_thread.run_sync(job)
            except ZtocMismatchError as e:
                raise self._reject(e, "background") from e

    def status(self) -> dict[str, Any]:
        """soci's layer status fields, plus span counts."""
        if self._closed:
            state = "closed"
        elif self.rejected:
            state = "rejected"
        elif self.layer_verified is False:
            state = "error"
        elif self.layer_verified:
            state = "complete"
        elif self.complete:
            state = "fetched"
        else:
            state = "fetching"
        fetched = self._verified_bytes
        return {
            "digest": self.digest,
            "size": self._size,
            "fetchedSize": fetched,
            "fetchedPercent": round(100.0 * fetched / self._size, 2) if self._size else 100.0,
            "state": state,
            "error": self._last_error,
            "cacheError": self._cache_error,
            "spansFetched": self._verified,
            "spansTotal": len(self._state),
            "spansInflated": len(self._inflated),
        }
