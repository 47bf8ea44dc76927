"""Byte ranges of blobs: `fetch_ranges`, multi-range requests and `multipart/byteranges` parsing.

Every piece returned has exactly the length asked for, or a typed error is raised; pieces are not
checked against the blob digest (the span manager checks each span against its zTOC digest).
A server that cannot do multi-range requests (400, 416, 501, a broken multipart answer, or the
whole blob in a 200) is asked one range per request from then on, several requests at once.
Mirrors always are: pull-through caches that build their cache from ranges do not serve
multi-range requests from it (nginx's slice cache answers them with the whole blob, 200), and
learning that costs each node's first request a few slices of origin traffic.

A server that ignores `Range` and answers 200 with the whole blob is never read further than the
last byte needed, and only read at all when those bytes lie in its first PREFIX_READ_LIMIT bytes
or when no other host is left: otherwise the answer is closed at once and the request goes to
the next host of the list. A mirror that did this for a blob is passed over for that blob's
ranges for RANGE_RETRY_SECONDS, doubling up to RANGE_RETRY_MAX each time it does it again, and
asked again after that: a pull-through cache such as docker-registry's proxy mode answers 200 to
a range of a blob it has not cached yet, stores the whole blob meanwhile (even when the client
closes the answer), and serves ranges (206) from its cache once it has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio

from snapshotter.errors import RegistryResponseError
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.reference import Reference
from snapshotter.registry.session import RegistrySession
from snapshotter.registry.wire import (
    check_encoding,
    content_length,
    parse_content_range,
    read_body,
    read_up_to,
)
from snapshotter.soci.oci import validate_digest

log = logging.getLogger(__name__)

MAX_RANGES_PER_REQUEST = 64
MAX_PARALLEL_RANGES = 8
"""Single-range requests of one `fetch_ranges` call in flight at once."""
PREFIX_READ_LIMIT = 1 << 20
"""A whole-blob answer to a range request is read if every byte needed lies in this prefix."""
RANGE_RETRY_SECONDS = 5.0
"""How long a mirror that answered a blob's range with the whole blob is passed over, at first."""
RANGE_RETRY_MAX = 120.0
MAX_REMEMBERED_BLOBS = 4096
_MULTI_RANGE_REJECTED = frozenset({400, 416, 501})


class RangeSink(Protocol):
    """Sees the bytes of a one-range fetch as they arrive (to work on them while the rest is
    on its way); the fetch's return value stays the authority."""

    def restart(self) -> None:
        """An attempt begins: forget what was fed before (a retry, another host)."""
        ...

    def data(self, chunk: bytes) -> None:
        """The next bytes of the range, in order."""
        ...


class _MultiRangeRejected(Exception):
    """The server cannot do multi-range requests: fall back to single ranges."""


class _RangeIgnored(RegistryResponseError):
    """A host answered a range request with the whole blob, and another host follows."""


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
        first, end_excl, _ = parse_content_range(content_range, what)
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


def _skipping(sink: RangeSink | None, skip: int) -> Callable[[bytes], None] | None:
    """What feeds `sink` a body whose first `skip` bytes precede the range asked."""
    if sink is None:
        return None
    left = skip

    def feed(chunk: bytes) -> None:
        nonlocal left
        if left:
            cut = min(left, len(chunk))
            left -= cut
            chunk = chunk[cut:]
        if chunk:
            sink.data(chunk)

    return feed


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


class RangeFetcher:
    """Range reads of one `RegistryClient`; remembers which hosts need single ranges and which
    mirrors answer a blob's ranges with the whole blob."""

    def __init__(self, session: RegistrySession, *, force_single_range: bool = False) -> None:
        self._session = session
        self._force_single_range = force_single_range
        self._single_range_hosts: set[str] = set()
        self._ignored: dict[tuple[str, str], tuple[float, float]] = {}
        """(endpoint URL, blob digest) → (monotonic time to ask again, current wait)."""

    @property
    def force_single_range(self) -> bool:
        """Whether every request asks for one range (`[blob] force_single_range_mode`)."""
        return self._force_single_range

    @property
    def single_range_hosts(self) -> frozenset[str]:
        """Endpoint URLs found unable to serve multi-range requests."""
        return frozenset(self._single_range_hosts)

    def passed_over(self, endpoint_url: str, digest: str) -> bool:
        """Whether ranges of `digest` skip this endpoint now (it answered them with 200)."""
        entry = self._ignored.get((endpoint_url, digest))
        return entry is not None and entry[0] > time.monotonic()

    def _note_ignored(self, endpoint: Endpoint, digest: str) -> float:
        key = (endpoint.url, digest)
        entry = self._ignored.get(key)
        wait = RANGE_RETRY_SECONDS if entry is None else min(2 * entry[1], RANGE_RETRY_MAX)
        if entry is None and len(self._ignored) >= MAX_REMEMBERED_BLOBS:
            self._ignored.clear()
        self._ignored[key] = (time.monotonic() + wait, wait)
        return wait

    async def fetch_ranges(
        self,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        sink: RangeSink | None = None,
    ) -> list[bytes]:
        """The bytes of half-open `[start, end)` ranges of a blob, in the order asked.

        Not verified against the blob digest (the caller verifies spans); every piece has
        exactly the requested length or RegistryResponseError is raised. With one range,
        `sink` sees its bytes as they arrive.
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
        if len(merged) != 1:
            sink = None

        async def op(endpoint: Endpoint, fallback: bool) -> list[tuple[int, bytes]]:
            single = (
                self._force_single_range
                or endpoint.mirror
                or endpoint.url in self._single_range_hosts
            )
            pieces: list[tuple[int, bytes]] = []
            if not single and len(merged) > 1:
                try:
                    for i in range(0, len(merged), MAX_RANGES_PER_REQUEST):
                        batch = merged[i : i + MAX_RANGES_PER_REQUEST]
                        pieces.extend(
                            await self._range_request(endpoint, ref, digest, batch, fallback)
                        )
                    return pieces
                except _MultiRangeRejected as exc:
                    log.info(
                        "%s does not serve multi-range requests well (%s); using single ranges",
                        endpoint.host,
                        exc,
                    )
                    self._single_range_hosts.add(endpoint.url)
                    pieces = []
            if len(merged) == 1:
                return await self._range_request(endpoint, ref, digest, merged, fallback, sink)
            return await self._single_ranges(endpoint, ref, digest, merged, fallback)

        pieces = await self._session.try_endpoints(
            ref, "pull", what, op, skip=lambda ep: self.passed_over(ep.url, digest)
        )
        out = []
        for start, end in ranges:
            data = b"" if start == end else _extract(pieces, start, end)
            if data is None or len(data) != end - start:
                raise RegistryResponseError(f"{what}: the answer lacks bytes [{start}, {end})")
            out.append(data)
        return out

    async def _single_ranges(
        self,
        endpoint: Endpoint,
        ref: Reference,
        digest: str,
        ranges: list[tuple[int, int]],
        fallback: bool,
    ) -> list[tuple[int, bytes]]:
        """One request per range, MAX_PARALLEL_RANGES at a time; the first error cancels the
        others and is raised as is (so the caller sees the typed error)."""
        if len(ranges) == 1:
            return await self._range_request(endpoint, ref, digest, ranges, fallback)
        pieces: list[tuple[int, bytes]] = []
        errors: list[Exception] = []
        limiter = anyio.CapacityLimiter(MAX_PARALLEL_RANGES)
        async with anyio.create_task_group() as group:

            async def one(r: tuple[int, int]) -> None:
                async with limiter:
                    try:
                        pieces.extend(
                            await self._range_request(endpoint, ref, digest, [r], fallback)
                        )
                    except Exception as exc:
                        errors.append(exc)
                        group.cancel_scope.cancel()

            for r in ranges:
                group.start_soon(one, r)
        if errors:
            raise errors[0]
        return pieces

    async def _range_request(
        self,
        endpoint: Endpoint,
        ref: Reference,
        digest: str,
        ranges: list[tuple[int, int]],
        fallback: bool,
        sink: RangeSink | None = None,
    ) -> list[tuple[int, bytes]]:
        """One request for `ranges`; `fallback`: another host follows this one; `sink` (one
        range only) sees its bytes as they arrive."""
        what = f"blob {digest} of {ref.locator}"
        multi = len(ranges) > 1
        low, high = ranges[0][0], ranges[-1][1]
        asked = sum(e - s for s, e in ranges)
        header = "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)

        async def once() -> list[tuple[int, bytes]]:
            if sink is not None:
                sink.restart()
            response = await self._session.open_blob(
                endpoint, ref, digest, "GET", {"Range": header}
            )
            try:
                status = response.status_code
                if multi and status in _MULTI_RANGE_REJECTED:
                    raise _MultiRangeRejected(f"HTTP {status}")
                if status not in (200, 206):
                    await self._session.fail(response, what)
                check_encoding(response, what)
                if status == 200:
                    if high > PREFIX_READ_LIMIT and (multi or (fallback and endpoint.mirror)):
                        if multi:
                            raise _MultiRangeRejected("HTTP 200 with the whole blob")
                        wait = self._note_ignored(endpoint, digest)
                        raise _RangeIgnored(
                            f"{what}: {endpoint.host} answered a range with the whole blob"
                            f" (HTTP 200); the next host serves its ranges for {wait:g} s"
                        )
                    # The server ignored Range: read only as far as the last byte we need.
                    length = content_length(response, what)
                    if length is not None:
                        self._session.check_size(digest, length, what)
                        if length < high:
                            raise RegistryResponseError(
                                f"{what} is {length} bytes; asked for bytes up to {high}"
                            )
                    data, _ = await read_up_to(response, high)
                    if len(data) < high:
                        raise RegistryResponseError(f"{what}: body ended before byte {high}")
                    if sink is not None:
                        sink.data(data[low:high])
                    return [(0, data)]
                content_type = response.headers.get("content-type", "")
                if content_type.split(";", 1)[0].strip().lower() == "multipart/byteranges":
                    boundary = _multipart_boundary(content_type)
                    try:
                        if boundary is None:
                            raise RegistryResponseError(f"{what}: multipart without a boundary")
                        limit = asked + (high - low) + 65536 + 512 * len(ranges)
                        body = await read_body(response, limit, what)
                        pieces = parse_multipart_byteranges(body, boundary, what)
                    except RegistryResponseError as exc:
                        if multi:
                            raise _MultiRangeRejected(str(exc)) from None
                        raise
                else:
                    first, end, size = parse_content_range(
                        response.headers.get("content-range"), what
                    )
                    if size is not None:
                        self._session.check_size(digest, size, what)
                    if first > low or end - first > (high - low) + 65536:
                        raise RegistryResponseError(
                            f"{what}: asked for {header[6:]}, got Content-Range"
                            f" {response.headers.get('content-range')!r}"
                        )
                    data = await read_body(
                        response, end - first, what, _skipping(sink, low - first)
                    )
                    if len(data) != end - first:
                        raise RegistryResponseError(
                            f"{what}: got {len(data)} bytes for Content-Range of {end - first}"
                        )
                    pieces = [(first, data)]
                self._ignored.pop((endpoint.url, digest), None)
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

        return await self._session.retrying(what, endpoint, once)
