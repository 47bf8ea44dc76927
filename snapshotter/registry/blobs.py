"""Pulling whole blobs: their size, existence, and verified streams that resume after a cut.

A blob stream is checked against the blob's digest and size after its last chunk; a connection
lost mid-body is resumed with a `Range: bytes=N-` request (a server that ignores it is read
from the start, skipping what was already received).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import anyio
import httpx

from snapshotter import metrics
from snapshotter.errors import (
    DigestMismatchError,
    RegistryNotFoundError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.reference import Reference
from snapshotter.registry.session import RegistrySession
from snapshotter.registry.transport import RETRYABLE_EXCEPTIONS, backoff_seconds, request_timeout
from snapshotter.registry.wire import check_encoding, content_length, parse_content_range
from snapshotter.soci.oci import digest_hasher, validate_digest

log = logging.getLogger(__name__)


class BlobPuller:
    """Whole-blob reads of one `RegistryClient`."""

    def __init__(self, session: RegistrySession) -> None:
        self._session = session

    async def head_blob(self, endpoint: Endpoint, ref: Reference, digest: str) -> int | None:
        """Size of the blob, None when absent."""
        what = f"blob {digest} of {ref.locator}"

        async def once() -> int | None:
            response = await self._session.open_blob(endpoint, ref, digest, "HEAD", {})
            await response.aclose()
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                await self._session.fail(response, what)
            length = content_length(response, what)
            if length is None:
                raise RegistryResponseError(f"{what}: HEAD answer without Content-Length")
            return length

        return await self._session.retrying(what, endpoint, once)

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """The size of a blob (HEAD)."""
        validate_digest(digest)
        what = f"blob {digest} of {ref.locator}"

        async def op(endpoint: Endpoint) -> int:
            size = await self.head_blob(endpoint, ref, digest)
            if size is None:
                raise RegistryNotFoundError(f"{what}: not found on {endpoint.host}")
            return size

        size = await self._session.with_endpoints(ref, "pull", what, op)
        self._session.remember_size(digest, size)
        return size

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """True if the registry has the blob."""
        try:
            await self.blob_size(ref, digest)
        except RegistryNotFoundError:
            return False
        return True

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
        http = self._session.http
        deadline = anyio.current_time() + request_timeout(http)

        def remaining() -> float | None:
            left = deadline - anyio.current_time()
            if left == float("inf"):
                return None
            if left <= 0:
                raise RegistryUnavailableError(
                    f"{what}: not complete within {http.RequestTimeoutMsec} ms"
                )
            return left

        async def open_at(ep: Endpoint, offset: int) -> httpx.Response:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            response = await self._session.open_blob(ep, ref, digest, "GET", headers)
            if response.status_code not in (200, 206):
                await self._session.fail(response, what)
            return response

        async def open_first(ep: Endpoint) -> tuple[Endpoint, httpx.Response]:
            return ep, await open_at(ep, 0)

        while True:
            try:
                with self._session.deadline(what, remaining() or float("inf")):
                    if endpoint is None:
                        endpoint, response = await self._session.with_endpoints(
                            ref, "pull", what, lambda ep: open_first(ep)
                        )
                    else:
                        response = await open_at(endpoint, received)
            except RETRYABLE_EXCEPTIONS as exc:
                metrics.registry_error(metrics.transport_error_kind(exc))
                failures += 1
                if failures > http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {failures} attempt(s): {type(exc).__name__}"
                    ) from None
                await anyio.sleep(backoff_seconds(http, failures - 1))
                continue
            try:
                check_encoding(response, what)
                skip = 0
                if response.status_code == 206:
                    first_byte, end, size = parse_content_range(
                        response.headers.get("content-range"), what
                    )
                    if first_byte != received or size is None or end != size:
                        raise RegistryResponseError(
                            f"{what}: asked for bytes from {received}, got Content-Range"
                            f" {response.headers.get('content-range')!r}"
                        )
                else:
                    skip = received  # the server ignored the Range header
                    size = content_length(response, what)
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
                            f"{what}: not complete within {http.RequestTimeoutMsec} ms"
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
                if failures > http.MaxRetries:
                    raise RegistryUnavailableError(
                        f"{what}: failed after {failures} attempt(s): {type(exc).__name__}"
                    ) from None
                log.debug("%s: %s after %d bytes, resuming", what, type(exc).__name__, received)
            finally:
                await response.aclose()
            await anyio.sleep(backoff_seconds(http, failures - 1))
        if total is not None and received != total:
            raise RegistryResponseError(f"{what}: got {received} bytes, expected {total}")
        actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
        if actual != digest:
            metrics.registry_error("digest_mismatch")
            raise DigestMismatchError(f"{what}: the content hashes to {actual}")
        self._session.remember_size(digest, received)
