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
from typing import Any

from snapshotter.errors import FormatError

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
class Config:
    """The whole configuration."""

    http: HttpConfig = field(default_factory=HttpConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


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


def _value(
    cls: type[Any], key: str, type_name: Any, value: Any, path: str, unknown: list[str]
) -> Any:
    hints = {
        (ResolverConfig, "host"): "hosts",
        (HostResolverConfig, "mirrors"): "mirrors",
        (Config, "http"): HttpConfig,
        (Config, "resolver"): ResolverConfig,
        (Config, "registry"): RegistryConfig,
    }
    special = hints.get((cls, key))
    if special == "hosts":
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of hosts")
        return {
            h: _section(HostResolverConfig, v, f'{path}."{h}"', unknown) for h, v in value.items()
        }
    if special == "mirrors":
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected an array of tables ([[...mirrors]])")
        return tuple(
            _section(MirrorConfig, m, f"{path}[{i}]", unknown) for i, m in enumerate(value)
        )
    if isinstance(special, type):
        return _section(special, value, path, unknown)
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
