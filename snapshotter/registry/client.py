"""The async registry client: one object for manifests, blobs, byte ranges, push and referrers.

`RegistryClient` is the facade the rest of pysoci uses; each job lives in its own module and
shares one `RegistrySession` (endpoints, HTTP clients, retries, errors, redirects):

- `manifests`: resolve, manifests and indexes, a platform's manifest;
- `blobs`: blob size and existence, verified blob streams;
- `ranges`: byte ranges of blobs (multi-range requests, `multipart/byteranges`);
- `push`: blob and manifest uploads;
- `referrers`: the referrers API and its fallback tag.

Everything read from the network is bounded and verified: manifests are capped at 4 MiB and
checked against the digest that names them, blobs against digest and size, byte ranges against
the lengths asked for. Failures are the typed errors of `snapshotter.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType

import httpx

from snapshotter.config import Config
from snapshotter.registry.blobs import BlobPuller
from snapshotter.registry.hosts import RegistryHosts
from snapshotter.registry.manifests import ManifestPuller
from snapshotter.registry.push import MONOLITHIC_UPLOAD_LIMIT, UPLOAD_CHUNK_SIZE, Pusher
from snapshotter.registry.ranges import RangeFetcher, RangeSink
from snapshotter.registry.reference import Reference
from snapshotter.registry.referrers import ReferrersReader
from snapshotter.registry.session import RegistrySession
from snapshotter.soci.oci import Descriptor, ImageManifest, Platform


class RegistryClient:
    """Async client of the OCI distribution API (pull, ranges, push, referrers).

    Use as `async with RegistryClient(config) as client:` or call `aclose()`.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        hosts: RegistryHosts | None = None,
        auth: httpx.Auth | None = None,
        plain_http: bool = False,
        force_single_range: bool = False,
        monolithic_upload_limit: int = MONOLITHIC_UPLOAD_LIMIT,
        upload_chunk_size: int = UPLOAD_CHUNK_SIZE,
    ) -> None:
        config = config if config is not None else Config()
        if hosts is None:
            hosts = RegistryHosts(config, plain_http=plain_http)
        self._session = RegistrySession(config, hosts, auth)
        self._manifests = ManifestPuller(self._session)
        self._blobs = BlobPuller(self._session)
        self._ranges = RangeFetcher(self._session, force_single_range=force_single_range)
        self._push = Pusher(
            self._session,
            self._blobs,
            monolithic_limit=monolithic_upload_limit,
            chunk_size=max(1, upload_chunk_size),
        )
        self._referrers = ReferrersReader(self._session, self._manifests)

    def __repr__(self) -> str:
        return f"<RegistryClient endpoints={self._session.endpoint_count}>"

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
        await self._session.aclose()

    @property
    def hosts(self) -> RegistryHosts:
        """Where each registry's requests go (hosts.toml, mirrors)."""
        return self._session.hosts

    @property
    def ranges(self) -> RangeFetcher:
        """The range reader (what it learnt about each host's range support)."""
        return self._ranges

    # --- manifests ----------------------------------------------------------------------

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor of the manifest or index `ref` names (HEAD, GET when needed)."""
        return await self._manifests.resolve(ref)

    async def get_manifest(self, ref: Reference) -> tuple[Descriptor, bytes]:
        """Fetch the manifest or index `ref` names, verified against its digest."""
        return await self._manifests.get_manifest(ref)

    async def get_platform_manifest(
        self, ref: Reference, platform: Platform | None = None
    ) -> tuple[Descriptor, ImageManifest]:
        """The image manifest for `platform` (default: this host), through an index if needed.

        The descriptor is the index entry (with its platform) when `ref` names an index.
        """
        return await self._manifests.get_platform_manifest(ref, platform)

    # --- blobs --------------------------------------------------------------------------

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """The size of a blob (HEAD)."""
        return await self._blobs.blob_size(ref, digest)

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """True if the registry has the blob."""
        return await self._blobs.blob_exists(ref, digest)

    def fetch_blob(self, ref: Reference, digest: str) -> AsyncIterator[bytes]:
        """Stream a blob. Digest and size are verified after the last chunk: a consumer
        must not trust the bytes until iteration ends without `DigestMismatchError`.

        A connection lost mid-body is resumed with a Range request, within MaxRetries.
        """
        return self._blobs.fetch_blob(ref, digest)

    async def read_blob(self, ref: Reference, digest: str, *, max_size: int) -> bytes:
        """A whole verified blob of at most `max_size` bytes."""
        return await self._blobs.read_blob(ref, digest, max_size=max_size)

    # --- ranges -------------------------------------------------------------------------

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
        return await self._ranges.fetch_ranges(ref, digest, ranges, sink)

    # --- push ---------------------------------------------------------------------------

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
        return await self._push.push_blob(ref, digest, size, open_data, mount_from=mount_from)

    async def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> Descriptor:
        """PUT a manifest or index under `ref.object` (the digest if set, else the tag)."""
        self._manifests.cache.forget(ref)
        try:
            return await self._push.push_manifest(ref, data, media_type)
        finally:
            self._manifests.cache.forget(ref)

    # --- referrers ----------------------------------------------------------------------

    async def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of manifests whose subject is `subject_digest` (referrers API or the
        fallback tag), filtered by `artifact_type` when given."""
        return await self._referrers.referrers(ref, subject_digest, artifact_type)
