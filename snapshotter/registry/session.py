"""The core of the registry client: endpoints, HTTP clients, sending, retries, errors, redirects.

`RegistrySession` is what every job of the client (manifests, blobs, ranges, push, referrers)
sends its requests through. It keeps one `httpx.AsyncClient` per endpoint (TLS settings are per
client in httpx), all sharing one `auth` object, plus one client without auth for redirect
targets (object storage must never see the registry's credentials). It owns the state shared by
the jobs: the HTTP clients, the redirected blob URLs being reused and the blob sizes seen.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import anyio
import httpx

from snapshotter import metrics
from snapshotter.config import Config, HttpConfig
from snapshotter.errors import (
    FormatError,
    RegistryError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry.hosts import Endpoint, RegistryHosts
from snapshotter.registry.reference import Reference
from snapshotter.registry.transport import (
    RETRYABLE_EXCEPTIONS,
    RetryTransport,
    backoff_seconds,
    http_timeout,
    request_timeout,
)
from snapshotter.registry.wire import (
    MAX_ERROR_BODY,
    read_up_to,
    safe_url,
    same_origin,
    status_error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS = 5
MIRROR_RETRIES = 1
"""Retries of one request to a mirror (`[http] MaxRetries` is for the registry itself): the next
host is a better retry than waiting out a mirror's backoff."""
MIRROR_COOLDOWN = 10.0
"""Seconds a mirror found unreachable is passed over before it is asked again."""
USER_AGENT = "pysoci/0.1"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_EXPIRED_URL_STATUSES = frozenset({401, 403, 404, 410})


class RegistrySession:
    """Endpoints and HTTP clients of one `RegistryClient`, and how a request is sent."""

    def __init__(self, config: Config, hosts: RegistryHosts, auth: httpx.Auth | None) -> None:
        self.config = config
        self.http = config.http
        self.hosts = hosts
        self._auth = auth
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._plain: httpx.AsyncClient | None = None
        self._redirects: dict[tuple[str, str, str], tuple[httpx.URL, float]] = {}
        self._blob_sizes: dict[str, int] = {}
        self._mirror_down_until: dict[str, float] = {}

    @property
    def endpoint_count(self) -> int:
        """How many endpoints have an HTTP client now."""
        return len(self._clients)

    async def aclose(self) -> None:
        """Close every HTTP connection."""
        clients = list(self._clients.values())
        if self._plain is not None:
            clients.append(self._plain)
        self._clients.clear()
        self._plain = None
        for client in clients:
            await client.aclose()

    def _new_client(
        self, verify: object, auth: httpx.Auth | None, http: HttpConfig
    ) -> httpx.AsyncClient:
        inner = httpx.AsyncHTTPTransport(verify=verify, retries=0, trust_env=False)  # type: ignore[arg-type]
        return httpx.AsyncClient(
            transport=RetryTransport(inner, http),
            auth=auth,
            timeout=http_timeout(http),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    def client_for(self, endpoint: Endpoint) -> httpx.AsyncClient:
        """The HTTP client (with auth) for `endpoint`, made on first use."""
        key = (endpoint.url, endpoint.verify, endpoint.cert)
        client = self._clients.get(key)
        if client is None:
            client = self._new_client(endpoint.verify, self._auth, self._http_for(endpoint))
            self._clients[key] = client
        return client

    def plain_client(self) -> httpx.AsyncClient:
        """The HTTP client without credentials, for redirect and upload targets elsewhere."""
        if self._plain is None:
            self._plain = self._new_client(True, None, self.http)
        return self._plain

    def endpoints(self, ref: Reference, capability: str) -> list[Endpoint]:
        """The endpoints to try for `capability` on `ref`'s registry, mirrors first."""
        endpoints = self.hosts.endpoints(ref.registry, capability)
        if not endpoints:
            raise RegistryError(f"no endpoint of {ref.registry} is configured to {capability}")
        return endpoints

    def url(self, endpoint: Endpoint, ref: Reference, kind: str, obj: str) -> httpx.URL:
        """`<endpoint>/v2/<repo>/<kind>/<obj>`; a mirror also gets `?ns=<registry>`."""
        params = {"ns": ref.registry} if endpoint.mirror else None
        return httpx.URL(
            f"{endpoint.url}{endpoint.path_prefix}/{ref.repository}/{kind}/{obj}", params=params
        )

    def _timeout(self, endpoint: Endpoint | None) -> float:
        if endpoint is not None and endpoint.request_timeout:
            return endpoint.request_timeout
        return request_timeout(self.http)

    @contextmanager
    def deadline(self, what: str, seconds: float) -> Iterator[None]:
        """Bound a whole request and its body (RequestTimeoutMsec)."""
        try:
            with anyio.fail_after(None if seconds == float("inf") else seconds):
                yield
        except TimeoutError:
            metrics.registry_error("timeout")
            raise RegistryUnavailableError(
                f"{what}: no complete answer within {seconds:g} s"
            ) from None

    async def send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send and return the streamed response (the caller closes it)."""
        request = client.build_request(method, url, headers=headers, content=content)
        try:
            return await client.send(request, stream=True)
        except RETRYABLE_EXCEPTIONS as exc:
            # Only non-replayable requests get here: the transport retries the others.
            metrics.registry_error(metrics.transport_error_kind(exc))
            raise RegistryUnavailableError(
                f"{method} {safe_url(url)} failed: {type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"{method} {safe_url(url)} failed: {type(exc).__name__}: {exc}"
            ) from None

    async def fail(self, response: httpx.Response, what: str) -> NoReturn:
        """Raise the typed error for `response` (closing it)."""
        try:
            body = b""
            if not response.is_closed and response.request.method != "HEAD":
                body, _ = await read_up_to(response, MAX_ERROR_BODY)
        except (httpx.HTTPError, httpx.StreamError):
            pass
        finally:
            await response.aclose()
        host = response.request.url.netloc.decode("ascii", "replace")
        raise status_error(response.status_code, body, what, host)

    async def retrying(
        self, what: str, endpoint: Endpoint | None, op: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `op` (one request and its body) with the deadline, retrying body failures."""
        http = self._http_for(endpoint)
        attempt = 0
        while True:
            try:
                with self.deadline(what, self._timeout(endpoint)):
                    return await op()
            except RETRYABLE_EXCEPTIONS as exc:
                metrics.registry_error(metrics.transport_error_kind(exc))
                if attempt >= http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {attempt + 1} attempt(s): {type(exc).__name__}"
                    ) from None
                log.debug("%s: %s, retrying", what, type(exc).__name__)
            except httpx.HTTPError as exc:
                raise RegistryError(f"{what}: {type(exc).__name__}: {exc}") from None
            await anyio.sleep(backoff_seconds(http, attempt))
            attempt += 1

    def _http_for(self, endpoint: Endpoint | None) -> HttpConfig:
        """The `[http]` budget of `endpoint`: a mirror gets at most MIRROR_RETRIES retries."""
        if endpoint is not None and endpoint.mirror and self.http.MaxRetries > MIRROR_RETRIES:
            return dataclasses.replace(self.http, MaxRetries=MIRROR_RETRIES)
        return self.http

    def mirror_down(self, endpoint: Endpoint) -> bool:
        """Whether `endpoint` is a mirror that was unreachable less than MIRROR_COOLDOWN s ago."""
        until = self._mirror_down_until.get(endpoint.url)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._mirror_down_until[endpoint.url]
            return False
        return True

    async def with_endpoints(
        self,
        ref: Reference,
        capability: str,
        what: str,
        op: Callable[[Endpoint], Awaitable[T]],
        *,
        skip: Callable[[Endpoint], bool] | None = None,
    ) -> T:
        """`try_endpoints` for an `op` that need not know whether another host follows."""
        return await self.try_endpoints(ref, capability, what, lambda ep, _: op(ep), skip=skip)

    async def try_endpoints(
        self,
        ref: Reference,
        capability: str,
        what: str,
        op: Callable[[Endpoint, bool], Awaitable[T]],
        *,
        skip: Callable[[Endpoint], bool] | None = None,
    ) -> T:
        """Try `op(endpoint, another_follows)` on each endpoint in order, as containerd does.

        Like containerd's resolver and fetcher, a mirror that fails in any way (unreachable,
        an error status, a missing object, an answer that is malformed or does not match its
        digest) hands the request to the next host; the registry itself fails the request only
        when it is unreachable and something follows it. A mirror found unreachable is skipped
        for MIRROR_COOLDOWN seconds, and `skip` (never applied to the last endpoint) lets a job
        pass over a host it knows cannot serve this request.
        """
        endpoints = self.endpoints(ref, capability)
        plan = [
            e
            for i, e in enumerate(endpoints)
            if i == len(endpoints) - 1 or not (self.mirror_down(e) or (skip and skip(e)))
        ]
        last: RegistryError | FormatError | None = None
        for i, endpoint in enumerate(plan):
            try:
                return await op(endpoint, i < len(plan) - 1)
            except RegistryUnavailableError as exc:
                last = exc
                if endpoint.mirror:
                    self._mirror_down_until[endpoint.url] = time.monotonic() + MIRROR_COOLDOWN
            except (RegistryError, FormatError) as exc:
                if not endpoint.mirror:
                    raise
                last = exc
            if i < len(plan) - 1:
                log.info("%s: %s failed (%s), trying the next host", what, endpoint.url, last)
        assert last is not None
        raise last

    async def open_blob(
        self,
        endpoint: Endpoint,
        ref: Reference,
        digest: str,
        method: str,
        headers: dict[str, str],
    ) -> httpx.Response:
        """Send a blob request, following redirects by hand (the caller closes the answer).

        Redirect targets get no credentials; the final URL of a GET is reused for
        `[blob] valid_interval` seconds, and re-resolved through the registry sooner when it
        stops working.
        """
        what = f"blob {digest} of {ref.locator}"
        key = (endpoint.url, ref.repository, digest)
        now = time.monotonic()
        cached = self._redirects.get(key)
        if method == "GET" and cached is not None and cached[1] > now:
            response = await self.send(self.plain_client(), method, cached[0], headers=headers)
            if response.status_code not in _EXPIRED_URL_STATUSES:
                return response
            await response.aclose()
            log.debug(
                "%s: cached location answered %d, asking the registry", what, response.status_code
            )
            self._redirects.pop(key, None)
        registry_url = self.url(endpoint, ref, "blobs", digest)
        response = await self.send(
            self.client_for(endpoint),
            method,
            registry_url,
            headers={**endpoint.headers, **headers},
        )
        hops = 0
        elsewhere = False
        while response.status_code in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            await response.aclose()
            hops += 1
            if not location:
                raise RegistryResponseError(f"{what}: redirect without a Location")
            if hops > MAX_REDIRECTS:
                raise RegistryResponseError(f"{what}: more than {MAX_REDIRECTS} redirects")
            try:
                target = response.url.join(location)
            except httpx.InvalidURL:
                raise RegistryResponseError(f"{what}: invalid redirect Location") from None
            if target.scheme not in ("http", "https"):
                raise RegistryResponseError(f"{what}: redirect to a {target.scheme!r} URL")
            elsewhere = not same_origin(target, registry_url)
            if elsewhere:
                response = await self.send(self.plain_client(), method, target, headers=headers)
            else:
                response = await self.send(
                    self.client_for(endpoint),
                    method,
                    target,
                    headers={**endpoint.headers, **headers},
                )
        valid = self.config.blob.valid_interval
        if elsewhere and method == "GET" and response.status_code in (200, 206) and valid > 0:
            if len(self._redirects) > 1024:
                self._redirects = {k: v for k, v in self._redirects.items() if v[1] > now}
            self._redirects[key] = (response.url, now + valid)
        return response

    def remember_size(self, digest: str, size: int) -> None:
        """Note the size a registry gave for a blob (bounded memory)."""
        if len(self._blob_sizes) > 4096:
            self._blob_sizes.clear()
        self._blob_sizes[digest] = size

    def check_size(self, digest: str, size: int, what: str) -> None:
        """Refuse a blob size that differs from one seen before, then remember it."""
        known = self._blob_sizes.get(digest)
        if known is not None and known != size:
            raise RegistryResponseError(f"{what}: the registry says {size} bytes, earlier {known}")
        self.remember_size(digest, size)
