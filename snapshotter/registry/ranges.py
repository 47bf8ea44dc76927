"""Byte ranges of blobs: `fetch_ranges`, multi-range requests and `multipart/byteranges` parsing.

Every piece returned has exactly the length asked for, or a typed error is raised; pieces are not
checked against the blob digest (the span manager checks each span against its zTOC digest).
A server that cannot do multi-range requests (400, 416, 501, a broken multipart answer) is
asked one range at a time from then on; a server that ignores `Range` (200) is read only as far
as the last byte needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
_MULTI_RANGE_REJECTED = frozenset({400, 416, 501})


class _MultiRangeRejected(Exception):
    """The server cannot do multi-range requests: fall back to single ranges."""


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
    """Range reads of one `RegistryClient`; remembers which hosts need single ranges."""

    def __init__(self, session: RegistrySession, *, force_single_range: bool = False) -> None:
        self._session = session
        self._force_single_range = force_single_range
        self._single_range_hosts: set[str] = set()

    @property
    def force_single_range(self) -> bool:
        """Whether every request asks for one range (`[blob] force_single_range_mode`)."""
        return self._force_single_range

    @property
    def single_range_hosts(self) -> frozenset[str]:
        """Endpoint URLs found unable to serve multi-range requests."""
        return frozenset(self._single_range_hosts)

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

        pieces = await self._session.with_endpoints(ref, "pull", what, op)
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
                    data = await read_body(response, end - first, what)
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

        return await self._session.retrying(what, endpoint, once)
