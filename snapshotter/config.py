"""pysoci's configuration: TOML → typed config. Every default lives here.

Keys follow soci-snapshotter's sections and names wherever the feature exists, so an
existing soci `config.toml` keeps working. Unknown keys are reported (logged and returned by
`load_config`), never silently ignored; keys of the wrong type are an error.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.errors import FormatError
from snapshotter.fetch.config import FetchConfig
from snapshotter.freespace import FreeSpaceReserve
from snapshotter.soci.ztoc import DEFAULT_MAX_ENTRIES

if TYPE_CHECKING:
    from snapshotter.content.unpack import UnpackBounds

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/pysoci/config.toml")
DEFAULT_ROOT = Path("/var/lib/pysoci")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")


class ConfigError(FormatError):
    """The configuration file is malformed or has a value of the wrong type."""


@dataclass(frozen=True)
class HttpConfig:
    """`[http]`: timeouts and retries of every registry request (soci's names and defaults)."""

    DialTimeoutMsec: int = 3000
    ResponseHeaderTimeoutMsec: int = 3000
    RequestTimeoutMsec: int = 300_000
    MaxRetries: int = 8
    MinWaitMsec: int = 30
    MaxWaitMsec: int = 300_000


@dataclass(frozen=True)
class MirrorConfig:
    """One `[[resolver.host."<registry>".mirrors]]` entry."""

    host: str
    insecure: bool = False
    request_timeout_sec: int = 0
    header: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HostResolverConfig:
    """`[resolver.host."<registry>"]`."""

    mirrors: tuple[MirrorConfig, ...] = ()


@dataclass(frozen=True)
class ResolverConfig:
    """`[resolver]`: mirrors per registry host."""

    host: dict[str, HostResolverConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistryConfig:
    """`[registry]` (pysoci): where containerd-style `hosts.toml` files live, credentials."""

    config_path: str = str(DEFAULT_HOSTS_DIR)
    """Directory of `<host>/hosts.toml` files, as containerd's `config_path`."""
    docker_config: str = ""
    """Directory of Docker's `config.json`; empty: $DOCKER_CONFIG or ~/.docker."""


@dataclass(frozen=True)
class FuseConfig:
    """`[fuse]`: kernel cache lifetimes, seconds. Layers never change, so pysoci caches longer
    than soci's 1 s by default."""

    attr_timeout: int = 60
    entry_timeout: int = 60
    negative_timeout: int = 60
    max_ztoc_entries: int = DEFAULT_MAX_ENTRIES
    """A zTOC listing more entries is not mounted lazily: its layer is unpacked locally
    (pysoci's key). Real layers have 10^4-10^5 entries; a mounted layer costs about 100 B of
    daemon memory per entry plus its names, and a million entries mount in 1-3 s."""
    opaque_xattr: str = "trusted.overlay.opaque"
    """The xattr an opaque directory (`.wh..wh..opq`) answers: "trusted.overlay.opaque", or
    "user.overlay.opaque" when the overlays over the layers are mounted with `userxattr`
    (pysoci's key: soci has none, it picks the user one when containerd's overlay would)."""

    def __post_init__(self) -> None:
        if self.max_ztoc_entries < 1:
            raise ConfigError(
                f"fuse.max_ztoc_entries: must be positive, got {self.max_ztoc_entries}"
            )
        if self.opaque_xattr not in OPAQUE_XATTRS:
            raise ConfigError(
                f"fuse.opaque_xattr: expected one of {', '.join(OPAQUE_XATTRS)}, "
                f"got {self.opaque_xattr!r}"
            )


OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
"""The xattrs overlayfs reads an opaque directory from (without and with `userxattr`)."""


@dataclass(frozen=True)
class BackgroundFetchConfig:
    """`[background_fetch]` (soci's keys)."""

    disable: bool = False
    silence_period_msec: int = 30_000
    """Quiet time after the last foreground fetch (or a mount) before filling layers."""
    fetch_period_msec: int = 500
    """Idle re-scan period (soci throttles to a span per period; pysoci uses `[fetch]
    background_rate_limit` instead)."""
    max_queue_size: int = 300


@dataclass(frozen=True)
class BlobConfig:
    """`[blob]` (soci's keys)."""

    valid_interval: int = 60
    """Seconds a blob's redirected (object storage) URL is reused before the registry is asked
    again; 0: ask the registry every time."""
    fetching_timeout_sec: int = 300
    max_span_verification_retries: int = 1
    force_single_range_mode: bool = False


@dataclass(frozen=True)
class CacheConfig:
    """`[cache]` (pysoci): bounds of the span caches."""

    max_bytes: int = 20 << 30
    """Disk cache of compressed spans under ROOT/cache, across layers (unmounted layers are
    evicted least recently used first)."""
    memory_bytes: int = 256 << 20
    """In-memory cache of decompressed spans, across layers."""
    keep_inflated: bool = True
    """Keep decompressed gzip spans on disk too, within max_bytes: once a layer is complete,
    the background fetcher inflates it, and later reads of any of its files inflate nothing."""
    min_free_bytes: int = 1 << 30
    min_free_percent: int = 10
    """The free-space reserve of ROOT's filesystem, the larger of the two (pysoci's keys: soci
    has none). The span cache stops growing and evicts unused layers before it would eat into
    it (background fetching pauses; what containers read is served without being kept), and
    local unpacks stop at half of it (a pull may use what the cache of running images left).
    10 % is where kubelet's default image GC (85 % used) has long started removing images;
    1 GiB keeps small disks out of trouble."""

    def __post_init__(self) -> None:
        if self.min_free_percent > 100:
            raise ConfigError(f"cache.min_free_percent: at most 100, got {self.min_free_percent}")


@dataclass(frozen=True)
class UnpackConfig:
    """`[unpack]` (pysoci): what a layer pysoci unpacks itself (no zTOC) may take on disk."""

    max_expansion_ratio: int = 100
    """At most this many times the layer's compressed size (0: no bound): real layers expand
    2-5x (this project's benchmark images: 2.4x and 3.1x), gzip at most ~1030x, so a bomb is
    stopped at a tenth of what gzip allows and a real layer has a margin of 20x or more.
    Counted: blocks of file data allocated (holes of sparse files are free) plus 512 bytes per
    other entry."""
    expansion_floor_bytes: int = 1 << 30
    """... but never less than this, so that small layers with a few zero-filled files pass."""


@dataclass(frozen=True)
class FetchTuningConfig:
    """`[fetch]` (pysoci): how spans are requested."""

    max_request_bytes: int = 16 << 20
    readahead_spans: int = 2
    background_connections: int = 4
    background_request_bytes: int = 8 << 20
    background_rate_limit: int = 0
    """Bytes per second for the whole daemon's background fetching; 0: unlimited."""
    background_preempt: bool = True
    miss_readahead_spans: int = 2
    """Spans loaded ahead of a reader whose network misses walk forward through the layer
    (the next span missed lies just after the previous one); 0: only what is read."""
    stream_inflate: bool = True
    """Inflate a span while it downloads (served only once its digest checked); false:
    after it arrived."""
    prefetch_connections: int = 6
    """Range requests in flight at once for prefetching (a layer's prefetch artifact or its
    recorded start), for the whole data plane; they pause while a read waits."""
    prefetch_request_bytes: int = 4 << 20
    """Most compressed bytes in one prefetch request (at least one span): small, so that a
    read that starts waiting is not queued behind much."""


@dataclass(frozen=True)
class PrefetchConfig:
    """`[prefetch]`: fetching a layer's known start at its mount, and recording starts."""

    enable: bool = True
    """Fetch the spans of a layer's SOCI prefetch artifact at once when it is mounted (soci's
    key; soci's default is false: pysoci fetches them without holding up the mount)."""
    use_recordings: bool = True
    """Fetch the spans this node recorded for the same image and layer instead (pysoci's)."""
    record: bool = True
    """Record which spans and files containers read, per image manifest and layer, under
    ROOT/prefetch (pysoci's keys from here on)."""
    quiet_period_sec: int = 10
    """A recording ends once nothing new was read for this long: longer than the pauses
    inside a start (interpreter start, imports, library and device initialisation), short of
    what a notebook waiting for its user or a job in its main loop leaves."""
    max_record_sec: int = 300
    """... or this long after the layer's first read, however busy it is."""
    max_spans_per_layer: int = 65536
    max_files_per_layer: int = 20000
    """File names kept per layer (later files' spans are still recorded)."""
    max_images: int = 100
    """Recorded images kept; past it, or past max_bytes, the least recently updated go."""
    max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.quiet_period_sec < 1 or self.max_record_sec < 1:
            raise ConfigError("prefetch: quiet_period_sec and max_record_sec must be positive")
        if self.max_spans_per_layer < 1 or self.max_images < 1 or self.max_bytes < 4096:
            raise ConfigError(
                "prefetch: max_spans_per_layer and max_images must be positive, max_bytes at "
                "least 4096"
            )


@dataclass(frozen=True)
class PullModeConfig:
    """`[pull_modes.soci_v1]` / `[pull_modes.soci_v2]` / `[pull_modes.local_store]`."""

    enable: bool = True


@dataclass(frozen=True)
class PullModesConfig:
    """`[pull_modes]`: which ways of finding an image's SOCI index are used."""

    soci_v1: PullModeConfig = field(default_factory=lambda: PullModeConfig(enable=True))
    """soci's default is off; pysoci turns it on because `pysoci create/push` make v1 indexes."""
    soci_v2: PullModeConfig = field(default_factory=PullModeConfig)
    local_store: PullModeConfig = field(default_factory=PullModeConfig)
    """v1 indexes in ROOT/content (`pysoci create`), looked up with soci_v1 on (a pysoci
    key: soci has no local store)."""


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    metrics_address: str = ""
    """Where `/metrics` is served (soci's key): `HOST:PORT`, or a socket path when
    `metrics_network` is "unix"; empty: no metrics server."""
    metrics_network: str = "tcp"
    """"tcp" or "unix" (soci's key)."""
    log_format: str = "json"
    """The daemon's log lines on stderr: "json" (one object per line, like soci) or "text"."""
    http: HttpConfig = field(default_factory=HttpConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    blob: BlobConfig = field(default_factory=BlobConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    unpack: UnpackConfig = field(default_factory=UnpackConfig)
    fetch: FetchTuningConfig = field(default_factory=FetchTuningConfig)
    pull_modes: PullModesConfig = field(default_factory=PullModesConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    def __post_init__(self) -> None:
        if self.metrics_network not in ("tcp", "unix"):
            raise ConfigError(
                f"metrics_network: expected tcp or unix, got {self.metrics_network!r}"
            )
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format: expected json or text, got {self.log_format!r}")


def _typed(value: Any, want: Any, where: str) -> Any:
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return value
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if want == dict[str, str]:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of strings")
        return dict(value)
    raise AssertionError(f"unhandled config type {want}")


def _section(cls: type[Any], raw: Any, where: str, unknown: list[str]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        f = fields.get(key)
        if f is None:
            unknown.append(path)
            continue
        kwargs[key] = _value(cls, key, f.type, value, path, unknown)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where or 'config'}: {e}") from e


_SECTIONS: dict[str, type[Any]] = {}


def _value(
    cls: type[Any], key: str, type_name: Any, value: Any, path: str, unknown: list[str]
) -> Any:
    if (cls, key) == (ResolverConfig, "host"):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of hosts")
        return {
            h: _section(HostResolverConfig, v, f'{path}."{h}"', unknown) for h, v in value.items()
        }
    if (cls, key) == (HostResolverConfig, "mirrors"):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected an array of tables ([[...mirrors]])")
        return tuple(
            _section(MirrorConfig, m, f"{path}[{i}]", unknown) for i, m in enumerate(value)
        )
    if not _SECTIONS:
        _SECTIONS.update(
            {
                c.__name__: c
                for c in globals().values()
                if dataclasses.is_dataclass(c) and isinstance(c, type)
            }
        )
    section = _SECTIONS.get(type_name)
    if section is not None:
        return _section(section, value, path, unknown)
    resolved = {"int": int, "bool": bool, "str": str, "dict[str, str]": dict[str, str]}[type_name]
    return _typed(value, resolved, path)


def parse_config(text: str) -> tuple[Config, list[str]]:
    """Parse TOML text; returns the config and the dotted paths of unknown keys."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config is not valid TOML: {e}") from e
    unknown: list[str] = []
    config = _section(Config, raw, "", unknown)
    return config, unknown


def load_config(path: Path | None = None) -> tuple[Config, list[str]]:
    """Load the config file (defaults when `path` is None or the default file is absent)."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config(), []
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    config, unknown = parse_config(text)
    for key in unknown:
        log.warning("config %s: unknown key %s (ignored)", path, key)
    return config, unknown


def fetch_config(config: Config | None = None, **overrides: Any) -> FetchConfig:
    """The span fetching settings, gathered from their sections (of the defaults when `config`
    is None), with `overrides` by FetchConfig field name (tests, benchmarks)."""
    config = config if config is not None else Config()
    bg, blob, tune = config.background_fetch, config.blob, config.fetch
    settings = FetchConfig(
        disable=bg.disable,
        silence_period_msec=bg.silence_period_msec,
        fetch_period_msec=bg.fetch_period_msec,
        max_queue_size=bg.max_queue_size,
        fetching_timeout_sec=blob.fetching_timeout_sec,
        max_span_verification_retries=blob.max_span_verification_retries,
        force_single_range_mode=blob.force_single_range_mode,
        cache_max_bytes=config.cache.max_bytes,
        memory_cache_bytes=config.cache.memory_bytes,
        keep_inflated=config.cache.keep_inflated,
        max_request_bytes=tune.max_request_bytes,
        readahead_spans=tune.readahead_spans,
        background_connections=tune.background_connections,
        background_request_bytes=tune.background_request_bytes,
        background_rate_limit=tune.background_rate_limit,
        background_preempt=tune.background_preempt,
        miss_readahead_spans=tune.miss_readahead_spans,
        stream_inflate=tune.stream_inflate,
        prefetch_connections=tune.prefetch_connections,
        prefetch_request_bytes=tune.prefetch_request_bytes,
    )
    return dataclasses.replace(settings, **overrides) if overrides else settings


def free_space_reserve(config: Config | None = None) -> FreeSpaceReserve:
    """The free-space reserve of ROOT's filesystem (`[cache] min_free_*`)."""
    cache = (config or Config()).cache
    return FreeSpaceReserve(cache.min_free_bytes, cache.min_free_percent)


def unpack_bounds(config: Config | None = None) -> UnpackBounds:
    """What a locally unpacked layer may take (`[unpack]`, and the free-space reserve)."""
    from snapshotter.content.unpack import UnpackBounds  # keeps the config import light

    config = config or Config()
    cache = config.cache
    return UnpackBounds(
        config.unpack.max_expansion_ratio,
        config.unpack.expansion_floor_bytes,
        # Half the reserve: a pull may use what the span cache of running images left.
        FreeSpaceReserve(cache.min_free_bytes, cache.min_free_percent, divisor=2),
    )
