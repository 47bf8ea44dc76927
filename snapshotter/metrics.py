"""Prometheus metrics of the daemon, in one dedicated registry (`REGISTRY`), served at `/metrics`.

Instrumented code calls the module-level metrics directly (they are thread-safe); per-layer
gauges come from the live span managers at scrape time (`LAYERS`), so a layer's series
disappear when it is unmounted and cardinality stays bounded by the mounted layers.

    stop = start_metrics_server("127.0.0.1:9101")   # or a unix socket path
    ...
    stop()
"""

from __future__ import annotations

import errno as errno_names
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from snapshotter.errors import PysociError

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
"""Every pysoci metric; never the prometheus_client default registry."""

ON_DEMAND = "on_demand"
BACKGROUND = "background"
PREFETCH = "prefetch"

SPAN_FETCHES = Counter(
    "pysoci_span_fetches_total",
    "Range requests for compressed spans, by kind (on_demand: a read waits; prefetch: a "
    "recorded or published start; background).",
    ["kind"],
    registry=REGISTRY,
)
SPAN_FETCH_BYTES = Counter(
    "pysoci_span_fetch_bytes_total",
    "Compressed span bytes received from registries, by kind.",
    ["kind"],
    registry=REGISTRY,
)
SPAN_FETCH_SECONDS = Histogram(
    "pysoci_span_fetch_duration_seconds",
    "Latency of one span range request (all its ranges), by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
CACHE_HITS = Counter(
    "pysoci_cache_hits_total",
    "Span lookups served by a cache (memory: decompressed spans; disk: compressed spans).",
    ["cache"],
    registry=REGISTRY,
)
CACHE_MISSES = Counter(
    "pysoci_cache_misses_total",
    "Span lookups a cache could not serve (disk misses go to the registry).",
    ["cache"],
    registry=REGISTRY,
)
BACKGROUND_PREEMPTIONS = Counter(
    "pysoci_background_preemptions_total",
    "Background requests cancelled because a read started waiting on the network.",
    registry=REGISTRY,
)
LAYER_VERIFICATIONS = Counter(
    "pysoci_layer_verifications_total",
    "Whole-layer digest checks of completely fetched layers, by result (ok, mismatch).",
    ["result"],
    registry=REGISTRY,
)
FUSE_OPERATIONS = Counter(
    "pysoci_fuse_operations_total",
    "FUSE requests handled, by operation.",
    ["operation"],
    registry=REGISTRY,
)
FUSE_FAILURES = Counter(
    "pysoci_fuse_operation_failures_total",
    "FUSE requests answered with an error, by operation and errno name.",
    ["operation", "errno"],
    registry=REGISTRY,
)
LAYERS_REJECTED = Counter(
    "pysoci_layers_rejected_total",
    "Lazy layers whose zTOC was proven to lie (a checkpoint window, the uncompressed size or "
    "the diff ID did not match the layer), by the check that found it (foreground: a read's "
    "spans; background: the pass over the complete layer).",
    ["stage"],
    registry=REGISTRY,
)
LAZY_MOUNT_FALLBACKS = Counter(
    "pysoci_lazy_mount_fallbacks_total",
    "Layers of indexed images unpacked locally instead of served lazily, by reason "
    "(no_ztoc, mount_failed, ztoc_rejected).",
    ["reason"],
    registry=REGISTRY,
)
REGISTRY_ERRORS = Counter(
    "pysoci_registry_errors_total",
    "Failed registry exchanges (each failed attempt), by kind: http_4xx, http_5xx, timeout, "
    "transport, tls, digest_mismatch.",
    ["kind"],
    registry=REGISTRY,
)

for _kind in (ON_DEMAND, PREFETCH, BACKGROUND):
    SPAN_FETCHES.labels(_kind)
    SPAN_FETCH_BYTES.labels(_kind)
    SPAN_FETCH_SECONDS.labels(_kind)
MEMORY_HITS = CACHE_HITS.labels("memory")
MEMORY_MISSES = CACHE_MISSES.labels("memory")
DISK_HITS = CACHE_HITS.labels("disk")
DISK_MISSES = CACHE_MISSES.labels("disk")


def errno_name(code: int) -> str:
    """`2` → `ENOENT` (a bounded label value)."""
    return errno_names.errorcode.get(code, "other")


def registry_error(kind: str) -> None:
    """Count one failed registry exchange of `kind`."""
    REGISTRY_ERRORS.labels(kind).inc()


def http_status_kind(status: int) -> str:
    """`404` → `http_4xx`."""
    return f"http_{status // 100}xx" if 100 <= status <= 599 else "http_other"


def transport_error_kind(exc: BaseException) -> str:
    """`timeout` for httpx timeouts, else `transport`."""
    return "timeout" if isinstance(exc, httpx.TimeoutException | TimeoutError) else "transport"


class LayerProgress(Protocol):
    """What the per-layer gauges read from a mounted layer's span manager."""

    digest: str

    @property
    def fetched_bytes(self) -> int:
        """Compressed bytes verified on disk."""
        ...

    @property
    def total_bytes(self) -> int:
        """Compressed size of the layer."""
        ...


class LayerGauges(Collector):
    """Per-layer fetched/total bytes of the live layers (registered while they run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, LayerProgress] = {}

    def track(self, layer: LayerProgress) -> None:
        """Report `layer` until `untrack`."""
        with self._lock:
            self._layers[id(layer)] = layer

    def untrack(self, layer: LayerProgress) -> None:
        """Stop reporting `layer` (its series disappear at the next scrape)."""
        with self._lock:
            self._layers.pop(id(layer), None)

    def collect(self) -> Iterable[Metric]:
        """The gauges, one series per layer digest."""
        with self._lock:
            layers = list(self._layers.values())
        by_digest: dict[str, tuple[int, int]] = {}
        for layer in layers:
            fetched, total = layer.fetched_bytes, layer.total_bytes
            old = by_digest.get(layer.digest)
            by_digest[layer.digest] = (max(fetched, old[0]) if old else fetched, total)
        fetched_g = GaugeMetricFamily(
            "pysoci_layer_fetched_bytes",
            "Compressed bytes of a mounted layer fetched and verified.",
            labels=["layer"],
        )
        total_g = GaugeMetricFamily(
            "pysoci_layer_total_bytes",
            "Compressed size of a mounted layer.",
            labels=["layer"],
        )
        for digest, (fetched, total) in sorted(by_digest.items()):
            fetched_g.add_metric([digest], fetched)
            total_g.add_metric([digest], total)
        mounted = GaugeMetricFamily(
            "pysoci_layers_mounted", "Layers served lazily.", value=len(by_digest)
        )
        return [fetched_g, total_g, mounted]

    def describe(self) -> Iterable[Metric]:
        """Names only (avoids a collect at registration)."""
        return [
            GaugeMetricFamily("pysoci_layer_fetched_bytes", "", labels=["layer"]),
            GaugeMetricFamily("pysoci_layer_total_bytes", "", labels=["layer"]),
            GaugeMetricFamily("pysoci_layers_mounted", ""),
        ]


LAYERS = LayerGauges()
REGISTRY.register(LAYERS)


def exposition() -> str:
    """This process's metrics in Prometheus' text format."""
    return generate_latest(REGISTRY).decode()


class MergedCollector(Collector):
    """This process's metrics and another process's (the data plane's, as exposition text)
    as one set: samples of equal name and labels are summed (a counter both processes keep,
    such as registry errors, is their total). `pysoci_data_plane_up` says whether the other
    process answered."""

    def __init__(self, local: CollectorRegistry, remote: Callable[[], str]) -> None:
        self._local = local
        self._remote = remote

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}

        def add(family: Metric) -> None:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # creation times do not add up
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                sums[key] = sums.get(key, 0.0) + sample.value

        for family in self._local.collect():
            add(family)
        up = 1
        try:
            text = self._remote()
            for family in text_string_to_metric_families(text):
                add(family)
        except Exception as e:  # the control plane's metrics must not fail with it
            log.debug("the data plane's metrics are unavailable: %s", e)
            up = 0
        for (name, sample_name, labels), value in sums.items():
            families[name].add_sample(sample_name, dict(labels), value)
        yield from families.values()
        yield GaugeMetricFamily(
            "pysoci_data_plane_up", "Whether the data plane answered this scrape.", value=up
        )

    def describe(self) -> Iterable[Metric]:
        """Nothing: collecting asks another process."""
        return []


def merged_registry(remote: Callable[[], str]) -> CollectorRegistry:
    """A registry serving REGISTRY merged with `remote` (see MergedCollector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(REGISTRY, remote))
    return registry


# --------------------------------------------------------------------------- the server


class MetricsAddressError(PysociError):
    """`metrics_address` cannot be parsed or bound."""


def parse_address(address: str, network: str = "tcp") -> tuple[socket.AddressFamily, Any]:
    """`host:port`, `[v6]:port` or (network unix, `unix://PATH`, `/PATH`) a socket path."""
    if address.startswith("unix://"):
        return socket.AF_UNIX, address.removeprefix("unix://")
    if network == "unix" or address.startswith("/"):
        return socket.AF_UNIX, address
    if network != "tcp":
        raise MetricsAddressError(f"metrics_network {network!r}: expected tcp or unix")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise MetricsAddressError(f"metrics_address {address!r}: expected HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        if not self.client_address:  # a unix socket peer has no address; wsgiref wants one
            self.client_address = ("unix", 0)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "localhost", 0
            self.setup_environ()
        else:
            super().server_bind()


def _server(family: socket.AddressFamily, addr: Any, registry: CollectorRegistry) -> _Server:
    server_cls = type("MetricsServer", (_Server,), {"address_family": family})
    if family == socket.AF_UNIX:
        with suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(addr).st_mode):
                os.unlink(addr)  # left by an earlier run
    try:
        server: _Server = server_cls(addr, _Handler)
    except OSError as e:
        raise MetricsAddressError(f"cannot serve metrics on {addr}: {e.strerror or e}") from e
    app = make_wsgi_app(registry)

    def only_metrics(environ: dict[str, Any], start: Callable[..., Any]) -> Iterator[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/metrics", "/metrics/"):
            start("404 Not Found", [("Content-Type", "text/plain")])
            return iter([b"not found: try /metrics\n"])
        return iter(app(environ, start))

    server.set_app(only_metrics)
    return server


def start_metrics_server(
    address: str, network: str = "tcp", registry: CollectorRegistry | None = None
) -> Callable[[], None]:
    """Serve `/metrics` (of `registry`, REGISTRY by default) on `address` from a daemon
    thread; returns the function that stops it."""
    family, addr = parse_address(address, network)
    server = _server(family, addr, registry if registry is not None else REGISTRY)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics served at http://%s/metrics", address if family != socket.AF_UNIX else addr)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        server.shutdown()
        server.server_close()
        thread.join(5)
        if family == socket.AF_UNIX:
            with suppress(OSError):
                os.unlink(addr)

    return stop
