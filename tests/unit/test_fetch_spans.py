"""SpanManager: verified, deduplicated, coalesced, cached, cancellation-safe span reads."""

from __future__ import annotations

import dataclasses
import functools
import random
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.config import fetch_config
from snapshotter.errors import (
    DigestMismatchError,
    FormatError,
    LayerClosedError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.spans import (
    ForegroundActivity,
    SpanManager,
    SpanMemoryCache,
)
from snapshotter.freespace import FreeSpaceReserve
from snapshotter.soci.zinfo import decode_zinfo
from tests.fixtures.range_source import BlobRangeSource, FetchLayer, make_layer

NO_READAHEAD = fetch_config(readahead_spans=0)


@functools.cache
def layer(kind: str = "gzip", seed: int = 1, span_size: int = 16 << 10) -> FetchLayer:
    return make_layer(seed, kind=kind, span_size=span_size)


def zinfo(lay: FetchLayer):  # type: ignore[no-untyped-def]
    z = lay.ztoc
    return decode_zinfo(
        z.compression_algorithm,
        z.checkpoints,
        compressed_size=z.compressed_archive_size,
        uncompressed_size=z.uncompressed_archive_size,
    )


def spans_of_request(lay: FetchLayer, ranges: list[tuple[int, int]]) -> list[int]:
    """Span ids wholly inside one of the requested ranges (span 0 starts at byte 0)."""
    zi = zinfo(lay)
    out = []
    for start, end in ranges:
        for s in range(zi.num_spans):
            lo, hi = zi.compressed_bounds(s)
            if (0 if s == 0 else lo) >= start and hi <= end:
                out.append(s)
    return out


@asynccontextmanager
async def open_manager(
    lay: FetchLayer,
    source: BlobRangeSource,
    root: Path,
    *,
    config: FetchConfig = NO_READAHEAD,
    memory: SpanMemoryCache | None = None,
    disk: DiskCache | None = None,
    activity: ForegroundActivity | None = None,
    inflated: bool = False,
) -> AsyncIterator[SpanManager]:
    disk = DiskCache(root, 1 << 30) if disk is None else disk
    handle = disk.open_layer(
        lay.digest, len(lay.blob), uncompressed_size=len(lay.tar) if inflated else None
    )
    manager = SpanManager(
        lay.digest,
        lay.ztoc,
        source,
        handle,
        memory=SpanMemoryCache(64 << 20) if memory is None else memory,
        config=config,
        activity=activity,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        try:
            yield manager
        finally:
            await manager.close()


@pytest.mark.parametrize("kind", ["gzip", "pigz", "tar"])
async def test_whole_layer_and_random_reads(kind: str, tmp_path: Path) -> None:
    lay = layer(kind)
    source = BlobRangeSource(lay.blob)
    rng = random.Random(7)
    async with open_manager(lay, source, tmp_path) as m:
        assert m.num_spans > 10
        for _ in range(200):
            off = rng.randrange(len(lay.tar) + 10)
            n = rng.choice([0, 1, 4096, 70_000, 300_000])
            assert await m.read(off, n) == lay.tar[off : off + n]
        assert await m.read(0, len(lay.tar) + 100) == lay.tar
        assert await m.read(len(lay.tar), 10) == b""


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(["gzip", "pigz", "tar"]),
    reads=st.lists(
        st.tuples(st.integers(0, 1_500_000), st.integers(0, 200_000)), min_size=1, max_size=12
    ),
    memory_bytes=st.sampled_from([0, 20_000, 1 << 20, 64 << 20]),
)
def test_reads_equal_tar_slices(kind: str, reads: list[tuple[int, int]], memory_bytes: int) -> None:
    lay = layer(kind)

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source = BlobRangeSource(lay.blob)
            memory = SpanMemoryCache(memory_bytes)
            async with open_manager(lay, source, Path(tmp), memory=memory) as m:
                for off, n in reads:
                    assert await m.read(off, n) == lay.tar[off : off + n]
                assert memory.usage <= memory_bytes

    trio.run(main)


async def test_concurrent_readers_share_fetches(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob, latency=0.05)
    rng = random.Random(3)
    size = len(lay.tar)
    async with open_manager(lay, source, tmp_path) as m:
        results: dict[int, bytes] = {}
        reads = [(rng.randrange(size // 2), rng.randrange(1, 100_000)) for _ in range(50)]

        async def reader(i: int) -> None:
            results[i] = await m.read(*reads[i])

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(reader, i)
        for i, (off, n) in enumerate(reads):
            assert results[i] == lay.tar[off : off + n]
        fetched = Counter(s for r in source.requests for s in spans_of_request(lay, r))
        assert fetched and max(fetched.values()) == 1, fetched
        assert source.request_count < 50


async def test_contiguous_missing_spans_are_one_request(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:
        start = zi.uncompressed_bounds(2)[0]
        end = zi.uncompressed_bounds(6)[1]
        assert await m.read(start, end - start) == lay.tar[start:end]
        assert source.requests == [[(zi.compressed_bounds(2)[0], zi.compressed_bounds(6)[1])]]


async def test_gaps_make_one_multi_range_request(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:
        s4 = zi.uncompressed_bounds(4)[0]
        await m.read(s4, 1)
        source.requests.clear()
        start, end = zi.uncompressed_bounds(2)[0], zi.uncompressed_bounds(6)[1]
        assert await m.read(start, end - start) == lay.tar[start:end]
        assert source.requests == [
            [
                (zi.compressed_bounds(2)[0], zi.compressed_bounds(3)[1]),
                (zi.compressed_bounds(5)[0], zi.compressed_bounds(6)[1]),
            ]
        ]


async def test_single_range_mode(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    source.single_range_only = True
    config = dataclasses.replace(NO_READAHEAD, force_single_range_mode=True)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        await m.read(zi.uncompressed_bounds(4)[0], 1)
        start, end = zi.uncompressed_bounds(2)[0], zi.uncompressed_bounds(6)[1]
        assert await m.read(start, end - start) == lay.tar[start:end]
        assert all(len(r) == 1 for r in source.requests)
        assert source.request_count == 3


async def test_max_request_bytes_splits_requests(tmp_path: Path) -> None:
    lay = layer("tar")
    source = BlobRangeSource(lay.blob)
    config = dataclasses.replace(NO_READAHEAD, max_request_bytes=40 << 10)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        assert await m.read(0, 200_000) == lay.tar[:200_000]
        assert all(e - s <= 40 << 10 for r in source.requests for s, e in r)
        assert sum(len(r) for r in source.requests) == 7  # 13 spans of 16 KiB, 2 per range


async def test_readahead_on_sequential_reads(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    config = fetch_config(readahead_spans=2)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        await m.read(0, 4096)
        assert source.request_count == 1  # the first read is not known to be sequential
        await m.read(4096, 4096)  # sequential: the next two spans are fetched ahead
        first_span = zi.span_of(4096)
        with trio.fail_after(5):
            while m.status()["spansFetched"] < first_span + 3:
                await trio.sleep(0.01)
        n = source.request_count
        off = zi.uncompressed_bounds(first_span + 1)[0]
        assert await m.read(off, 8192) == lay.tar[off : off + 8192]
        # Only spans further ahead may have been requested since.
        assert all(min(spans_of_request(lay, r)) > first_span + 2 for r in source.requests[n:])


async def test_readahead_stops_at_the_end_of_the_file(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    config = fetch_config(readahead_spans=2)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        # A "file" that ends inside the first span: sequential reads of it fetch nothing more.
        file_end = zi.uncompressed_bounds(0)[1] - 1
        await m.read(0, 4096, readahead_until=file_end)
        await m.read(4096, 4096, readahead_until=file_end)
        await trio.sleep(0.1)
        assert source.request_count == 1
        assert m.status()["spansFetched"] == 1
        # Without a bound the same reads fetch ahead.
        await m.read(8192, 4096)
        with trio.fail_after(5):
            while m.status()["spansFetched"] < 3:
                await trio.sleep(0.01)


async def test_corrupt_once_is_refetched(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.corrupt_next = 1
    async with open_manager(lay, source, tmp_path) as m:
        assert await m.read(100_000, 5000) == lay.tar[100_000:105_000]
        assert source.request_count == 2
        assert m.digest_mismatches == 1


async def test_always_corrupt_never_serves_wrong_bytes(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.corrupt_always = True
    async with open_manager(lay, source, tmp_path) as m:
        for _ in range(2):
            with pytest.raises(DigestMismatchError):
                await m.read(100_000, 5000)
        assert m.status()["spansFetched"] == 0
        assert "DigestMismatchError" in m.status()["error"]
        source.corrupt_always = False
        assert await m.read(100_000, 5000) == lay.tar[100_000:105_000]


async def test_registry_failures_then_recovery(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:
        source.fail_next = 1
        with pytest.raises(RegistryUnavailableError):
            await m.read(0, 10)
        source.truncate_next = 1
        with pytest.raises(RegistryResponseError):
            await m.read(0, 10)
        assert "RegistryResponseError" in m.status()["error"]
        assert await m.read(0, 10) == lay.tar[:10]
        assert m.status()["error"] == ""  # the layer works again: no stale error on show


async def test_timeout_is_a_typed_error(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.gate = trio.Event()
    config = dataclasses.replace(NO_READAHEAD, fetching_timeout_sec=0)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        with pytest.raises(RegistryUnavailableError, match="timed out"):
            await m.read(0, 10)
        source.gate.set()


async def test_cancelled_reader_leaves_span_fetchable(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.gate = trio.Event()
    async with open_manager(lay, source, tmp_path) as m:
        with trio.move_on_after(0.05) as scope:
            await m.read(50_000, 100)
        assert scope.cancelled_caught
        assert m.foreground_waiting == 0
        source.gate.set()
        assert await m.read(50_000, 100) == lay.tar[50_000:50_100]
        assert source.request_count == 1  # the cancelled reader's fetch was finished and kept


async def test_close_wakes_waiting_readers(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.gate = trio.Event()
    disk = DiskCache(tmp_path, 1 << 30)
    handle = disk.open_layer(lay.digest, len(lay.blob))
    m = SpanManager(
        lay.digest, lay.ztoc, source, handle, memory=SpanMemoryCache(1 << 20), config=fetch_config()
    )
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await m.read(0, 10)
        except LayerClosedError as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            nursery.start_soon(reader)
            await source.started.wait()
            await m.close()
    assert len(errors) == 1
    with pytest.raises(LayerClosedError):
        await m.read(0, 10)
    assert disk.open_layer(lay.digest, len(lay.blob)) is not None  # handle was released


async def test_restart_serves_from_disk_and_refetches_damage(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:
        assert await m.read(0, 400_000) == lay.tar[:400_000]
    source2 = BlobRangeSource(lay.blob)
    async with open_manager(lay, source2, tmp_path) as m:
        assert await m.read(0, 400_000) == lay.tar[:400_000]
    assert source2.request_count == 0
    # Damage span 3 in the cache file: it is detected and refetched, nothing else is.
    blob_file = next(tmp_path.glob("sha256-*/blob"))
    lo, hi = zi.compressed_bounds(3)
    with open(blob_file, "r+b") as f:
        f.seek((lo + hi) // 2)
        f.write(b"\xff\x00\xff")
    source3 = BlobRangeSource(lay.blob)
    async with open_manager(lay, source3, tmp_path) as m:
        assert await m.read(0, 400_000) == lay.tar[:400_000]
    assert source3.requests == [[(lo, hi)]]


async def test_tiny_memory_cache_still_serves(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    memory = SpanMemoryCache(1000)
    async with open_manager(lay, source, tmp_path, memory=memory) as m:
        assert await m.read(10_000, 200_000) == lay.tar[10_000:210_000]
        assert await m.read(10_000, 200_000) == lay.tar[10_000:210_000]
        assert memory.usage == 0
        assert source.request_count == 1


def test_memory_cache_lru_bound() -> None:
    mem = SpanMemoryCache(100)
    assert mem.put(("a", 0), b"x" * 40)
    assert mem.put(("a", 1), b"x" * 40)
    assert mem.get(("a", 0)) is not None  # 0 is now most recent
    assert mem.put(("b", 0), b"x" * 40)
    assert ("a", 1) not in mem and ("a", 0) in mem
    assert not mem.put(("c", 0), b"x" * 101)
    mem.discard_layer("a")
    assert len(mem) == 1 and mem.usage == 40


async def test_status_and_bad_ztoc(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:
        st0 = m.status()
        assert st0["state"] == "fetching" and st0["fetchedSize"] == 0
        await m.read(0, len(lay.tar))
        st1 = m.status()
        assert st1["fetchedSize"] == st1["size"] == len(lay.blob)
        assert st1["fetchedPercent"] == 100.0 and st1["state"] == "fetched"
        assert await m.verify_layer()
        assert m.status()["state"] == "complete"
    bad = dataclasses.replace(lay.ztoc, span_digests=lay.ztoc.span_digests[:-1])
    disk = DiskCache(tmp_path / "other", 1 << 20)
    with pytest.raises(FormatError):
        SpanManager(
            lay.digest,
            bad,
            source,
            disk.open_layer(lay.digest, len(lay.blob)),
            memory=SpanMemoryCache(0),
            config=fetch_config(),
        )


async def inflate_all(m: SpanManager) -> None:
    """What the background fetcher does: complete the layer, verify it, inflate it."""
    with trio.fail_after(10):
        while (missing := m.claim_missing(1 << 30)) is not None:
            try:
                await m.fill(missing)
            finally:
                m.release(missing)
        assert await m.verify_layer()
        while (claim := m.claim_uninflated(64 << 10)) is not None:
            try:
                await m.inflate(claim)
            finally:
                m.release(claim)


async def test_inflated_spans_are_kept_and_read_back_without_inflating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path, inflated=True) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
        assert m.inflated_spans == 0  # reads never wait on keeping copies
        await inflate_all(m)
        assert m.status()["spansInflated"] == m.num_spans
    plain = next(tmp_path.glob("sha256-*/inflated"))
    assert plain.read_bytes() == lay.tar

    def no_inflate(*args: object) -> bytes:
        raise AssertionError("a kept span was inflated again")

    monkeypatch.setattr("snapshotter.fetch.spans.inflate_spans", no_inflate)
    source2 = BlobRangeSource(lay.blob)
    async with open_manager(lay, source2, tmp_path, inflated=True) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
    assert source2.request_count == 0


async def test_damaged_inflated_span_is_not_served(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path, inflated=True) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
        await inflate_all(m)
    lo, hi = zi.uncompressed_bounds(3)
    plain = next(tmp_path.glob("sha256-*/inflated"))
    with open(plain, "r+b") as f:
        f.seek((lo + hi) // 2)
        f.write(b"\xff\x00\xff")
    source2 = BlobRangeSource(lay.blob)
    async with open_manager(lay, source2, tmp_path, inflated=True) as m:
        assert await m.read(lo, hi - lo) == lay.tar[lo:hi]
        assert m.inflated_spans == m.num_spans - 1
        await inflate_all(m)  # inflated again from the verified compressed bytes, and kept
        assert m.inflated_spans == m.num_spans
    assert source2.request_count == 0
    assert plain.read_bytes()[lo:hi] == lay.tar[lo:hi]


async def test_no_inflated_copies_beyond_the_cache_bound(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    disk = DiskCache(tmp_path, len(lay.blob) + (64 << 10))
    async with open_manager(lay, source, tmp_path, inflated=True, disk=disk) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
        await inflate_all(m)
        assert m.inflated_spans == 0
        assert disk.usage() <= disk.max_bytes
        assert await m.read(0, len(lay.tar)) == lay.tar


async def test_uncompressed_layers_keep_no_inflated_copy(tmp_path: Path) -> None:
    lay = layer("tar")
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path, inflated=True) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
        await inflate_all(m)
        assert m.inflated_spans == 0
    assert not next(tmp_path.glob("sha256-*/inflated-spans")).read_bytes()


async def test_readahead_inflates_cached_spans_past_the_file_end(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    memory = SpanMemoryCache(64 << 20)
    config = fetch_config(readahead_spans=2)
    async with open_manager(lay, source, tmp_path, config=config, memory=memory) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar  # every span on disk
        memory.discard_layer(lay.digest)
        n = source.request_count
        file_end = zi.uncompressed_bounds(0)[1] - 1
        await m.read(0, 4096, readahead_until=file_end)
        await m.read(4096, 4096, readahead_until=file_end)
        # No network is involved, so the spans after the file are inflated ahead.
        with trio.fail_after(5):
            while (lay.digest, 2) not in memory:
                await trio.sleep(0.005)
        assert (lay.digest, 1) in memory and (lay.digest, 3) not in memory
        assert source.request_count == n


async def test_span_observer_sees_every_decompressed_span(tmp_path: Path) -> None:
    lay = layer()
    zi = zinfo(lay)
    seen: dict[int, bytes] = {}
    threads: set[bool] = set()

    def observe(start: int, data: bytes) -> None:
        threads.add(threading.current_thread() is threading.main_thread())
        seen[start] = data

    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path, inflated=True) as m:
        m.set_span_observer(observe)
        mid = zi.uncompressed_bounds(1)[0] + 10
        assert await m.read(mid, 100) == lay.tar[mid : mid + 100]
        lo, hi = zi.uncompressed_bounds(1)
        assert seen[lo] == lay.tar[lo:hi]  # the foreground fetch fed the observer
        seen.clear()
        await inflate_all(m)  # the background pass hands over every span too
        assert sorted(seen) == [zi.uncompressed_bounds(s)[0] for s in range(zi.num_spans)]
        for start, data in seen.items():
            assert data == lay.tar[start : start + len(data)]
    assert threads == {False}  # always in a worker thread, never trio's


@pytest.mark.parametrize("kind", ["gzip", "pigz"])
async def test_a_read_is_served_from_the_span_inflated_while_it_arrived(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run fetched for a read is inflated from its stream: inflating it again after it
    arrived would fail here, and the bytes are right."""
    lay = layer(kind)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path) as m:

        def no_second_inflate(*args: object) -> bytes:
            raise AssertionError("inflated after it arrived")

        monkeypatch.setattr("snapshotter.fetch.spans.inflate_spans", no_second_inflate)
        for off in (0, len(lay.tar) // 2, len(lay.tar) - 5000):
            assert await m.read(off, 4000) == lay.tar[off : off + 4000]
        assert source.streamed >= 3


async def test_a_corrupt_stream_is_never_served(tmp_path: Path) -> None:
    """The stream's output counts only once the span digests match: a flipped byte makes the
    run fetched again, and what the reader gets is the layer's."""
    lay = layer("gzip")
    source = BlobRangeSource(lay.blob)
    source.corrupt_next = 1
    async with open_manager(lay, source, tmp_path) as m:
        off = len(lay.tar) // 3
        assert await m.read(off, 70_000) == lay.tar[off : off + 70_000]
        assert source.request_count == 2 and m.digest_mismatches >= 1


async def test_stream_inflate_can_be_turned_off(tmp_path: Path) -> None:
    lay = layer("gzip")
    source = BlobRangeSource(lay.blob)
    config = fetch_config(readahead_spans=0, stream_inflate=False)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        assert await m.read(1000, 10) == lay.tar[1000:1010]
    assert source.streamed == 0


async def test_misses_walking_forward_load_the_next_spans(tmp_path: Path) -> None:
    lay = layer("gzip")
    z = zinfo(lay)
    config = fetch_config(readahead_spans=0, miss_readahead_spans=2)
    source = BlobRangeSource(lay.blob)
    async with open_manager(lay, source, tmp_path, config=config) as m:
        # A reader that jumps around gets what it asked for, nothing more.
        for s in (9, 3):
            lo = z.uncompressed_bounds(s)[0]
            await m.read(lo, 10)
        assert m.status()["spansFetched"] == 2
        # Then a miss just after the last one: the next two spans come along.
        lo = z.uncompressed_bounds(4)[0]
        await m.read(lo, 10)
        with trio.fail_after(5):
            while m.status()["spansFetched"] < 5:
                await trio.sleep(0.01)
        requests = source.request_count
        for s in (5, 6):
            lo = z.uncompressed_bounds(s)[0]
            assert await m.read(lo, 10) == lay.tar[lo : lo + 10]
        assert source.request_count == requests  # already there


async def test_a_full_disk_serves_reads_and_says_why_nothing_is_kept(tmp_path: Path) -> None:
    """Reads above the free-space reserve are served from memory, uncounted, and the status
    says why; once there is room again, the next fetch is kept and the error goes."""
    lay = layer()
    zi = zinfo(lay)
    source = BlobRangeSource(lay.blob)
    disk = DiskCache(tmp_path, 1 << 30, reserve=FreeSpaceReserve(min_free_percent=100))
    async with open_manager(lay, source, tmp_path, disk=disk, memory=SpanMemoryCache(0)) as m:
        lo, hi = zi.uncompressed_bounds(2)
        assert await m.read(lo, hi - lo) == lay.tar[lo:hi]
        status = m.status()
        assert status["fetchedSize"] == 0 and status["spansFetched"] == 0
        assert "span cache" in status["cacheError"] and "free" in status["cacheError"]
        disk.reserve = FreeSpaceReserve()
        lo, hi = zi.uncompressed_bounds(5)
        assert await m.read(lo, hi - lo) == lay.tar[lo:hi]
        status = m.status()
        assert status["fetchedSize"] > 0 and status["cacheError"] == ""
