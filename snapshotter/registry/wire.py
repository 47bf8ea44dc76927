"""How the registry client reads an HTTP answer: headers, bounded bodies, typed errors.

Functions over one `httpx.Response` (or a body already read) shared by every job of the client
(manifests, blobs, ranges, push, referrers). They validate what the registry says and turn every
deviation into a typed error of `snapshotter.errors`; none of them sends a request.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable

import httpx

from snapshotter import metrics
from snapshotter.errors import (
    AuthenticationError,
    RegistryError,
    RegistryNotFoundError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry.transport import is_retryable_status
from snapshotter.soci.oci import digest_hasher

MAX_ERROR_BODY = 64 * 1024
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})
_CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")


def safe_url(url: httpx.URL) -> str:
    """A URL fit for messages: no user info, no query (signed URLs carry secrets there)."""
    return str(url.copy_with(username=None, password=None, query=None, fragment=None))


def content_type(response: httpx.Response) -> str:
    """The media type of the answer, lower case, without parameters ('' if none)."""
    value: str = response.headers.get("content-type", "")
    return value.split(";", 1)[0].strip().lower()


def content_length(response: httpx.Response, what: str) -> int | None:
    """The Content-Length, None when absent; a malformed one is a RegistryResponseError."""
    value = response.headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 19:
        raise RegistryResponseError(f"{what}: invalid Content-Length {value[:40]!r}")
    return int(value)


def parse_content_range(value: str | None, what: str) -> tuple[int, int, int | None]:
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


async def read_up_to(
    response: httpx.Response, limit: int, on_chunk: Callable[[bytes], None] | None = None
) -> tuple[bytes, bool]:
    """Read at most `limit` bytes; (data, True) when the body had more. `on_chunk` sees the
    bytes kept as they arrive."""
    buf = bytearray()
    async for chunk in response.aiter_raw():
        room = limit - len(buf)
        kept = chunk[:room]
        buf += kept
        if on_chunk is not None and kept:
            on_chunk(kept)
        if len(chunk) > room:
            return bytes(buf), True
    return bytes(buf), False


async def read_body(
    response: httpx.Response,
    limit: int,
    what: str,
    on_chunk: Callable[[bytes], None] | None = None,
) -> bytes:
    """The whole body, refusing more than `limit` bytes (Content-Length checked first);
    `on_chunk` sees it as it arrives."""
    length = content_length(response, what)
    if length is not None and length > limit:
        raise RegistryResponseError(f"{what} is {length} bytes, more than the limit of {limit}")
    data, more = await read_up_to(response, limit, on_chunk)
    if more:
        raise RegistryResponseError(f"{what} is more than the limit of {limit} bytes")
    if length is not None and len(data) != length:
        raise RegistryResponseError(f"{what}: got {len(data)} bytes, Content-Length {length}")
    return data


def check_encoding(response: httpx.Response, what: str) -> None:
    """Refuse a compressed transfer (we ask for identity and count raw bytes)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RegistryResponseError(f"{what}: unexpected Content-Encoding {encoding[:40]!r}")


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Same scheme, host and (default-filled) port."""

    def origin(u: httpx.URL) -> tuple[str, str, int | None]:
        return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)

    return origin(a) == origin(b)


async def close_iterator(iterator: AsyncIterator[bytes]) -> None:
    """Close an async iterator if it can be closed (a generator the caller handed us)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def hash_matches(data: bytes, digest: str) -> bool:
    """Whether `data` hashes to `digest` (with the digest's own algorithm)."""
    h = digest_hasher(digest)
    h.update(data)
    return f"{digest.split(':', 1)[0]}:{h.hexdigest()}" == digest
