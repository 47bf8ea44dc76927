"""Retries and timeouts for registry HTTP requests, driven by the `[http]` config section.

How soci's `[http]` keys map onto httpx (see `http_timeout`):

- `DialTimeoutMsec` → httpx `connect` (TCP + TLS handshake) and `pool` (waiting for a free
  connection of the pool).
- `ResponseHeaderTimeoutMsec` → httpx `read` and `write`: the longest wait for the next bytes in
  either direction. httpx has no separate "until the headers" timeout, so this also bounds a
  stall in the middle of a body, which is what we want for a lazy-loading fetcher.
- `RequestTimeoutMsec` → a whole request including its body; httpx cannot express it, so the
  client enforces it with `anyio.fail_after` around each request and body read (per chunk with
  the remaining time for streamed blobs).
- `MaxRetries`, `MinWaitMsec`, `MaxWaitMsec` → `RetryTransport`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable

import anyio
import httpcore
import httpx

from snapshotter import metrics
from snapshotter.config import HttpConfig
from snapshotter.errors import RegistryUnavailableError

log = logging.getLogger(__name__)

# httpcore receives a body 64 KiB at a time, and each chunk then goes through h11, httpcore,
# httpx and our reader in Python: for megabyte spans that per-chunk cost was a sizable part of
# the data plane's CPU. A receive returns what the socket has, up to this.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

RETRYABLE_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
"""Transport failures worth another attempt (not TLS/protocol misconfiguration)."""


def http_timeout(http: HttpConfig) -> httpx.Timeout:
    """The httpx timeouts for `[http]` (mapping in the module docstring)."""
    dial = http.DialTimeoutMsec / 1000 or None
    wait = http.ResponseHeaderTimeoutMsec / 1000 or None
    return httpx.Timeout(connect=dial, read=wait, write=wait, pool=dial)


def request_timeout(http: HttpConfig) -> float:
    """Seconds allowed for one whole request including its body (inf when 0)."""
    return http.RequestTimeoutMsec / 1000 if http.RequestTimeoutMsec > 0 else float("inf")


def is_retryable_status(status: int) -> bool:
    """429 and 5xx except 501 (Not Implemented never gets better by asking again)."""
    return status == 429 or (500 <= status <= 599 and status != 501)


def backoff_seconds(
    http: HttpConfig, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter between MinWaitMsec and the doubled cap.

    `attempt` counts from 0 (the wait before the first retry).
    """
    low = http.MinWaitMsec / 1000
    cap = min(http.MaxWaitMsec / 1000, low * float(2 ** min(attempt, 30)))
    cap = max(cap, low)
    return low + (cap - low) * rand()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a Retry-After header: delta seconds or an HTTP date. None when absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value[:12]))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def is_replayable(request: httpx.Request) -> bool:
    """True when the request body can be sent again (no body, or an in-memory bytes body)."""
    if request.method in ("GET", "HEAD"):
        return True
    return isinstance(request.stream, httpx.ByteStream)


class RetryTransport(httpx.AsyncBaseTransport):
    """Retries connection errors, timeouts, 429 and 5xx (not 501) with backoff and jitter.

    After the budget, a retryable status is returned as is (the caller maps it to an error),
    and a transport failure becomes `RegistryUnavailableError` naming only the host.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        http: HttpConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._inner = inner
        self._http = http
        self._sleep = sleep
        self._rand = rand

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request`, retrying within the `[http]` budget when it is safe to."""
        retries = self._http.MaxRetries if is_replayable(request) else 0
        host = request.url.netloc.decode("ascii", "replace")
        attempt = 0
        while True:
            try:
                response = await self._inner.handle_async_request(request)
            except RETRYABLE_EXCEPTIONS as exc:
                tls = _tls_failure(exc)
                metrics.registry_error("tls" if tls else metrics.transport_error_kind(exc))
                if tls is not None:
                    # A certificate problem does not go away by asking again.
                    raise RegistryUnavailableError(
                        f"{request.method} to {host}: TLS failed: {tls} ({_tls_hint(tls, host)})"
                    ) from None
                if attempt >= retries:
                    raise RegistryUnavailableError(
                        f"{request.method} to {host} failed after {attempt + 1} attempt(s):"
                        f" {_describe(exc)}"
                    ) from None
                wait = backoff_seconds(self._http, attempt, self._rand)
                log.debug(
                    "%s %s: %s, retry %d in %.3fs",
                    request.method,
                    host,
                    type(exc).__name__,
                    attempt + 1,
                    wait,
                )
            else:
                if not is_retryable_status(response.status_code) or attempt >= retries:
                    return response
                metrics.registry_error(metrics.http_status_kind(response.status_code))
                wait = backoff_seconds(self._http, attempt, self._rand)
                after = retry_after_seconds(response.headers.get("retry-after"))
                if after is not None:
                    wait = min(max(after, wait), self._http.MaxWaitMsec / 1000)
                log.debug(
                    "%s %s: status %d, retry %d in %.3fs",
                    request.method,
                    host,
                    response.status_code,
                    attempt + 1,
                    wait,
                )
                await response.aclose()
            attempt += 1
            await self._sleep(wait)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._inner.aclose()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS error behind a connection failure, if that is what it was."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError):
            return str(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return str(e)
    return None


def _tls_hint(tls: str, host: str) -> str:
    """What would fix a failed TLS handshake."""
    if "WRONG_VERSION_NUMBER" in tls or "record layer failure" in tls:
        # The server answered the ClientHello in cleartext: it speaks plain HTTP.
        return (
            f"{host} seems to speak plain HTTP: use --plain-http, or "
            f'server = "http://{host}" in its hosts.toml'
        )
    return "set the registry's CA in its hosts.toml, or skip_verify for a test registry"


def _describe(exc: BaseException) -> str:
    """The most telling text in an exception chain (httpx's own message is often empty)."""
    for e in _chain(exc):
        if str(e):
            return f"{type(e).__name__}: {e}"
    return type(exc).__name__
