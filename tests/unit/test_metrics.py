"""Prometheus metrics: updated by real span managers, the background fetcher, FUSE handlers and
the registry client; served at /metrics from a stoppable server (TCP or unix socket)."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import prometheus_client
import pyfuse3
import pytest
import trio

from snapshotter import metrics
from snapshotter.config import HttpConfig, fetch_config
from snapshotter.errors import DigestMismatchError, RegistryUnavailableError
from snapshotter.fetch.background import BackgroundFetcher
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.spans import ForegroundActivity, SpanManager, SpanMemoryCache
from snapshotter.fs.operations import LayerOperations, _translated
from snapshotter.fs.table import FsOpError, MountTable
from snapshotter.registry.transport import RetryTransport
from snapshotter.registry.wire import status_error
from tests.fixtures.range_source import BlobRangeSource, FetchLayer, make_layer

NO_READAHEAD = fetch_config(readahead_spans=0)
QUIET = fetch_config(silence_period_msec=0, fetch_period_msec=20, readahead_spans=0)


def value(name: str, **labels: str) -> float:
    """A sample of pysoci's registry (0 when the series does not exist)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


_LAYERS: dict[int, FetchLayer] = {}


def layer(seed: int = 11) -> FetchLayer:
    if seed not in _LAYERS:
        _LAYERS[seed] = make_layer(seed, span_size=16 << 10, min_size=256 << 10)
    return _LAYERS[seed]


@asynccontextmanager
async def running(
    lay: FetchLayer,
    source: BlobRangeSource,
    disk: DiskCache,
    *,
    config: FetchConfig = NO_READAHEAD,
    activity: ForegroundActivity | None = None,
) -> AsyncIterator[SpanManager]:
    manager = SpanManager(
        lay.digest,
        lay.ztoc,
        source,
        disk.open_layer(lay.digest, len(lay.blob)),
        memory=SpanMemoryCache(64 << 20),
        config=config,
        activity=activity,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        try:
            yield manager
        finally:
            await manager.close()


# ------------------------------------------------------------------------ span fetching


async def test_on_demand_reads_count_fetches_bytes_latency_and_caches(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    fetches = value("pysoci_span_fetches_total", kind="on_demand")
    fetched = value("pysoci_span_fetch_bytes_total", kind="on_demand")
    latency = value("pysoci_span_fetch_duration_seconds_count", kind="on_demand")
    background = value("pysoci_span_fetches_total", kind="background")
    mem_hits = value("pysoci_cache_hits_total", cache="memory")
    mem_misses = value("pysoci_cache_misses_total", cache="memory")
    disk_misses = value("pysoci_cache_misses_total", cache="disk")
    disk = DiskCache(tmp_path, 1 << 30)
    async with running(lay, source, disk) as m:
        assert await m.read(0, 1000) == lay.tar[:1000]
        assert await m.read(10, 100) == lay.tar[10:110]  # the same span, from memory
        assert value("pysoci_span_fetches_total", kind="on_demand") - fetches == 1
        assert source.request_count == 1
        assert (
            value("pysoci_span_fetch_bytes_total", kind="on_demand") - fetched
            == source.bytes_served
        )
        assert value("pysoci_span_fetch_duration_seconds_count", kind="on_demand") - latency == 1
        assert value("pysoci_span_fetches_total", kind="background") == background
        assert value("pysoci_cache_hits_total", cache="memory") - mem_hits >= 1
        assert value("pysoci_cache_misses_total", cache="memory") - mem_misses >= 1
        assert value("pysoci_cache_misses_total", cache="disk") - disk_misses == 1
        # The per-layer gauges follow the span manager's verified bytes.
        assert value("pysoci_layer_total_bytes", layer=lay.digest) == len(lay.blob)
        got = value("pysoci_layer_fetched_bytes", layer=lay.digest)
        assert got == m.status()["fetchedSize"] > 0
    # Unmounted: its series are gone (bounded cardinality).
    for name in ("pysoci_layer_total_bytes", "pysoci_layer_fetched_bytes"):
        assert metrics.REGISTRY.get_sample_value(name, {"layer": lay.digest}) is None


async def test_spans_on_disk_are_disk_cache_hits(tmp_path: Path) -> None:
    lay = layer()
    disk = DiskCache(tmp_path, 1 << 30)
    async with running(lay, BlobRangeSource(lay.blob), disk) as m:
        await m.read(0, len(lay.tar))
    hits = value("pysoci_cache_hits_total", cache="disk")
    misses = value("pysoci_cache_misses_total", cache="disk")
    source = BlobRangeSource(lay.blob)
    async with running(lay, source, disk) as m:
        assert await m.read(0, len(lay.tar)) == lay.tar
        assert source.request_count == 0
        assert value("pysoci_cache_hits_total", cache="disk") - hits == m.num_spans
        assert value("pysoci_cache_misses_total", cache="disk") == misses


async def test_span_digest_mismatch_is_a_registry_error(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.corrupt_always = True
    before = value("pysoci_registry_errors_total", kind="digest_mismatch")
    async with running(lay, source, DiskCache(tmp_path, 1 << 30)) as m:
        with pytest.raises(DigestMismatchError):
            await m.read(0, 100)
    # One per request that delivered bad bytes (the first fetch and its retry).
    assert value("pysoci_registry_errors_total", kind="digest_mismatch") - before == 2


async def test_fetch_timeout_is_counted(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    source.gate = trio.Event()
    before = value("pysoci_registry_errors_total", kind="timeout")
    config = fetch_config(readahead_spans=0, fetching_timeout_sec=0)
    async with running(lay, source, DiskCache(tmp_path, 1 << 30), config=config) as m:
        with pytest.raises(RegistryUnavailableError):
            await m.read(0, 100)
    assert value("pysoci_registry_errors_total", kind="timeout") - before == 1


async def test_background_fill_counts_as_background(tmp_path: Path) -> None:
    lay = layer(12)
    source = BlobRangeSource(lay.blob)
    activity = ForegroundActivity()
    fetcher = BackgroundFetcher(QUIET, activity)
    before = value("pysoci_span_fetches_total", kind="background")
    bytes_before = value("pysoci_span_fetch_bytes_total", kind="background")
    on_demand = value("pysoci_span_fetches_total", kind="on_demand")
    verified = value("pysoci_layer_verifications_total", result="ok")
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        async with running(
            lay, source, DiskCache(tmp_path, 1 << 30), config=QUIET, activity=activity
        ) as m:
            fetcher.add(m)
            with trio.fail_after(20):
                while m.status()["state"] != "complete":
                    await trio.sleep(0.01)
            assert value("pysoci_layer_fetched_bytes", layer=lay.digest) == len(lay.blob)
            fetcher.remove(m)
        await fetcher.close()
    assert value("pysoci_span_fetches_total", kind="background") - before == source.request_count
    assert value("pysoci_span_fetch_bytes_total", kind="background") - bytes_before == len(lay.blob)
    assert value("pysoci_span_fetches_total", kind="on_demand") == on_demand
    assert value("pysoci_layer_verifications_total", result="ok") - verified == 1


async def test_preemption_is_counted(tmp_path: Path) -> None:
    lay = layer(13)
    source = BlobRangeSource(lay.blob, latency=0.2)
    activity = ForegroundActivity()
    config = fetch_config(
        silence_period_msec=0,
        fetch_period_msec=20,
        readahead_spans=0,
        background_connections=1,
        background_request_bytes=1 << 20,
    )
    fetcher = BackgroundFetcher(config, activity)
    before = value("pysoci_background_preemptions_total")
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        async with running(
            lay, source, DiskCache(tmp_path, 1 << 30), config=config, activity=activity
        ) as m:
            fetcher.add(m)
            with trio.fail_after(10):
                await source.started.wait()
            await m.read(len(lay.tar) - 100, 100)
            fetcher.remove(m)
        await fetcher.close()
    assert value("pysoci_background_preemptions_total") - before >= 1


# ------------------------------------------------------------------------------- FUSE


async def test_fuse_operations_and_failures_by_errno() -> None:
    async def lookup(name: str) -> str:
        if name == "missing":
            raise FsOpError(errno.ENOENT)
        if name == "broken":
            raise RuntimeError("bug")
        return name

    op = _translated(lookup)
    ops = value("pysoci_fuse_operations_total", operation="lookup")
    enoent = value("pysoci_fuse_operation_failures_total", operation="lookup", errno="ENOENT")
    eio = value("pysoci_fuse_operation_failures_total", operation="lookup", errno="EIO")
    assert await op("x") == "x"
    for name in ("missing", "broken"):
        with pytest.raises(pyfuse3.FUSEError):
            await op(name)
    assert value("pysoci_fuse_operations_total", operation="lookup") - ops == 3
    assert (
        value("pysoci_fuse_operation_failures_total", operation="lookup", errno="ENOENT") - enoent
        == 1
    )
    assert value("pysoci_fuse_operation_failures_total", operation="lookup", errno="EIO") - eio == 1


async def test_write_requests_count_as_erofs() -> None:
    ops = LayerOperations(MountTable())
    before = value("pysoci_fuse_operation_failures_total", operation="mkdir", errno="EROFS")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(1, b"x", 0o755, None)  # type: ignore[arg-type]
    assert info.value.errno == errno.EROFS
    after = value("pysoci_fuse_operation_failures_total", operation="mkdir", errno="EROFS")
    assert after - before == 1


# --------------------------------------------------------------------------- registry


def test_status_errors_by_class() -> None:
    before = value("pysoci_registry_errors_total", kind="http_4xx")
    before5 = value("pysoci_registry_errors_total", kind="http_5xx")
    status_error(404, b"", "blob x", "reg.example")
    status_error(401, b"", "blob x", "reg.example")
    status_error(503, b"", "blob x", "reg.example")
    assert value("pysoci_registry_errors_total", kind="http_4xx") - before == 2
    assert value("pysoci_registry_errors_total", kind="http_5xx") - before5 == 1


async def test_transport_counts_each_failed_attempt() -> None:
    answers = iter(["timeout", "refused", 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if answer == "timeout":
            raise httpx.ConnectTimeout("slow", request=request)
        if answer == "refused":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(int(answer))

    async def no_sleep(_: float) -> None:
        return None

    transport = RetryTransport(
        httpx.MockTransport(handler), HttpConfig(MaxRetries=5), sleep=no_sleep
    )
    kinds = ("timeout", "transport", "http_5xx")
    before = {k: value("pysoci_registry_errors_total", kind=k) for k in kinds}
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://reg.example/v2/")
    assert response.status_code == 200
    for k in kinds:
        assert value("pysoci_registry_errors_total", kind=k) - before[k] == 1, k


# ----------------------------------------------------------------------------- server


def test_dedicated_registry() -> None:
    names = {m.name for m in metrics.REGISTRY.collect()}
    assert "pysoci_span_fetches" in names and "pysoci_fuse_operations" in names
    default = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("pysoci_") for n in default)


def test_server_over_tcp_serves_metrics_and_stops() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = metrics.start_metrics_server(f"127.0.0.1:{port}")
    try:
        metrics.LAZY_MOUNT_FALLBACKS.labels("no_ztoc").inc()
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200
        assert "pysoci_span_fetches_total" in r.text
        assert 'pysoci_lazy_mount_fallbacks_total{reason="no_ztoc"}' in r.text
        assert "python_gc" not in r.text  # not the default registry
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 404
    finally:
        stop()
    stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_server_over_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    stop = metrics.start_metrics_server(str(path), "unix")
    try:
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport) as client:
            r = client.get("http://localhost/metrics", timeout=10)
        assert r.status_code == 200 and "pysoci_registry_errors_total" in r.text
    finally:
        stop()
    assert not path.exists()


@pytest.mark.parametrize("address", ["localhost", "host:port", "1.2.3.4:99999"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(metrics.MetricsAddressError):
        metrics.start_metrics_server(address)


def test_addresses() -> None:
    assert metrics.parse_address("127.0.0.1:9101") == (socket.AF_INET, ("127.0.0.1", 9101))
    assert metrics.parse_address("[::1]:9101") == (socket.AF_INET6, ("::1", 9101))
    assert metrics.parse_address(":9101") == (socket.AF_INET, ("", 9101))
    assert metrics.parse_address("/run/m.sock") == (socket.AF_UNIX, "/run/m.sock")
    assert metrics.parse_address("unix:///run/m.sock") == (socket.AF_UNIX, "/run/m.sock")
    assert metrics.parse_address("m.sock", "unix") == (socket.AF_UNIX, "m.sock")
    with pytest.raises(metrics.MetricsAddressError):
        metrics.parse_address("127.0.0.1:1", "udp")
