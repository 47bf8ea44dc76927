"""Pushing blobs (monolithic or chunked, cross-repository mounts) and manifests.

The data of a blob is checked against its digest and size before the upload is committed; an
upload that fails is cancelled. Upload locations on another origin get no credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import httpx

from snapshotter.errors import (
    DigestMismatchError,
    ManifestError,
    RegistryError,
    RegistryResponseError,
)
from snapshotter.registry.blobs import BlobPuller
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.manifests import MAX_MANIFEST_SIZE
from snapshotter.registry.reference import Reference, validate_repository
from snapshotter.registry.session import RegistrySession
from snapshotter.registry.wire import close_iterator, hash_matches, same_origin
from snapshotter.soci.oci import Descriptor, digest_hasher, sha256_digest, validate_digest

MONOLITHIC_UPLOAD_LIMIT = 8 * 1024 * 1024
"""Blobs smaller than this are uploaded with one PUT; bigger ones in PATCH chunks."""
UPLOAD_CHUNK_SIZE = 8 * 1024 * 1024


class Pusher:
    """Uploads of one `RegistryClient`."""

    def __init__(
        self,
        session: RegistrySession,
        blobs: BlobPuller,
        *,
        monolithic_limit: int = MONOLITHIC_UPLOAD_LIMIT,
        chunk_size: int = UPLOAD_CHUNK_SIZE,
    ) -> None:
        self._session = session
        self._blobs = blobs
        self.monolithic_limit = monolithic_limit
        self.chunk_size = chunk_size

    def _push_endpoint(self, ref: Reference) -> Endpoint:
        return self._session.endpoints(ref, "push")[0]

    def _upload_client(self, endpoint: Endpoint, url: httpx.URL) -> httpx.AsyncClient:
        base = httpx.URL(endpoint.url)
        return (
            self._session.client_for(endpoint)
            if same_origin(url, base)
            else self._session.plain_client()
        )

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
        client = self._session.client_for(endpoint)
        what = f"blob {digest} to {ref.locator}"
        uploads = httpx.URL(f"{endpoint.url}{endpoint.path_prefix}/{ref.repository}/blobs/uploads/")
        headers = dict(endpoint.headers)
        location: httpx.URL | None = None
        if mount_from is not None and mount_from != ref.repository:
            validate_repository(mount_from)
            response = await self._session.send(
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
                await self._session.fail(response, what)
            location = self._location(response, what)
        if location is None:
            if await self._blobs.head_blob(endpoint, ref, digest) is not None:
                return False
            response = await self._session.send(
                client, "POST", uploads, headers=headers, content=b""
            )
            await response.aclose()
            if response.status_code != 202:
                await self._session.fail(response, what)
            location = self._location(response, what)
        try:
            if size < self.monolithic_limit:
                data = await self._collect(open_data(), digest, size, what)
                final = location.copy_merge_params({"digest": digest})
                response = await self._session.send(
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
                await self._session.fail(response, what)
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
            await close_iterator(data)
        if len(buf) != size:
            raise ValueError(f"{what}: the data is {len(buf)} bytes, expected {size}")
        if not hash_matches(bytes(buf), digest):
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
        chunk_size = max(1, self.chunk_size)

        async def send(chunk: bytes) -> None:
            nonlocal offset, location
            response = await self._session.send(
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
                await self._session.fail(response, what)
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
            await close_iterator(chunks)
        if pending:
            hasher.update(pending)
        if offset + len(pending) != size:
            raise ValueError(f"{what}: the data is {offset + len(pending)} bytes, expected {size}")
        if f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}" != digest:
            raise DigestMismatchError(f"{what}: the data does not match its digest")
        final = location.copy_merge_params({"digest": digest})
        # The last piece travels with the closing PUT.
        return await self._session.send(
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
                response = await self._session.send(
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
            if not hash_matches(data, ref.digest):
                raise DigestMismatchError(f"manifest for {ref}: the data does not match the digest")
            digest = ref.digest
        endpoint = self._push_endpoint(ref)
        what = f"manifest {ref}"
        url = self._session.url(endpoint, ref, "manifests", ref.object)
        response = await self._session.send(
            self._session.client_for(endpoint),
            "PUT",
            url,
            headers={**endpoint.headers, "Content-Type": media_type},
            content=bytes(data),
        )
        await response.aclose()
        if response.status_code not in (200, 201):
            await self._session.fail(response, what)
        self._check_pushed_digest(response, digest, what)
        return Descriptor(media_type=media_type, digest=digest, size=len(data))

    # --- referrers ----------------------------------------------------------------------
