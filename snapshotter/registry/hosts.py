"""Where to send a registry's requests: mirrors, schemes, TLS and headers per host.

Two sources, both optional:

* containerd's `hosts.toml`: `<registry.config_path>/<host>/hosts.toml` (a port stays in the
  directory name, `127.0.0.1:5000`), else `<config_path>/_default/hosts.toml`. Keys read: `server`,
  `capabilities`, `skip_verify`, `ca` (a path or a list), `client` (a path, a list of paths, or a
  list of `[cert, key]` pairs; an empty key means the key is in the cert file), `header`,
  `override_path`, and `[host."<url>"]` tables with the same keys (tried in file order). Relative
  paths are relative to the file's directory.
* without a hosts.toml, a Docker-style `<config_path>/<host>/` directory: `*.crt` CA files,
  `<name>.cert` + `<name>.key` client certificates (as containerd reads it).
* soci's `[[resolver.host."<registry>".mirrors]]` (`host`, `insecure`, `header`,
  `request_timeout_sec`); these mirrors have the pull and resolve capabilities.

Order of endpoints: hosts.toml mirrors, then resolver mirrors, then the registry itself (or the
hosts.toml `server`). Schemes: a URL's own scheme wins; a bare host is `https://`, except a
resolver mirror with `insecure = true` (`http://`). The registry itself is `https://` unless
`plain_http=True`, `server` says `http://`, or it is on the loopback (`localhost`, `127.0.0.0/8`,
`[::1]`, any port: plain HTTP, as containerd's `docker.MatchLocalhost`, soci and stargz treat
it) with no TLS setting for it (a CA, a client certificate, `skip_verify` in its hosts.toml or
`skip_verify=True`); `docker.io` is served by
`https://registry-1.docker.io`. `skip_verify=True` disables certificate checks for the registry
itself only (like `plain_http`); mirrors keep their own settings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from snapshotter.config import Config, ConfigError, MirrorConfig

log = logging.getLogger(__name__)

CAPABILITIES = frozenset({"pull", "resolve", "push"})
MIRROR_CAPABILITIES = frozenset({"pull", "resolve"})
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"
DEFAULT_DIR = "_default"

_KNOWN_KEYS = frozenset(
    {"server", "capabilities", "skip_verify", "ca", "client", "header", "override_path", "host"}
)


@dataclass(frozen=True)
class Endpoint:
    """One place a registry's API can be reached.

    `verify` already carries the CA and the client certificate (httpx deprecates `cert=`), so
    `httpx.AsyncClient(verify=endpoint.verify)` is all a client needs; `cert` says which files.
    """

    url: str
    """Scheme and authority, no path: `https://127.0.0.1:5000`."""
    path_prefix: str
    """`/v2`, or the server's path as given when `override_path` is set."""
    capabilities: frozenset[str]
    verify: ssl.SSLContext | bool
    cert: tuple[str, str] | None
    headers: Mapping[str, str]
    mirror: bool
    request_timeout: float | None = None
    """Per-request timeout in seconds for this endpoint (resolver `request_timeout_sec`)."""

    @property
    def host(self) -> str:
        """The authority (`host[:port]`) of `url`."""
        return self.url.split("://", 1)[1]


@dataclass(frozen=True)
class _HostSettings:
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    override_path: bool = False


def canonical_registry(registry: str) -> str:
    """The name a registry's configuration is filed under (`index.docker.io` → `docker.io`)."""
    registry = registry.lower()
    return DOCKER_HUB if registry == "index.docker.io" else registry


class RegistryHosts:
    """Endpoints per registry and capability, from `hosts.toml` files and the pysoci config."""

    def __init__(
        self, config: Config | None = None, *, plain_http: bool = False, skip_verify: bool = False
    ) -> None:
        self._config = config if config is not None else Config()
        self._plain_http = plain_http
        self._skip_verify = skip_verify
        self._cache: dict[str, list[Endpoint]] = {}
        self._contexts: dict[tuple[Any, ...], ssl.SSLContext | bool] = {}

    def endpoints(self, registry: str, capability: str) -> list[Endpoint]:
        """Endpoints of `registry` that can do `capability`, in the order to try them."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown registry capability {capability!r}")
        registry = canonical_registry(registry)
        return [e for e in self._all(registry) if capability in e.capabilities]

    def verify_for(self, host: str, challenger: str | None = None) -> ssl.SSLContext | bool:
        """TLS verification for a token realm on `host`, named by a challenge of `challenger`.

        Both are `host[:port]`. The realm host's own configuration wins when it has one (a
        `<config_path>/<host>/` directory); otherwise the realm is reached with the TLS settings
        of the endpoint that sent the challenge (containerd fetches tokens with the registry
        host's client too), so a registry's CA, client certificate or `skip_verify` also
        cover its token server; otherwise the defaults (with this object's `skip_verify`).
        """
        own_dir = Path(self._config.registry.config_path) / canonical_registry(host)
        if challenger is not None and not own_dir.is_dir():
            verify = self._endpoint_verify(challenger)
            if verify is not None:
                return verify
        for endpoint in self._all(host):
            if not endpoint.mirror:
                return endpoint.verify
        return True

    def _endpoint_verify(self, authority: str) -> ssl.SSLContext | bool | None:
        """The TLS verification of the HTTPS endpoint at `authority`: one already in use, else
        the registry of that name's own."""
        wanted = _authority_key("https", authority)

        def find(endpoints: list[Endpoint]) -> ssl.SSLContext | bool | None:
            for endpoint in endpoints:
                scheme, netloc = endpoint.url.split("://", 1)
                if scheme == "https" and _authority_key(scheme, netloc) == wanted:
                    return endpoint.verify
            return None

        for endpoints in list(self._cache.values()):
            found = find(endpoints)
            if found is not None:
                return found
        return find(self._all(authority))

    def _all(self, registry: str) -> list[Endpoint]:
        registry = canonical_registry(registry)
        if registry not in self._cache:
            self._cache[registry] = self._build(registry)
        return self._cache[registry]

    def _build(self, registry: str) -> list[Endpoint]:
        result: list[Endpoint] = []
        server: str | None = None
        top = _HostSettings()
        hosts_file = self._hosts_file(registry)
        if hosts_file is not None and hosts_file.name == "hosts.toml":
            server, top, mirrors = _read_hosts_file(hosts_file)
            for url, settings in mirrors:
                result.append(self._endpoint(url, settings, mirror=True, where=hosts_file))
        elif hosts_file is not None:
            top = _docker_certs_dir(hosts_file)
        resolver = self._config.resolver.host.get(registry)
        if resolver is not None:
            result.extend(self._resolver_mirror(m) for m in resolver.mirrors)
        if self._skip_verify:
            top = dataclasses.replace(top, skip_verify=True)
        if server is None:
            plain = self._plain_http or (is_loopback(registry) and not _speaks_tls(top))
            scheme = "http" if plain else "https"
            server = DOCKER_HUB_SERVER if registry == DOCKER_HUB else f"{scheme}://{registry}"
        result.append(self._endpoint(server, top, mirror=False, where=hosts_file))
        return result

    def _hosts_file(self, registry: str) -> Path | None:
        """`<host>/hosts.toml`, else a Docker-style `<host>/` certs dir, else `_default/`."""
        root = Path(self._config.registry.config_path)
        for name in (registry, DEFAULT_DIR):
            path = root / name / "hosts.toml"
            if path.is_file():
                return path
            if name != DEFAULT_DIR and path.parent.is_dir():
                return path.parent
        return None

    def _resolver_mirror(self, mirror: MirrorConfig) -> Endpoint:
        url = mirror.host
        if "://" not in url:
            url = ("http://" if mirror.insecure else "https://") + url
        settings = _HostSettings(capabilities=MIRROR_CAPABILITIES, headers=dict(mirror.header))
        endpoint = self._endpoint(url, settings, mirror=True, where=None)
        if mirror.request_timeout_sec:
            endpoint = Endpoint(
                endpoint.url,
                endpoint.path_prefix,
                endpoint.capabilities,
                endpoint.verify,
                endpoint.cert,
                endpoint.headers,
                endpoint.mirror,
                float(mirror.request_timeout_sec),
            )
        return endpoint

    def _endpoint(
        self, url: str, settings: _HostSettings, *, mirror: bool, where: Path | None
    ) -> Endpoint:
        source = str(where) if where is not None else "[resolver] mirrors"
        scheme, authority, path = _split_url(url, source)
        if settings.override_path:
            prefix = path.rstrip("/") or "/"
        else:
            prefix = path.rstrip("/")
            if not prefix.endswith("/v2"):
                prefix += "/v2"
        cert = settings.client[0] if settings.client else None
        if len(settings.client) > 1:
            log.warning("%s: only the first client certificate of %s is used", source, url)
        verify: ssl.SSLContext | bool = True
        if scheme == "https":
            verify = self._tls(settings.skip_verify, settings.ca, cert, source)
        return Endpoint(
            url=f"{scheme}://{authority}",
            path_prefix=prefix,
            capabilities=settings.capabilities,
            verify=verify,
            cert=cert,
            headers=dict(settings.headers),
            mirror=mirror,
        )

    def _tls(
        self,
        skip_verify: bool,
        ca: tuple[str, ...],
        cert: tuple[str, str] | None,
        source: str,
    ) -> ssl.SSLContext | bool:
        if not ca and cert is None:
            return not skip_verify
        key = (skip_verify, ca, cert)
        cached = self._contexts.get(key)
        if cached is not None:
            return cached
        context = ssl.create_default_context()
        if skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        for path in ca:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"{source}: cannot load CA certificate {path}: {e}") from e
        if cert is not None:
            try:
                context.load_cert_chain(cert[0], cert[1] or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"{source}: cannot load client certificate {cert[0]}: {e}") from e
        self._contexts[key] = context
        return context


def _speaks_tls(settings: _HostSettings) -> bool:
    """Whether a host's settings only make sense over TLS."""
    return bool(settings.ca or settings.client or settings.skip_verify)


def is_loopback(authority: str) -> bool:
    """Whether `host[:port]` names this machine: `localhost`, `127.0.0.0/8` or `[::1]`."""
    host = authority.lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authority_key(scheme: str, authority: str) -> str:
    """`host[:port]` in lower case, without the scheme's default port."""
    authority = authority.lower()
    default = {"http": ":80", "https": ":443"}[scheme]
    return authority.removesuffix(default)


def _docker_certs_dir(directory: Path) -> _HostSettings:
    """Docker's `certs.d/<host>/` layout: `*.crt` CAs, `<name>.cert` + `<name>.key` clients."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot read {directory}: {e.strerror}") from e
    ca = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    client = []
    for name in names:
        if name.endswith(".cert"):
            key = name.removesuffix(".cert") + ".key"
            if key not in names:
                raise ConfigError(f"{directory}: client certificate {name} has no {key}")
            client.append((str(directory / name), str(directory / key)))
    return _HostSettings(ca=ca, client=tuple(client))


def _split_url(url: str, source: str) -> tuple[str, str, str]:
    """(scheme, authority, path) of a host URL; a bare host gets `https`."""
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (validates the port)
    except ValueError as e:
        raise ConfigError(f"{source}: invalid host URL {url!r}: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{source}: host URL {url!r} must be http:// or https://")
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{source}: invalid host URL {url!r}")
    return parts.scheme, parts.netloc.lower(), parts.path


def _read_hosts_file(
    path: Path,
) -> tuple[str | None, _HostSettings, list[tuple[str, _HostSettings]]]:
    """Parse one hosts.toml: (server, its settings, mirrors in file order)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    server = raw.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(f"{path}: server: expected a string")
    top = _settings(raw, path, "")
    hosts = raw.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f'{path}: host: expected tables [host."<url>"]')
    mirrors = []
    for url, table in hosts.items():  # tomllib keeps file order
        where = f'host."{url}".'
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where[:-1]}: expected a table")
        mirrors.append((url, _settings(table, path, where)))
    return server, top, mirrors


def _settings(raw: dict[str, Any], path: Path, where: str) -> _HostSettings:
    for key in raw:
        if key not in _KNOWN_KEYS or (where and key in ("server", "host")):
            log.warning("%s: unknown key %s%s (ignored)", path, where, key)
    base = path.parent

    def resolve(p: str) -> str:
        return str(base / p) if p and not Path(p).is_absolute() else p

    capabilities = CAPABILITIES
    caps = raw.get("capabilities")
    if caps is not None:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ConfigError(f"{path}: {where}capabilities: expected a list of strings")
        unknown = {c.lower() for c in caps} - CAPABILITIES
        if unknown:
            raise ConfigError(f"{path}: {where}capabilities: unknown {sorted(unknown)}")
        capabilities = frozenset(c.lower() for c in caps)
    skip_verify = raw.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise ConfigError(f"{path}: {where}skip_verify: expected true or false")
    override_path = raw.get("override_path", False)
    if not isinstance(override_path, bool):
        raise ConfigError(f"{path}: {where}override_path: expected true or false")

    ca_raw = raw.get("ca", [])
    ca_list = [ca_raw] if isinstance(ca_raw, str) else ca_raw
    if not isinstance(ca_list, list) or not all(isinstance(c, str) for c in ca_list):
        raise ConfigError(f"{path}: {where}ca: expected a path or a list of paths")

    client: list[tuple[str, str]] = []
    client_raw = raw.get("client", [])
    if not isinstance(client_raw, str | list):
        raise ConfigError(f"{path}: {where}client: expected a path or a list")
    for item in [client_raw] if isinstance(client_raw, str) else client_raw:
        if isinstance(item, str):
            client.append((resolve(item), ""))
        elif (
            isinstance(item, list) and 1 <= len(item) <= 2 and all(isinstance(i, str) for i in item)
        ):
            client.append((resolve(item[0]), resolve(item[1]) if len(item) == 2 else ""))
        else:
            raise ConfigError(
                f"{path}: {where}client: expected a path, a list of paths or [cert, key] pairs"
            )

    headers: dict[str, str] = {}
    header_raw = raw.get("header", {})
    if not isinstance(header_raw, dict):
        raise ConfigError(f"{path}: {where}header: expected a table")
    for name, value in header_raw.items():
        if isinstance(value, str):
            headers[name] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            headers[name] = ", ".join(value)
        else:
            raise ConfigError(f"{path}: {where}header.{name}: expected a string or strings")
    return _HostSettings(
        capabilities=capabilities,
        skip_verify=skip_verify,
        ca=tuple(resolve(c) for c in ca_list),
        client=tuple(client),
        headers=headers,
        override_path=override_path,
    )
