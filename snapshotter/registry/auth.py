"""Registry auth for httpx: Basic, and the Bearer token challenge of the distribution spec.

`RegistryAuth` is an `httpx.Auth` shared by every registry client of a process; all its state
(credentials, Basic hosts, tokens) is keyed by the request's host, so credentials only ever go to
the host they belong to, and to the token realm that host names (never to a plain-HTTP realm
when the registry itself is reached over HTTPS). Concurrent requests that need the same token
share one exchange.

Token requests follow the same `[http]` policy as registry requests (`snapshotter.registry.
transport`): connect/read timeouts, `RequestTimeoutMsec` for the whole exchange, and retries of
connection errors, 429 and 5xx (not 501) with backoff and `Retry-After`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import string
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import httpx

from snapshotter import metrics
from snapshotter.config import HttpConfig
from snapshotter.errors import AuthenticationError, RegistryResponseError, RegistryUnavailableError
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.transport import (
    RETRYABLE_EXCEPTIONS,
    RetryTransport,
    http_timeout,
    is_retryable_status,
    request_timeout,
)

log = logging.getLogger(__name__)

MAX_TOKEN_RESPONSE = 1 << 20
DEFAULT_TOKEN_LIFETIME = 60.0
CLIENT_ID = "pysoci"

_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
_TOKEN68 = frozenset("-._~+/" + string.ascii_letters + string.digits)
_WS = " \t"


@dataclass
class Challenge:
    """One challenge of a `WWW-Authenticate` header; scheme and parameter names lower-cased."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


def parse_challenges(values: str | Iterable[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header value(s) (RFC 7235) into challenges.

    Malformed input raises RegistryResponseError; nothing else escapes.
    """
    if isinstance(values, str):
        values = [values]
    result: list[Challenge] = []
    for value in values:
        result.extend(_ChallengeParser(value).parse())
    return result


class _ChallengeParser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)

    def error(self, what: str, at: int) -> RegistryResponseError:
        return RegistryResponseError(
            f"malformed WWW-Authenticate header ({what} at offset {at}): {self.s[:200]!r}"
        )

    def skip_ws(self, i: int) -> int:
        while i < self.n and self.s[i] in _WS:
            i += 1
        return i

    def run(self, i: int, chars: frozenset[str]) -> int:
        while i < self.n and self.s[i] in chars:
            i += 1
        return i

    def parse(self) -> list[Challenge]:
        s, n = self.s, self.n
        challenges: list[Challenge] = []
        current: Challenge | None = None
        i = 0
        while True:
            while i < n and s[i] in _WS + ",":
                i += 1
            if i >= n:
                return challenges
            j = self.run(i, _TCHAR)
            if j == i:
                raise self.error(f"unexpected {s[i]!r}", i)
            name = s[i:j]
            k = self.skip_ws(j)
            if k < n and s[k] == "=":
                if current is None:
                    raise self.error("parameter before any scheme", i)
                i = self.param(current, name, k + 1)
                continue
            current = Challenge(name.lower())
            challenges.append(current)
            if k == j or k >= n or s[k] == ",":
                i = k
                continue
            i = self.after_scheme(current, k)

    def after_scheme(self, current: Challenge, i: int) -> int:
        """Either the first auth-param or a token68."""
        s, n = self.s, self.n
        j = self.run(i, _TCHAR)
        k = self.skip_ws(j)
        if j > i and k < n and s[k] == "=":
            v = self.skip_ws(k + 1)
            if v < n and s[v] not in ",=":
                return self.param(current, s[i:j], k + 1)
        end = self.run(i, _TOKEN68)
        if end == i:
            raise self.error(f"unexpected {s[i]!r}", i)
        end = self.run(end, frozenset("="))
        after = self.skip_ws(end)
        if after < n and s[after] != ",":
            raise self.error("expected ',' after token68", after)
        current.token68 = s[i:end]
        return after

    def param(self, current: Challenge, name: str, i: int) -> int:
        s, n = self.s, self.n
        i = self.skip_ws(i)
        if i < n and s[i] == '"':
            chars: list[str] = []
            j = i + 1
            while True:
                if j >= n:
                    raise self.error("unterminated quoted string", i)
                c = s[j]
                if c == "\\":
                    if j + 1 >= n:
                        raise self.error("unterminated quoted string", i)
                    chars.append(s[j + 1])
                    j += 2
                elif c == '"':
                    j += 1
                    break
                else:
                    chars.append(c)
                    j += 1
            value = "".join(chars)
        else:
            j = i
            while j < n and s[j] not in _WS + ",":
                j += 1
            value = s[i:j]
            if not value or '"' in value:
                raise self.error("bad parameter value", i)
        j = self.skip_ws(j)
        if j < n and s[j] != ",":
            raise self.error("expected ','", j)
        current.params.setdefault(name.lower(), value)
        return j


_API_PATH = re.compile(
    r"^(?:.*?/v2)?/(?P<name>[a-z0-9][a-z0-9._/-]*?)"
    r"/(?:manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+|tags/list|referrers/[^/]+)$"
)


def normalize_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Merge the actions of scopes on the same resource; sorted, without duplicates."""
    merged: dict[tuple[str, str], set[str]] = {}
    other: set[str] = set()
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name or not actions:
            other.add(scope)
            continue
        merged.setdefault((kind, name), set()).update(a for a in actions.split(",") if a)
    out = {f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in merged.items()}
    return tuple(sorted(out | other))


def request_scopes(request: httpx.Request) -> tuple[str, ...]:
    """The token scopes a distribution API request needs, derived from its method and path."""
    match = _API_PATH.match(request.url.path)
    if match is None:
        return ()
    actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    scopes = [f"repository:{match['name']}:{actions}"]
    source = request.url.params.get("from")
    if request.method == "POST" and source and request.url.params.get("mount"):
        scopes.append(f"repository:{source}:pull")
    return normalize_scopes(scopes)


def host_key(url: httpx.URL) -> str:
    """`host[:port]` of a URL (the port only when not the scheme's default)."""
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return host if url.port is None else f"{host}:{url.port}"


@dataclass(frozen=True, repr=False)
class _Token:
    value: str
    renew_at: float

    def __repr__(self) -> str:
        return f"_Token(renew_at={self.renew_at})"


_TokenKey = tuple[str, str, str, tuple[str, ...]]  # host, realm, service, scopes


class RegistryAuth(httpx.Auth):
    """Basic and Bearer-token auth for registry requests; async only.

    `credentials(host)` is called (in a worker thread, once per host) when a host first asks
    for credentials; pass `CredentialStore.get`. `verify(realm_host, registry_host)` gives the
    TLS verification for a token realm on `realm_host` named by a challenge of `registry_host`
    (both `host[:port]`; pass `RegistryHosts.verify_for`; default: the system's). `http` is the
    `[http]` section (timeouts, retries) token requests follow; `transport` (the transport under
    the retries) is for tests and proxies.
    """

    def __init__(
        self,
        credentials: Callable[[str], Credentials | None],
        *,
        verify: Callable[[str, str], ssl.SSLContext | bool] | None = None,
        http: HttpConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._credentials = credentials
        self._verify = verify
        self._http = http if http is not None else HttpConfig()
        self._transport = transport
        self._creds: dict[str, Credentials | None] = {}
        self._cred_locks: dict[str, anyio.Lock] = {}
        self._basic_hosts: set[str] = set()
        self._tokens: dict[_TokenKey, _Token] = {}
        self._token_locks: dict[_TokenKey, anyio.Lock] = {}
        self._token_for_request: dict[tuple[str, tuple[str, ...]], _TokenKey] = {}

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise NotImplementedError("RegistryAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        host = host_key(request.url)
        scopes = request_scopes(request)
        replayable = isinstance(request.stream, httpx.ByteStream)
        sent_token = self._cached_token(host, scopes)
        sent_basic = False
        if sent_token is not None:
            request.headers["Authorization"] = f"Bearer {sent_token.value}"
        elif host in self._basic_hosts:
            creds = await self.credentials_for(host)
            if creds is not None and creds.username:
                request.headers["Authorization"] = _basic(creds)
                sent_basic = True
        response = yield request

        if response.status_code != 401:
            return
        final = response.request.url
        if host_key(final) != host or final.scheme != request.url.scheme:
            return  # redirected elsewhere: that host's answer is not ours to act on
        if not replayable:
            log.debug("%s %s: 401 on a streamed body, not retried", request.method, host)
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            token = await self._bearer(host, request, bearer, scopes, sent_token)
            request.headers["Authorization"] = f"Bearer {token.value}"
            yield request
        elif basic is not None and not sent_basic:
            creds = await self.credentials_for(host)
            if creds is None or not creds.username:
                return
            self._basic_hosts.add(host)
            request.headers["Authorization"] = _basic(creds)
            yield request

    async def credentials_for(self, host: str) -> Credentials | None:
        """The credentials of `host`, looked up once."""
        if host in self._creds:
            return self._creds[host]
        lock = self._cred_locks.setdefault(host, anyio.Lock())
        async with lock:
            if host not in self._creds:
                self._creds[host] = await anyio.to_thread.run_sync(self._credentials, host)
        return self._creds[host]

    def _cached_token(self, host: str, scopes: tuple[str, ...]) -> _Token | None:
        key = self._token_for_request.get((host, scopes))
        token = self._tokens.get(key) if key is not None else None
        if token is not None and token.renew_at > anyio.current_time():
            return token
        return None

    async def _bearer(
        self,
        host: str,
        request: httpx.Request,
        challenge: Challenge,
        scopes: tuple[str, ...],
        rejected: _Token | None,
    ) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryResponseError(f"{host}: Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        wanted = normalize_scopes([*challenge.params.get("scope", "").split(), *scopes])
        key = (host, realm, service, wanted)
        lock = self._token_locks.setdefault(key, anyio.Lock())
        async with lock:
            token = self._tokens.get(key)
            if token is None or token is rejected or token.renew_at <= anyio.current_time():
                token = await self._fetch_token(host, request.url.scheme, realm, service, wanted)
                self._tokens[key] = token
        self._token_for_request[(host, scopes)] = key
        return token

    async def _fetch_token(
        self, host: str, scheme: str, realm: str, service: str, scopes: tuple[str, ...]
    ) -> _Token:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise RegistryResponseError(f"{host}: invalid token realm {realm!r}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise RegistryResponseError(f"{host}: invalid token realm {realm!r}")
        shown = str(url.copy_with(query=None))
        creds = await self.credentials_for(host)
        if creds is not None and url.scheme == "http" and scheme == "https":
            log.warning("%s: not sending credentials to plain-HTTP token realm %s", host, shown)
            creds = None
        verify = self._verify(host_key(url), host) if self._verify is not None else True
        log.debug("%s: token exchange with %s for %s", host, shown, " ".join(scopes) or "-")
        inner = self._transport or httpx.AsyncHTTPTransport(
            verify=verify,
            retries=0,
            trust_env=False,
        )
        seconds = request_timeout(self._http)
        try:
            with anyio.fail_after(None if seconds == float("inf") else seconds):
                async with httpx.AsyncClient(
                    transport=RetryTransport(inner, self._http),
                    timeout=http_timeout(self._http),
                    follow_redirects=True,
                    max_redirects=5,
                    trust_env=False,
                ) as client:
                    body = await self._exchange(client, host, url, shown, service, scopes, creds)
        except TimeoutError:
            metrics.registry_error("timeout")
            raise RegistryUnavailableError(
                f"token server {shown} for {host}: no complete answer within {seconds:g} s"
            ) from None
        except RETRYABLE_EXCEPTIONS as exc:  # in the body: the transport retried the rest
            metrics.registry_error(metrics.transport_error_kind(exc))
            raise RegistryUnavailableError(
                f"token server {shown} for {host} failed: {type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            raise RegistryResponseError(
                f"token server {shown} for {host} failed: {type(exc).__name__}"
            ) from None
        return _parse_token(body, shown)

    async def _exchange(
        self,
        client: httpx.AsyncClient,
        host: str,
        url: httpx.URL,
        shown: str,
        service: str,
        scopes: tuple[str, ...],
        creds: Credentials | None,
    ) -> bytes:
        """One token request (retried by the client's transport); the bounded body."""
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": CLIENT_ID,
                "service": service,
                "scope": " ".join(scopes),
            }
            req = client.build_request("POST", url, data=form)
        else:
            params: list[tuple[str, str | int | float | bool | None]] = (
                [("service", service)] if service else []
            )
            params += [("scope", s) for s in scopes]
            headers = {}
            if creds is not None and creds.username:
                headers["Authorization"] = _basic(creds)
            req = client.build_request("GET", url.copy_merge_params(params), headers=headers)
        try:
            response = await client.send(req, stream=True)
        except RegistryUnavailableError as exc:  # the transport's, naming only the host
            raise RegistryUnavailableError(f"token server for {host}: {exc}") from None
        try:
            status = response.status_code
            if is_retryable_status(status):
                raise RegistryUnavailableError(
                    f"token server {shown} for {host} answered HTTP {status}"
                )
            if status >= 500:
                raise RegistryResponseError(
                    f"token server {shown} for {host}: unexpected answer (HTTP {status})"
                )
            if status != 200:
                who = "anonymous access" if creds is None else "the credentials"
                raise AuthenticationError(
                    f"token server {shown} refused {who} for {host} (HTTP {status})"
                )
            return await _read_bounded(response, MAX_TOKEN_RESPONSE, shown)
        finally:
            await response.aclose()


def _basic(creds: Credentials) -> str:
    pair = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


async def _read_bounded(response: httpx.Response, limit: int, shown: str) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise AuthenticationError(f"token response from {shown} is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise AuthenticationError(f"token response from {shown} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_token(body: bytes, shown: str) -> _Token:
    try:
        data = json.loads(body)
    except ValueError:
        raise AuthenticationError(f"token response from {shown} is not JSON") from None
    if not isinstance(data, dict):
        raise AuthenticationError(f"token response from {shown} is not a JSON object")
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
        raise AuthenticationError(f"token response from {shown} has no usable token")
    lifetime = data.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    issued_at = data.get("issued_at")
    if issued_at is not None and not isinstance(issued_at, str):
        raise AuthenticationError(f"token response from {shown} has a malformed issued_at")
    # Renew a little early so a token does not expire in flight.
    margin = min(10.0, lifetime * 0.1)
    return _Token(value, anyio.current_time() + float(lifetime) - margin)
