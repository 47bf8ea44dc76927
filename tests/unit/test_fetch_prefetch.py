"""Prefetcher: a start's spans fetched at once, in order, in parallel, coalesced into runs,
pausing while a read waits, and served verified to the readers after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from snapshotter import metrics
from snapshotter.config import fetch_config
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.prefetch import Prefetcher
from snapshotter.fetch.spans import ForegroundActivity, SpanManager, SpanMemoryCache
from tests.fixtures.range_source import BlobRangeSource, FetchLayer, make_layer, zinfo_of

SPAN = 16 << 10


def settings(**kw: int) -> FetchConfig:
    return fetch_config(readahead_spans=0, prefetch_request_bytes=3 * SPAN, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def rig(
    tmp_path: Path, lay: FetchLayer, source: BlobRangeSource, config: FetchConfig
) -> AsyncIterator[tuple[SpanManager, Prefetcher, ForegroundActivity]]:
    activity = ForegroundActivity()
    prefetcher = Prefetcher(config, activity)
    disk = DiskCache(tmp_path, 1 << 30)
    manager = SpanManager(
        lay.digest,
        lay.ztoc,
        source,
        disk.open_layer(lay.digest, len(lay.blob)),
        memory=SpanMemoryCache(16 << 20),
        config=config,
        activity=activity,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(prefetcher.run)
        yield manager, prefetcher, activity
        await manager.close()
        nursery.cancel_scope.cancel()


async def until(predicate: object, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.005)


async def test_queued_spans_are_fetched_in_runs_in_order_and_served(tmp_path: Path) -> None:
    lay = make_layer(7, span_size=SPAN)
    assert zinfo_of(lay.ztoc).num_spans > 12
    source = BlobRangeSource(lay.blob)
    before = metrics.SPAN_FETCHES.labels(metrics.PREFETCH)._value.get()
    async with rig(tmp_path, lay, source, settings(prefetch_connections=1)) as (m, p, _):
        order = [9, 10, 11, 12, 3, 4, 1]
        assert m.prefetch(order) == len(order)
        assert m.prefetch([9, 3]) == 0  # queued already
        p.add(m)
        await until(lambda: m.status()["spansFetched"] == len(order))
        # One connection: each request is one range of consecutive spans, they went out in
        # the queue's order, and consecutive spans were coalesced.
        z = zinfo_of(lay.ztoc)
        first_span = {z.compressed_bounds(s)[0]: s for s in order}
        firsts = []
        for request in source.requests:
            assert len(request) == 1
            firsts.append(first_span[request[0][0]])
        assert firsts == sorted(firsts, key=order.index) and firsts[0] == 9
        assert len(source.requests) < len(order)
        assert metrics.SPAN_FETCHES.labels(metrics.PREFETCH)._value.get() - before == len(firsts)
        # A reader now finds them on disk: no more network.
        requests = len(source.requests)
        lo = zinfo_of(lay.ztoc).uncompressed_bounds(10)[0]
        assert await m.read(lo, 100) == lay.tar[lo : lo + 100]
        assert len(source.requests) == requests
        assert m.prefetch_pending == 0


async def test_prefetched_spans_are_served_with_no_inflate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefetching inflates as it goes and keeps the spans decompressed on disk: a reader
    after that inflates nothing, even once the memory cache forgot them."""
    lay = make_layer(7, span_size=SPAN)
    z = zinfo_of(lay.ztoc)
    source = BlobRangeSource(lay.blob)
    activity = ForegroundActivity()
    config = settings(prefetch_connections=2)
    prefetcher = Prefetcher(config, activity)
    disk = DiskCache(tmp_path, 1 << 30)
    memory = SpanMemoryCache(16 << 20)
    manager = SpanManager(
        lay.digest,
        lay.ztoc,
        source,
        disk.open_layer(lay.digest, len(lay.blob), uncompressed_size=z.uncompressed_size),
        memory=memory,
        config=config,
        activity=activity,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(prefetcher.run)
        manager.prefetch(range(z.num_spans))
        prefetcher.add(manager)
        await until(lambda: manager.inflated_spans == z.num_spans)
        memory.discard_layer(lay.digest)

        def no_inflate(*args: object, **kw: object) -> bytes:
            raise AssertionError("a prefetched span was inflated again")

        monkeypatch.setattr("snapshotter.fetch.spans.inflate_spans", no_inflate)
        monkeypatch.setattr("snapshotter.fetch.spans.SpanStreamInflater", no_inflate)
        requests = len(source.requests)
        assert await manager.read(0, len(lay.tar)) == lay.tar
        assert len(source.requests) == requests
        await manager.close()
        nursery.cancel_scope.cancel()


async def test_several_connections_and_verified_spans_are_skipped(tmp_path: Path) -> None:
    lay = make_layer(7, span_size=SPAN)
    source = BlobRangeSource(lay.blob, latency=0.05)
    async with rig(tmp_path, lay, source, settings(prefetch_connections=4)) as (m, p, _):
        lo = zinfo_of(lay.ztoc).uncompressed_bounds(5)[0]
        await m.read(lo, 10)  # span 5 is verified before its turn
        fetched = len(source.requests)
        m.prefetch(range(zinfo_of(lay.ztoc).num_spans))
        p.add(m)
        await until(lambda: m.status()["spansFetched"] == zinfo_of(lay.ztoc).num_spans)
        assert source.max_in_flight >= 3  # parallel
        prefetched = [s for req in source.requests[fetched:] for s in req]
        span5 = zinfo_of(lay.ztoc).compressed_bounds(5)
        assert all(not (a <= span5[0] < b) for a, b in prefetched)  # never fetched twice


async def test_a_waiting_read_goes_first(tmp_path: Path) -> None:
    """While a read waits on the network, no prefetch request starts."""
    lay = make_layer(7, span_size=SPAN)
    source = BlobRangeSource(lay.blob)
    async with rig(tmp_path, lay, source, settings(prefetch_connections=2)) as (m, p, activity):
        gate = source.gate = trio.Event()
        last = zinfo_of(lay.ztoc).num_spans - 1
        lo = zinfo_of(lay.ztoc).uncompressed_bounds(last)[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.read, lo, 10)
            await until(lambda: activity.waiting == 1)
            m.prefetch([0, 1, 2, 3])
            p.add(m)
            await trio.sleep(0.1)
            assert len(source.requests) == 1  # only the read's
            gate.set()
        await until(lambda: m.prefetch_pending == 0 and m.status()["spansFetched"] == 5)
