"""Settings of span fetching, as the fetch layer sees them.

`snapshotter.config.fetch_config` builds them from the config file's `[background_fetch]`,
`[blob]`, `[cache]` and `[fetch]` sections, where every default lives: this type has none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Fetching knobs; soci's key names where the feature exists, pysoci's own otherwise."""

    # [background_fetch] (soci)
    disable: bool
    """Turn the background fetcher off."""
    silence_period_msec: int
    """Quiet time after the last foreground fetch (or a mount) before background fetching."""
    fetch_period_msec: int
    """soci throttles to one span per period; pysoci uses it only as the idle re-scan period
    and throttles with `background_rate_limit` instead."""
    max_queue_size: int
    """Most layers the background fetcher tracks at once (later ones wait their turn)."""

    # [blob] (soci)
    fetching_timeout_sec: int
    """Bound on one ranged fetch, retries included."""
    max_span_verification_retries: int
    """Refetches of a span whose bytes do not match its zTOC digest before EIO."""
    force_single_range_mode: bool
    """Never ask the source for several ranges in one request."""

    # pysoci
    cache_max_bytes: int
    """Bound on the disk cache (compressed and decompressed spans), across layers."""
    keep_inflated: bool
    """Once a gzip layer is complete, keep its spans decompressed on disk too, within
    `cache_max_bytes` (written by the background fetcher, never evicting anything)."""
    memory_cache_bytes: int
    """Bound on the in-memory cache of decompressed spans, across layers."""
    max_request_bytes: int
    """Most compressed bytes a foreground request coalesces (at least one span)."""
    readahead_spans: int
    """Spans fetched ahead of a sequential reader."""
    background_connections: int
    """Concurrent background requests for the whole daemon."""
    background_request_bytes: int
    """Most compressed bytes in one background request (at least one span)."""
    background_rate_limit: int
    """Background bytes per second for the whole daemon; 0 means unlimited."""
    background_preempt: bool
    """Cancel in-flight background requests when a foreground read starts waiting."""
    miss_readahead_spans: int
    """Spans loaded ahead of a reader whose network misses walk forward."""
    stream_inflate: bool
    """Inflate a fetched span while its bytes arrive (a foreground read of one run)."""
    prefetch_connections: int
    """Prefetch requests in flight at once, for the whole data plane."""
    prefetch_request_bytes: int
    """Most compressed bytes in one prefetch request (at least one span)."""
