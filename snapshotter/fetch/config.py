"""Settings of span fetching, as the fetch layer sees them (`snapshotter.config.fetch_config`
builds them from the config file's `[background_fetch]`, `[blob]`, `[cache]` and `[fetch]`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Fetching knobs; soci's key names where the feature exists, pysoci's own otherwise."""

    # [background_fetch] (soci)
    disable: bool = False
    """Turn the background fetcher off."""
    silence_period_msec: int = 30_000
    """Quiet time after the last foreground fetch (or a mount) before background fetching."""
    fetch_period_msec: int = 500
    """soci throttles to one span per period; pysoci uses it only as the idle re-scan period
    and throttles with `background_rate_limit` instead."""
    max_queue_size: int = 300
    """Most layers the background fetcher tracks at once (later ones wait their turn)."""

    # [blob] (soci)
    fetching_timeout_sec: int = 300
    """Bound on one ranged fetch, retries included."""
    max_span_verification_retries: int = 1
    """Refetches of a span whose bytes do not match its zTOC digest before EIO."""
    force_single_range_mode: bool = False
    """Never ask the source for several ranges in one request."""

    # pysoci
    cache_max_bytes: int = 20 << 30
    """Bound on the disk cache (compressed and decompressed spans), across layers."""
    keep_inflated: bool = True
    """Once a gzip layer is complete, keep its spans decompressed on disk too, within
    `cache_max_bytes` (written by the background fetcher, never evicting anything)."""
    memory_cache_bytes: int = 256 << 20
    """Bound on the in-memory cache of decompressed spans, across layers."""
    max_request_bytes: int = 16 << 20
    """Most compressed bytes a foreground request coalesces (at least one span)."""
    readahead_spans: int = 2
    """Spans fetched ahead of a sequential reader."""
    background_connections: int = 4
    """Concurrent background requests for the whole daemon."""
    background_request_bytes: int = 8 << 20
    """Most compressed bytes in one background request (at least one span)."""
    background_rate_limit: int = 0
    """Background bytes per second for the whole daemon; 0 means unlimited."""
    background_preempt: bool = True
    """Cancel in-flight background requests when a foreground read starts waiting."""
