"""The async registry client: manifests, blobs, byte ranges, push and referrers (httpx on trio).

One `RegistryClient` per process or CLI run. It keeps one `httpx.AsyncClient` per endpoint
(TLS settings are per client in httpx), all sharing one `auth` object, plus one client without
auth for redirect targets (object storage must never see the registry's credentials).

Everything read from the network is bounded and verified: manifests are capped at 4 MiB and
checked against the digest that names them, blobs against digest and size, byte ranges against
the lengths asked for. Failures are the typed errors of `snapshotter.errors`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from types import TracebackType
from typing import NoReturn, TypeVar

import anyio
import httpx

from snapshotter import metrics
from snapshotter.config import Config
from snapshotter.errors import (
    AuthenticationError,
    DigestMismatchError,
    ManifestError,
    RegistryError,
    RegistryNotFoundError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry.hosts import Endpoint, RegistryHosts
from snapshotter.registry.reference import Reference, validate_repository
from snapshotter.registry.transport import (
    RETRYABLE_EXCEPTIONS,
    RetryTransport,
    backoff_seconds,
    http_timeout,
    is_retryable_status,
    request_timeout,
)
from snapshotter.soci.oci import (
    DEFAULT_MAX_MANIFEST_SIZE,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    digest_hasher,
    host_platform,
    parse_image_index,
    parse_manifest,
    select_manifest,
    sha256_digest,
    validate_digest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MANIFEST_SIZE = DEFAULT_MAX_MANIFEST_SIZE
MAX_ERROR_BODY = 64 * 1024
MAX_REDIRECTS = 5
MAX_RANGES_PER_REQUEST = 64
MAX_REFERRERS_PAGES = 16
MAX_INDEX_DEPTH = 2
USER_AGENT = "pysoci/0.1"

MANIFEST_ACCEPT = ", ".join(
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    ]
)
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_EXPIRED_URL_STATUSES = frozenset({401, 403, 404, 410})
_MULTI_RANGE_REJECTED = frozenset({400, 416, 501})
_CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


class _MultiRangeRejected(Exception):
    """The server cannot do multi-range requests: fall back to single ranges."""


def _safe_url(url: httpx.URL) -> str:
    """A URL fit for messages: no user info, no query (signed URLs carry secrets there)."""
    return str(url.copy_with(username=None, password=None, query=None, fragment=None))


def _content_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


def _content_length(response: httpx.Response, what: str) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 19:
        raise RegistryResponseError(f"{what}: invalid Content-Length {value[:40]!r}")
    return int(value)


def _parse_content_range(value: str | None, what: str) -> tuple[int, int, int | None]:
    """`bytes a-b/total` → (a, b + 1, total or None): half-open like our ranges."""
    m = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if m is None:
        raise RegistryResponseError(f"{what}: invalid Content-Range {str(value)[:80]!r}")
    start, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < start or (total is not None and last >= total):
        raise RegistryResponseError(f"{what}: inconsistent Content-Range {value!r}")
    return start, last + 1, total


def _registry_errors(body: bytes) -> str:
    """The `{"errors":[{code,message}]}` of an error body, as one short line ('' if none)."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    errors = obj.get("errors") if isinstance(obj, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for err in errors[:3]:
        if not isinstance(err, dict):
            continue
        code, message = err.get("code"), err.get("message")
        text = " ".join(str(x) for x in (code, message) if isinstance(x, str) and x)
        if text:
            parts.append(text)
    line = "; ".join(parts)
    return "".join(c if c.isprintable() else "?" for c in line)[:300]


def _error_codes(body: bytes) -> set[str]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return set()
    errors = obj.get("errors") if isinstance(obj, dict) else None
    if not isinstance(errors, list):
        return set()
    return {
        e["code"] for e in errors[:10] if isinstance(e, dict) and isinstance(e.get("code"), str)
    }


def status_error(status: int, body: bytes, what: str, host: str) -> RegistryError:
    """The typed error for an unexpected HTTP status (the body is the bounded error body)."""
    metrics.registry_error(metrics.http_status_kind(status))
    detail = f"HTTP {status}"
    message = _registry_errors(body)
    if message:
        detail += f": {message}"
    if status in (401, 403):
        return AuthenticationError(f"{what}: {host} refused access ({detail})")
    if status == 404 or _error_codes(body) & _NOT_FOUND_CODES:
        return RegistryNotFoundError(f"{what}: not found on {host} ({detail})")
    if is_retryable_status(status):
        return RegistryUnavailableError(f"{what}: {host} kept failing ({detail})")
    if status == 400 and b"HTTP request to an HTTPS server" in body:
        # Go's answer to cleartext on a TLS port (a loopback registry is plain HTTP by default).
        return RegistryResponseError(
            f"{what}: {host} speaks HTTPS, not plain HTTP: set "
            f'server = "https://{host}" (and its CA) in its hosts.toml, or use --skip-verify'
        )
    return RegistryResponseError(f"{what}: unexpected answer from {host} ({detail})")


async def _read_up_to(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Read at most `limit` bytes; (data, True) when the body had more."""
    buf = bytearray()
    async for chunk in response.aiter_raw():
        room = limit - len(buf)
        buf += chunk[:room]
        if len(chunk) > room:
            return bytes(buf), True
    return bytes(buf), False


async def _read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes (Content-Length checked first)."""
    length = _content_length(response, what)
    if length is not None and length > limit:
        raise RegistryResponseError(f"{what} is {length} bytes, more than the limit of {limit}")
    data, more = await _read_up_to(response, limit)
    if more:
        raise RegistryResponseError(f"{what} is more than the limit of {limit} bytes")
    if length is not None and len(data) != length:
        raise RegistryResponseError(f"{what}: got {len(data)} bytes, Content-Length {length}")
    return data


def _check_encoding(response: httpx.Response, what: str) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RegistryResponseError(f"{what}: unexpected Content-Encoding {encoding[:40]!r}")


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    def origin(u: httpx.URL) -> tuple[str, str, int | None]:
        return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)

    return origin(a) == origin(b)


def _multipart_boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if 1 <= len(value) <= 70 and value.isascii():
                return value.encode("ascii")
    return None


def parse_multipart_byteranges(body: bytes, boundary: bytes, what: str) -> list[tuple[int, bytes]]:
    """Parse a `multipart/byteranges` body into (start, data) pieces.

    Each part's length comes from its Content-Range, so part data may contain anything
    (even the boundary). Any deviation raises RegistryResponseError.
    """
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0 or (pos > 0 and body[pos - 2 : pos] != b"\r\n"):
        raise RegistryResponseError(f"{what}: multipart body without a boundary")
    pieces: list[tuple[int, bytes]] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break
        eol = body.find(b"\r\n", pos)
        if eol < 0 or eol - pos > 256 or body[pos:eol].strip(b" \t"):
            raise RegistryResponseError(f"{what}: malformed multipart delimiter line")
        start = eol + 2
        if body.startswith(b"\r\n", start):
            header_block, data_start = b"", start + 2
        else:
            end = body.find(b"\r\n\r\n", start, start + 8192)
            if end < 0:
                raise RegistryResponseError(f"{what}: malformed multipart part headers")
            header_block, data_start = body[start:end], end + 4
        content_range: str | None = None
        for line in header_block.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                raise RegistryResponseError(f"{what}: malformed multipart part header")
            if name.strip().lower() == b"content-range":
                content_range = value.strip().decode("latin-1")
        if content_range is None:
            raise RegistryResponseError(f"{what}: multipart part without Content-Range")
        first, end_excl, _ = _parse_content_range(content_range, what)
        length = end_excl - first
        data = body[data_start : data_start + length]
        if len(data) != length:
            raise RegistryResponseError(f"{what}: multipart part shorter than its Content-Range")
        pieces.append((first, data))
        pos = data_start + length
        if not body.startswith(b"\r\n" + delimiter, pos):
            raise RegistryResponseError(f"{what}: multipart part longer than its Content-Range")
        pos += 2
        if len(pieces) > 10_000:
            raise RegistryResponseError(f"{what}: too many multipart parts")
    if not pieces:
        raise RegistryResponseError(f"{what}: multipart body without parts")
    return pieces


async def _close_iterator(iterator: AsyncIterator[bytes]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _extract(pieces: Sequence[tuple[int, bytes]], start: int, end: int) -> bytes | None:
    for first, data in pieces:
        if first <= start and end <= first + len(data):
            return data[start - first : end - first]
    return None


def _hash_matches(data: bytes, digest: str) -> bool:
    h = digest_hasher(digest)
    h.update(data)
    return f"{digest.split(':', 1)[0]}:{h.hexdigest()}" == digest


class RegistryClient:
    """Async client of the OCI distribution API (pull, ranges, push, referrers).

    Use as `async with RegistryClient(config) as client:` or call `aclose()`.
    """

    MONOLITHIC_UPLOAD_LIMIT = 8 * 1024 * 1024
    """Blobs smaller than this are uploaded with one PUT; bigger ones in PATCH chunks."""
    UPLOAD_CHUNK_SIZE = 8 * 1024 * 1024

    def __init__(
        self,
        config: Config | None = None,
        *,
        hosts: RegistryHosts | None = None,
        auth: httpx.Auth | None = None,
        plain_http: bool = False,
        force_single_range: bool = False,
    ) -> None:
        self._config = config if config is not None else Config()
        self._http = self._config.http
        self._hosts = (
            hosts if hosts is not None else RegistryHosts(self._config, plain_http=plain_http)
        )
        self._auth = auth
        self._force_single_range = force_single_range
        self._single_range_hosts: set[str] = set()
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._plain: httpx.AsyncClient | None = None
        self._redirects: dict[tuple[str, str, str], tuple[httpx.URL, float]] = {}
        self._blob_sizes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<RegistryClient endpoints={len(self._clients)}>"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every HTTP connection."""
        clients = list(self._clients.values())
        if self._plain is not None:
            clients.append(self._plain)
        self._clients.clear()
        self._plain = None
        for client in clients:
            await client.aclose()

    # --- plumbing -----------------------------------------------------------------------

    def _new_client(self, verify: object, auth: httpx.Auth | None) -> httpx.AsyncClient:
        inner = httpx.AsyncHTTPTransport(verify=verify, retries=0, trust_env=False)  # type: ignore[arg-type]
        return httpx.AsyncClient(
            transport=RetryTransport(inner, self._http),
            auth=auth,
            timeout=http_timeout(self._http),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    def _client_for(self, endpoint: Endpoint) -> httpx.AsyncClient:
        key = (endpoint.url, endpoint.verify, endpoint.cert)
        client = self._clients.get(key)
        if client is None:
            client = self._new_client(endpoint.verify, self._auth)
            self._clients[key] = client
        return client

    def _plain_client(self) -> httpx.AsyncClient:
        if self._plain is None:
            self._plain = self._new_client(True, None)
        return self._plain

    def _endpoints(self, ref: Reference, capability: str) -> list[Endpoint]:
        endpoints = self._hosts.endpoints(ref.registry, capability)
        if not endpoints:
            raise RegistryError(f"no endpoint of {ref.registry} is configured to {capability}")
        return endpoints

    def _url(self, endpoint: Endpoint, ref: Reference, kind: str, obj: str) -> httpx.URL:
        params = {"ns": ref.registry} if endpoint.mirror else None
        return httpx.URL(
            f"{endpoint.url}{endpoint.path_prefix}/{ref.repository}/{kind}/{obj}", params=params
        )

    def _timeout(self, endpoint: Endpoint | None) -> float:
        if endpoint is not None and endpoint.request_timeout:
            return endpoint.request_timeout
        return request_timeout(self._http)

    @contextmanager
    def _deadline(self, what: str, seconds: float) -> Iterator[None]:
        """Bound a whole request and its body (RequestTimeoutMsec)."""
        try:
            with anyio.fail_after(None if seconds == float("inf") else seconds):
                yield
        except TimeoutError:
            metrics.registry_error("timeout")
            raise RegistryUnavailableError(
                f"{what}: no complete answer within {seconds:g} s"
            ) from None

    async def _send(
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
                f"{method} {_safe_url(url)} failed: {type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"{method} {_safe_url(url)} failed: {type(exc).__name__}: {exc}"
            ) from None

    async def _fail(self, response: httpx.Response, what: str) -> NoReturn:
        """Raise the typed error for `response` (closing it)."""
        try:
            body = b""
            if not response.is_closed and response.request.method != "HEAD":
                body, _ = await _read_up_to(response, MAX_ERROR_BODY)
        except (httpx.HTTPError, httpx.StreamError):
            pass
        finally:
            await response.aclose()
        host = response.request.url.netloc.decode("ascii", "replace")
        raise status_error(response.status_code, body, what, host)

    async def _retrying(
        self, what: str, endpoint: Endpoint | None, op: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `op` (one request and its body) with the deadline, retrying body failures."""
        attempt = 0
        while True:
            try:
                with self._deadline(what, self._timeout(endpoint)):
                    return await op()
            except RETRYABLE_EXCEPTIONS as exc:
                metrics.registry_error(metrics.transport_error_kind(exc))
                if attempt >= self._http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {attempt + 1} attempt(s): {type(exc).__name__}"
                    ) from None
                log.debug("%s: %s, retrying", what, type(exc).__name__)
            except httpx.HTTPError as exc:
                raise RegistryError(f"{what}: {type(exc).__name__}: {exc}") from None
            await anyio.sleep(backoff_seconds(self._http, attempt))
            attempt += 1

    async def _with_endpoints(
        self, ref: Reference, capability: str, what: str, op: Callable[[Endpoint], Awaitable[T]]
    ) -> T:
        """Try `op` on each endpoint in order: next on unavailability or a mirror's 404."""
        last: RegistryError | None = None
        for endpoint in self._endpoints(ref, capability):
            try:
                return await op(endpoint)
            except RegistryUnavailableError as exc:
                last = exc
            except RegistryNotFoundError as exc:
                if not endpoint.mirror:
                    raise
                last = exc
            log.info("%s: %s failed (%s), trying the next endpoint", what, endpoint.url, last)
        assert last is not None
        raise last

    # --- manifests ----------------------------------------------------------------------

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor of the manifest or index `ref` names (HEAD, GET when needed)."""
        what = f"manifest {ref}"

        async def head(endpoint: Endpoint) -> Descriptor | None:
            client = self._client_for(endpoint)
            url = self._url(endpoint, ref, "manifests", ref.object)
            headers = {**endpoint.headers, "Accept": MANIFEST_ACCEPT}
            response = await self._send(client, "HEAD", url, headers=headers)
            await response.aclose()
            if response.status_code in (401, 403, 404):
                await self._fail(response, what)
            if response.status_code != 200:
                return None  # the GET gives the registry's error body
            media_type = _content_type(response)
            length = _content_length(response, what)
            header_digest = response.headers.get("docker-content-digest")
            if media_type not in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES or length is None:
                return None
            if header_digest is not None:
                try:
                    validate_digest(header_digest)
                except ManifestError:
                    raise RegistryResponseError(
                        f"{what}: invalid Docker-Content-Digest {header_digest[:100]!r}"
                    ) from None
                if ref.digest is not None and header_digest != ref.digest:
                    if header_digest.split(":")[0] == ref.digest.split(":")[0]:
                        raise DigestMismatchError(
                            f"{what}: registry says the digest is {header_digest}"
                        )
                    header_digest = None
            digest = ref.digest or header_digest
            if digest is None:
                return None
            if length > MAX_MANIFEST_SIZE:
                raise RegistryResponseError(
                    f"{what} is {length} bytes, more than the limit of {MAX_MANIFEST_SIZE}"
                )
            return Descriptor(media_type=media_type, digest=digest, size=length)

        async def op(endpoint: Endpoint) -> Descriptor:
            desc = await self._retrying(what, endpoint, lambda: head(endpoint))
            if desc is None:
                desc, _ = await self._get_manifest_on(endpoint, ref)
            return desc

        return await self._with_endpoints(ref, "resolve", what, op)

    async def get_manifest(self, ref: Reference) -> tuple[Descriptor, bytes]:
        """Fetch the manifest or index `ref` names, verified against its digest."""
        capability = "pull" if ref.digest is not None else "resolve"
        return await self._with_endpoints(
            ref, capability, f"manifest {ref}", lambda ep: self._get_manifest_on(ep, ref)
        )

    async def _get_manifest_on(
        self, endpoint: Endpoint, ref: Reference
    ) -> tuple[Descriptor, bytes]:
        what = f"manifest {ref}"

        async def once() -> tuple[httpx.Headers, bytes]:
            client = self._client_for(endpoint)
            url = self._url(endpoint, ref, "manifests", ref.object)
            headers = {**endpoint.headers, "Accept": MANIFEST_ACCEPT}
            response = await self._send(client, "GET", url, headers=headers)
            try:
                if response.status_code != 200:
                    await self._fail(response, what)
                _check_encoding(response, what)
                return response.headers, await _read_body(response, MAX_MANIFEST_SIZE, what)
            finally:
                await response.aclose()

        headers, data = await self._retrying(what, endpoint, once)
        return self._manifest_descriptor(ref, headers, data), data

    def _manifest_descriptor(
        self, ref: Reference, headers: httpx.Headers, data: bytes
    ) -> Descriptor:
        what = f"manifest {ref}"
        digest = ref.digest
        if digest is not None and not _hash_matches(data, digest):
            metrics.registry_error("digest_mismatch")
            raise DigestMismatchError(f"{what}: the content does not match its digest")
        header = headers.get("docker-content-digest")
        if header is not None:
            try:
                validate_digest(header)
            except ManifestError:
                raise RegistryResponseError(
                    f"{what}: invalid Docker-Content-Digest {header[:100]!r}"
                ) from None
            if not _hash_matches(data, header):
                metrics.registry_error("digest_mismatch")
                raise DigestMismatchError(
                    f"{what}: the content does not match the registry's digest {header}"
                )
            digest = digest or header
        if digest is None:
            digest = sha256_digest(data)
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        parsed = parse_manifest(data, media_type_hint=content_type, max_size=MAX_MANIFEST_SIZE)
        media_type = parsed.media_type
        if not media_type:
            if content_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES:
                media_type = content_type
            elif isinstance(parsed, ImageIndex):
                media_type = MEDIA_TYPE_OCI_INDEX
            else:
                media_type = MEDIA_TYPE_OCI_MANIFEST
        return Descriptor(media_type=media_type, digest=digest, size=len(data))

    async def get_platform_manifest(
        self, ref: Reference, platform: Platform | None = None
    ) -> tuple[Descriptor, ImageManifest]:
        """The image manifest for `platform` (default: this host), through an index if needed.

        The descriptor is the index entry (with its platform) when `ref` names an index.
        """
        want = platform if platform is not None else host_platform()
        desc, data = await self.get_manifest(ref)
        for _ in range(MAX_INDEX_DEPTH + 1):
            parsed = parse_manifest(data, media_type_hint=desc.media_type)
            if isinstance(parsed, ImageManifest):
                return desc, parsed
            chosen = select_manifest(parsed, want)
            fetched, data = await self.get_manifest(ref.with_digest(chosen.digest))
            if fetched.size != chosen.size:
                raise ManifestError(
                    f"manifest {chosen.digest} is {fetched.size} bytes,"
                    f" the index says {chosen.size}"
                )
            desc = chosen
        raise ManifestError(f"{ref}: image indexes nested more than {MAX_INDEX_DEPTH} deep")

    # --- blobs --------------------------------------------------------------------------

    async def _open_blob(
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
            response = await self._send(self._plain_client(), method, cached[0], headers=headers)
            if response.status_code not in _EXPIRED_URL_STATUSES:
                return response
            await response.aclose()
            log.debug(
                "%s: cached location answered %d, asking the registry", what, response.status_code
            )
            self._redirects.pop(key, None)
        registry_url = self._url(endpoint, ref, "blobs", digest)
        response = await self._send(
            self._client_for(endpoint),
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
            elsewhere = not _same_origin(target, registry_url)
            if elsewhere:
                response = await self._send(self._plain_client(), method, target, headers=headers)
            else:
                response = await self._send(
                    self._client_for(endpoint),
                    method,
                    target,
                    headers={**endpoint.headers, **headers},
                )
        valid = self._config.blob.valid_interval
        if elsewhere and method == "GET" and response.status_code in (200, 206) and valid > 0:
            if len(self._redirects) > 1024:
                self._redirects = {k: v for k, v in self._redirects.items() if v[1] > now}
            self._redirects[key] = (response.url, now + valid)
        return response

    async def _head_blob(self, endpoint: Endpoint, ref: Reference, digest: str) -> int | None:
        """Size of the blob, None when absent."""
        what = f"blob {digest} of {ref.locator}"

        async def once() -> int | None:
            response = await self._open_blob(endpoint, ref, digest, "HEAD", {})
            await response.aclose()
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                await self._fail(response, what)
            length = _content_length(response, what)
            if length is None:
                raise RegistryResponseError(f"{what}: HEAD answer without Content-Length")
            return length

        return await self._retrying(what, endpoint, once)

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """The size of a blob (HEAD)."""
        validate_digest(digest)
        what = f"blob {digest} of {ref.locator}"

        async def op(endpoint: Endpoint) -> int:
            size = await self._head_blob(endpoint, ref, digest)
            if size is None:
                raise RegistryNotFoundError(f"{what}: not found on {endpoint.host}")
            return size

        size = await self._with_endpoints(ref, "pull", what, op)
        self._remember_size(digest, size)
        return size

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """True if the registry has the blob."""
        try:
            await self.blob_size(ref, digest)
        except RegistryNotFoundError:
            return False
        return True

    def _remember_size(self, digest: str, size: int) -> None:
        if len(self._blob_sizes) > 4096:
            self._blob_sizes.clear()
        self._blob_sizes[digest] = size

    def fetch_blob(self, ref: Reference, digest: str) -> AsyncIterator[bytes]:
        """Stream a blob. Digest and size are verified after the last chunk: a consumer
        must not trust the bytes until iteration ends without `DigestMismatchError`.

        A connection lost mid-body is resumed with a Range request, within MaxRetries.
        """
        validate_digest(digest)
        return self._blob_stream(ref, digest, None)

    async def read_blob(self, ref: Reference, digest: str, *, max_size: int) -> bytes:
        """A whole verified blob of at most `max_size` bytes."""
        validate_digest(digest)
        buf = bytearray()
        async with aclosing(self._blob_stream(ref, digest, max_size)) as stream:
            async for chunk in stream:
                buf += chunk
        return bytes(buf)

    async def _blob_stream(
        self, ref: Reference, digest: str, max_size: int | None
    ) -> AsyncGenerator[bytes, None]:
        what = f"blob {digest} of {ref.locator}"
        hasher = digest_hasher(digest)
        received = 0
        total: int | None = None
        failures = 0
        endpoint: Endpoint | None = None
        deadline = anyio.current_time() + request_timeout(self._http)

        def remaining() -> float | None:
            left = deadline - anyio.current_time()
            if left == float("inf"):
                return None
            if left <= 0:
                raise RegistryUnavailableError(
                    f"{what}: not complete within {self._http.RequestTimeoutMsec} ms"
                )
            return left

        async def open_at(ep: Endpoint, offset: int) -> httpx.Response:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            response = await self._open_blob(ep, ref, digest, "GET", headers)
            if response.status_code not in (200, 206):
                await self._fail(response, what)
            return response

        async def open_first(ep: Endpoint) -> tuple[Endpoint, httpx.Response]:
            return ep, await open_at(ep, 0)

        while True:
            try:
                with self._deadline(what, remaining() or float("inf")):
                    if endpoint is None:
                        endpoint, response = await self._with_endpoints(
                            ref, "pull", what, lambda ep: open_first(ep)
                        )
                    else:
                        response = await open_at(endpoint, received)
            except RETRYABLE_EXCEPTIONS as exc:
                metrics.registry_error(metrics.transport_error_kind(exc))
                failures += 1
                if failures > self._http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {failures} attempt(s): {type(exc).__name__}"
                    ) from None
                await anyio.sleep(backoff_seconds(self._http, failures - 1))
                continue
            try:
                _check_encoding(response, what)
                skip = 0
                if response.status_code == 206:
                    first_byte, end, size = _parse_content_range(
                        response.headers.get("content-range"), what
                    )
                    if first_byte != received or size is None or end != size:
                        raise RegistryResponseError(
                            f"{what}: asked for bytes from {received}, got Content-Range"
                            f" {response.headers.get('content-range')!r}"
                        )
                else:
                    skip = received  # the server ignored the Range header
                    size = _content_length(response, what)
                if size is not None:
                    if total is not None and size != total:
                        raise RegistryResponseError(f"{what}: size changed from {total} to {size}")
                    total = size
                    if max_size is not None and total > max_size:
                        raise RegistryResponseError(
                            f"{what} is {total} bytes, more than the limit of {max_size}"
                        )
                chunks = response.aiter_raw().__aiter__()
                while True:
                    try:
                        with anyio.fail_after(remaining()):
                            chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        metrics.registry_error("timeout")
                        raise RegistryUnavailableError(
                            f"{what}: not complete within {self._http.RequestTimeoutMsec} ms"
                        ) from None
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                    received += len(chunk)
                    if (total is not None and received > total) or (
                        max_size is not None and received > max_size
                    ):
                        raise RegistryResponseError(f"{what}: the body is longer than announced")
                    hasher.update(chunk)
                    yield chunk
                break
            except RETRYABLE_EXCEPTIONS as exc:
                metrics.registry_error(metrics.transport_error_kind(exc))
                failures += 1
                if failures > self._http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {failures} attempt(s): {type(exc).__name__}"
                    ) from None
                log.debug("%s: %s after %d bytes, resuming", what, type(exc).__name__, received)
            finally:
                await response.aclose()
            await anyio.sleep(backoff_seconds(self._http, failures - 1))
        if total is not None and received != total:
            raise RegistryResponseError(f"{what}: got {received} bytes, expected {total}")
        actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
        if actual != digest:
            metrics.registry_error("digest_mismatch")
            raise DigestMismatchError(f"{what}: the content hashes to {actual}")
        self._remember_size(digest, received)

    # --- ranges -------------------------------------------------------------------------

    async def fetch_ranges(
        self, ref: Reference, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """The bytes of half-open `[start, end)` ranges of a blob, in the order asked.

        Not verified against the blob digest (the caller verifies spans); every piece has
        exactly the requested length or RegistryResponseError is raised.
        """
        validate_digest(digest)
        for start, end in ranges:
            if isinstance(start, bool) or isinstance(end, bool) or not 0 <= start <= end:
                raise ValueError(f"invalid byte range [{start}, {end})")
        wanted = [(s, e) for s, e in ranges if e > s]
        if not wanted:
            return [b"" for _ in ranges]
        merged = _merge_ranges(wanted)
        what = f"blob {digest} of {ref.locator}"

        async def op(endpoint: Endpoint) -> list[tuple[int, bytes]]:
            single = self._force_single_range or endpoint.url in self._single_range_hosts
            pieces: list[tuple[int, bytes]] = []
            if not single and len(merged) > 1:
                try:
                    for i in range(0, len(merged), MAX_RANGES_PER_REQUEST):
                        batch = merged[i : i + MAX_RANGES_PER_REQUEST]
                        pieces.extend(await self._range_request(endpoint, ref, digest, batch))
                    return pieces
                except _MultiRangeRejected as exc:
                    log.info(
                        "%s does not serve multi-range requests well (%s); using single ranges",
                        endpoint.host,
                        exc,
                    )
                    self._single_range_hosts.add(endpoint.url)
                    pieces = []
            for r in merged:
                pieces.extend(await self._range_request(endpoint, ref, digest, [r]))
            return pieces

        pieces = await self._with_endpoints(ref, "pull", what, op)
        out = []
        for start, end in ranges:
            data = b"" if start == end else _extract(pieces, start, end)
            if data is None or len(data) != end - start:
                raise RegistryResponseError(f"{what}: the answer lacks bytes [{start}, {end})")
            out.append(data)
        return out

    async def _range_request(
        self,
        endpoint: Endpoint,
        ref: Reference,
        digest: str,
        ranges: list[tuple[int, int]],
    ) -> list[tuple[int, bytes]]:
        what = f"blob {digest} of {ref.locator}"
        multi = len(ranges) > 1
        low, high = ranges[0][0], ranges[-1][1]
        asked = sum(e - s for s, e in ranges)
        header = "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)

        async def once() -> list[tuple[int, bytes]]:
            response = await self._open_blob(endpoint, ref, digest, "GET", {"Range": header})
            try:
                status = response.status_code
                if multi and status in _MULTI_RANGE_REJECTED:
                    raise _MultiRangeRejected(f"HTTP {status}")
                if status not in (200, 206):
                    await self._fail(response, what)
                _check_encoding(response, what)
                if status == 200:
                    # The server ignored Range: read only as far as the last byte we need.
                    length = _content_length(response, what)
                    if length is not None:
                        self._check_size(digest, length, what)
                        if length < high:
                            raise RegistryResponseError(
                                f"{what} is {length} bytes; asked for bytes up to {high}"
                            )
                    data, _ = await _read_up_to(response, high)
                    if len(data) < high:
                        raise RegistryResponseError(f"{what}: body ended before byte {high}")
                    return [(0, data)]
                content_type = response.headers.get("content-type", "")
                if content_type.split(";", 1)[0].strip().lower() == "multipart/byteranges":
                    boundary = _multipart_boundary(content_type)
                    try:
                        if boundary is None:
                            raise RegistryResponseError(f"{what}: multipart without a boundary")
                        limit = asked + (high - low) + 65536 + 512 * len(ranges)
                        body = await _read_body(response, limit, what)
                        pieces = parse_multipart_byteranges(body, boundary, what)
                    except RegistryResponseError as exc:
                        if multi:
                            raise _MultiRangeRejected(str(exc)) from None
                        raise
                else:
                    first, end, size = _parse_content_range(
                        response.headers.get("content-range"), what
                    )
                    if size is not None:
                        self._check_size(digest, size, what)
                    if first > low or end - first > (high - low) + 65536:
                        raise RegistryResponseError(
                            f"{what}: asked for {header[6:]}, got Content-Range"
                            f" {response.headers.get('content-range')!r}"
                        )
                    data = await _read_body(response, end - first, what)
                    if len(data) != end - first:
                        raise RegistryResponseError(
                            f"{what}: got {len(data)} bytes for Content-Range of {end - first}"
                        )
                    pieces = [(first, data)]
                missing = [(s, e) for s, e in ranges if _extract(pieces, s, e) is None]
                if missing:
                    if multi:
                        raise _MultiRangeRejected(f"parts do not cover {missing[:3]}")
                    raise RegistryResponseError(
                        f"{what}: asked for {header[6:]}, got Content-Range"
                        f" {response.headers.get('content-range')!r}"
                    )
                return pieces
            finally:
                await response.aclose()

        return await self._retrying(what, endpoint, once)

    def _check_size(self, digest: str, size: int, what: str) -> None:
        known = self._blob_sizes.get(digest)
        if known is not None and known != size:
            raise RegistryResponseError(f"{what}: the registry says {size} bytes, earlier {known}")
        self._remember_size(digest, size)

    # --- push ---------------------------------------------------------------------------

    def _push_endpoint(self, ref: Reference) -> Endpoint:
        return self._endpoints(ref, "push")[0]

    def _upload_client(self, endpoint: Endpoint, url: httpx.URL) -> httpx.AsyncClient:
        base = httpx.URL(endpoint.url)
        return self._client_for(endpoint) if _same_origin(url, base) else self._plain_client()

    async def push_blob(
        self,
        ref: Reference,
        digest: str,
        size: int,
        open_data: Callable[[], AsyncIterator[bytes]],
        *,
        mount_from: str | None = None,
    ) -> bool:
        """Upload a blob unless the registry has it; False when it existed or was mounted.

        `mount_from` names another repository of the same registry to mount the blob from.
        The data is checked against `digest` and `size` before the upload is committed.
        """
        validate_digest(digest)
        if size < 0:
            raise ValueError(f"negative blob size {size}")
        endpoint = self._push_endpoint(ref)
        client = self._client_for(endpoint)
        what = f"blob {digest} to {ref.locator}"
        uploads = httpx.URL(f"{endpoint.url}{endpoint.path_prefix}/{ref.repository}/blobs/uploads/")
        headers = dict(endpoint.headers)
        location: httpx.URL | None = None
        if mount_from is not None and mount_from != ref.repository:
            validate_repository(mount_from)
            response = await self._send(
                client,
                "POST",
                uploads.copy_merge_params({"mount": digest, "from": mount_from}),
                headers=headers,
                content=b"",
            )
            await response.aclose()
            if response.status_code == 201:
                self._check_pushed_digest(response, digest, what)
                return False
            if response.status_code != 202:
                await self._fail(response, what)
            location = self._location(response, what)
        if location is None:
            if await self._head_blob(endpoint, ref, digest) is not None:
                return False
            response = await self._send(client, "POST", uploads, headers=headers, content=b"")
            await response.aclose()
            if response.status_code != 202:
                await self._fail(response, what)
            location = self._location(response, what)
        try:
            if size < self.MONOLITHIC_UPLOAD_LIMIT:
                data = await self._collect(open_data(), digest, size, what)
                final = location.copy_merge_params({"digest": digest})
                response = await self._send(
                    self._upload_client(endpoint, final),
                    "PUT",
                    final,
                    headers={**headers, "Content-Type": "application/octet-stream"},
                    content=data,
                )
            else:
                response = await self._upload_chunks(endpoint, location, open_data, digest, size)
            await response.aclose()
            if response.status_code != 201:
                await self._fail(response, what)
        except (RegistryError, DigestMismatchError, ManifestError, ValueError):
            await self._cancel_upload(endpoint, location)
            raise
        self._check_pushed_digest(response, digest, what)
        return True

    async def _collect(
        self, data: AsyncIterator[bytes], digest: str, size: int, what: str
    ) -> bytes:
        buf = bytearray()
        try:
            async for chunk in data:
                buf += chunk
                if len(buf) > size:
                    raise ValueError(f"{what}: the data is longer than {size} bytes")
        finally:
            await _close_iterator(data)
        if len(buf) != size:
            raise ValueError(f"{what}: the data is {len(buf)} bytes, expected {size}")
        if not _hash_matches(bytes(buf), digest):
            raise DigestMismatchError(f"{what}: the data does not match {digest}")
        return bytes(buf)

    async def _upload_chunks(
        self,
        endpoint: Endpoint,
        location: httpx.URL,
        open_data: Callable[[], AsyncIterator[bytes]],
        digest: str,
        size: int,
    ) -> httpx.Response:
        what = f"blob {digest}"
        hasher = digest_hasher(digest)
        offset = 0
        pending = bytearray()
        chunk_size = max(1, self.UPLOAD_CHUNK_SIZE)

        async def send(chunk: bytes) -> None:
            nonlocal offset, location
            response = await self._send(
                self._upload_client(endpoint, location),
                "PATCH",
                location,
                headers={
                    **endpoint.headers,
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
                content=chunk,
            )
            await response.aclose()
            if response.status_code != 202:
                await self._fail(response, what)
            location = self._location(response, what)
            offset += len(chunk)

        chunks = open_data()
        try:
            async for piece in chunks:
                pending += piece
                if offset + len(pending) > size:
                    raise ValueError(f"{what}: the data is longer than {size} bytes")
                while len(pending) >= chunk_size:
                    chunk = bytes(pending[:chunk_size])
                    del pending[:chunk_size]
                    hasher.update(chunk)
                    await send(chunk)
        finally:
            await _close_iterator(chunks)
        if pending:
            hasher.update(pending)
        if offset + len(pending) != size:
            raise ValueError(f"{what}: the data is {offset + len(pending)} bytes, expected {size}")
        if f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}" != digest:
            raise DigestMismatchError(f"{what}: the data does not match its digest")
        final = location.copy_merge_params({"digest": digest})
        # The last piece travels with the closing PUT.
        return await self._send(
            self._upload_client(endpoint, final),
            "PUT",
            final,
            headers={**endpoint.headers, "Content-Type": "application/octet-stream"},
            content=bytes(pending),
        )

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise RegistryResponseError(f"{what}: upload answer without a Location")
        try:
            url = response.url.join(location)
        except httpx.InvalidURL:
            raise RegistryResponseError(f"{what}: invalid upload Location") from None
        if url.scheme not in ("http", "https"):
            raise RegistryResponseError(f"{what}: upload Location is not http(s)")
        return url

    async def _cancel_upload(self, endpoint: Endpoint, location: httpx.URL) -> None:
        try:
            with anyio.move_on_after(5):
                response = await self._send(
                    self._upload_client(endpoint, location), "DELETE", location
                )
                await response.aclose()
        except RegistryError:
            pass

    def _check_pushed_digest(self, response: httpx.Response, digest: str, what: str) -> None:
        header = response.headers.get("docker-content-digest")
        same_algorithm = header is not None and header.split(":")[0] == digest.split(":")[0]
        if same_algorithm and header != digest:
            raise RegistryResponseError(f"{what}: the registry stored it as {header[:100]}")

    async def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> Descriptor:
        """PUT a manifest or index under `ref.object` (the digest if set, else the tag)."""
        if len(data) > MAX_MANIFEST_SIZE:
            raise ManifestError(
                f"manifest is {len(data)} bytes, more than the limit of {MAX_MANIFEST_SIZE}"
            )
        digest = sha256_digest(data)
        if ref.digest is not None:
            if not _hash_matches(data, ref.digest):
                raise DigestMismatchError(f"manifest for {ref}: the data does not match the digest")
            digest = ref.digest
        endpoint = self._push_endpoint(ref)
        what = f"manifest {ref}"
        url = self._url(endpoint, ref, "manifests", ref.object)
        response = await self._send(
            self._client_for(endpoint),
            "PUT",
            url,
            headers={**endpoint.headers, "Content-Type": media_type},
            content=bytes(data),
        )
        await response.aclose()
        if response.status_code not in (200, 201):
            await self._fail(response, what)
        self._check_pushed_digest(response, digest, what)
        return Descriptor(media_type=media_type, digest=digest, size=len(data))

    # --- referrers ----------------------------------------------------------------------

    async def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of manifests whose subject is `subject_digest`.

        Uses the referrers API, following `Link: <...>; rel="next"` pages on the same origin.
        Registries without it (404, or a first answer that is not an OCI index) are read
        through the `<alg>-<hex>` fallback tag. A later page that is not an index, a body that
        is not a valid index, or a next link to another origin is a typed error. Filtered by
        `artifact_type` when given (whether or not the registry filtered).
        """
        validate_digest(subject_digest)
        what = f"referrers of {subject_digest} in {ref.locator}"

        async def api(endpoint: Endpoint) -> list[Descriptor] | None:
            client = self._client_for(endpoint)
            url = self._url(endpoint, ref, "referrers", subject_digest)
            if artifact_type:
                url = url.copy_merge_params({"artifactType": artifact_type})
            found: list[Descriptor] = []
            for page_number in range(MAX_REFERRERS_PAGES):

                async def once(
                    page_url: httpx.URL = url, first: bool = page_number == 0
                ) -> tuple[list[Descriptor], httpx.URL | None] | None:
                    headers = {**endpoint.headers, "Accept": MEDIA_TYPE_OCI_INDEX}
                    response = await self._send(client, "GET", page_url, headers=headers)
                    try:
                        if response.status_code == 404 and first:
                            return None
                        if response.status_code != 200:
                            await self._fail(response, what)
                        content_type = _content_type(response)
                        if content_type != MEDIA_TYPE_OCI_INDEX:
                            if first:
                                return None  # not the referrers API: use the fallback tag
                            raise RegistryResponseError(
                                f"{what}: a next page answered {content_type[:80]!r},"
                                " not an OCI image index"
                            )
                        body = await _read_body(response, MAX_MANIFEST_SIZE, what)
                        try:
                            index = parse_image_index(body, media_type_hint=MEDIA_TYPE_OCI_INDEX)
                        except ManifestError as exc:
                            raise RegistryResponseError(
                                f"{what}: not a valid OCI image index: {exc}"
                            ) from None
                        link = _LINK_NEXT_RE.search(response.headers.get("link", ""))
                        next_url = None
                        if link is not None:
                            try:
                                next_url = response.url.join(link.group(1))
                            except httpx.InvalidURL:
                                raise RegistryResponseError(
                                    f"{what}: invalid next page link"
                                ) from None
                            if not _same_origin(next_url, response.url):
                                raise RegistryResponseError(
                                    f"{what}: next page link to another origin"
                                    f" {_safe_url(next_url)}"
                                )
                        return list(index.manifests), next_url
                    finally:
                        await response.aclose()

                page = await self._retrying(what, endpoint, once)
                if page is None:
                    return None
                found.extend(page[0])
                if page[1] is None:
                    return found
                url = page[1]
            log.warning("%s: more than %d pages, using the first ones", what, MAX_REFERRERS_PAGES)
            return found

        result = await self._with_endpoints(ref, "pull", what, api)
        if result is None:
            tag = subject_digest.replace(":", "-")
            try:
                desc, data = await self.get_manifest(ref.with_tag(tag))
            except RegistryNotFoundError:
                return []
            parsed = parse_manifest(data, media_type_hint=desc.media_type)
            result = list(parsed.manifests) if isinstance(parsed, ImageIndex) else []
        if artifact_type:
            result = [d for d in result if d.artifact_type == artifact_type]
        return result
