"""Pulling manifests: resolve a reference, fetch a manifest or index, pick a platform's manifest.

Manifests are capped at 4 MiB and checked against the digest that names them (the reference's,
else the registry's `Docker-Content-Digest`).

Manifests read are kept a short while (`ManifestCache`): a lazy pull prepares each layer of an
image in turn, and each Prepare looks up the same tag, platform manifest and SOCI index again
(measured with ctr-remote and a four-layer image: 12 manifest GETs instead of 3). A tag's answer
is reused for TAG_CACHE_SECONDS, a manifest named by digest (immutable) for DIGEST_CACHE_SECONDS,
within MANIFEST_CACHE_BYTES; concurrent reads of the same manifest share one request.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import anyio
import httpx

from snapshotter import metrics
from snapshotter.errors import DigestMismatchError, ManifestError, RegistryResponseError
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.reference import Reference
from snapshotter.registry.session import RegistrySession
from snapshotter.registry.transport import is_retryable_status
from snapshotter.registry.wire import (
    check_encoding,
    content_length,
    content_type,
    hash_matches,
    read_body,
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
    host_platform,
    parse_manifest,
    select_manifest,
    sha256_digest,
    validate_digest,
)

MAX_MANIFEST_SIZE = DEFAULT_MAX_MANIFEST_SIZE
MAX_INDEX_DEPTH = 2
TAG_CACHE_SECONDS = 10.0
DIGEST_CACHE_SECONDS = 600.0
MANIFEST_CACHE_BYTES = 16 * 1024 * 1024

_Key = tuple[str, str, str]

MANIFEST_ACCEPT = ", ".join(
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    ]
)


class ManifestCache:
    """Manifests by (registry, repository, tag or digest), each until it expires, least
    recently used dropped first beyond MANIFEST_CACHE_BYTES."""

    def __init__(self) -> None:
        self._entries: OrderedDict[_Key, tuple[float, Descriptor, bytes]] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    @staticmethod
    def key(ref: Reference) -> _Key:
        """What a manifest is filed under (access stays per repository)."""
        return (ref.registry, ref.repository, ref.object)

    def get(self, ref: Reference) -> tuple[Descriptor, bytes] | None:
        """The cached answer for `ref`, if it has not expired."""
        key = self.key(ref)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1], entry[2]

    def put(self, ref: Reference, desc: Descriptor, data: bytes) -> None:
        """Keep an answer: a tag's for TAG_CACHE_SECONDS, a digest's for DIGEST_CACHE_SECONDS."""
        seconds = DIGEST_CACHE_SECONDS if ref.digest is not None else TAG_CACHE_SECONDS
        key = self.key(ref)
        self._drop(key)
        self._entries[key] = (time.monotonic() + seconds, desc, data)
        self._bytes += len(data)
        while self._bytes > MANIFEST_CACHE_BYTES and self._entries:
            self._drop(next(iter(self._entries)))

    def forget(self, ref: Reference) -> None:
        """Drop what is cached for `ref` (it was just pushed)."""
        self._drop(self.key(ref))

    def _drop(self, key: _Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[2])


class ManifestPuller:
    """Manifest and index reads of one `RegistryClient`."""

    def __init__(self, session: RegistrySession) -> None:
        self._session = session
        self.cache = ManifestCache()
        self._inflight: dict[_Key, anyio.Event] = {}

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor of the manifest or index `ref` names (HEAD, GET when needed)."""
        cached = self.cache.get(ref)
        if cached is not None:
            return cached[0]
        what = f"manifest {ref}"

        async def head(endpoint: Endpoint) -> Descriptor | None:
            client = self._session.client_for(endpoint)
            url = self._session.url(endpoint, ref, "manifests", ref.object)
            headers = {**endpoint.headers, "Accept": MANIFEST_ACCEPT}
            response = await self._session.send(client, "HEAD", url, headers=headers)
            await response.aclose()
            status = response.status_code
            if status in (401, 403, 404) or is_retryable_status(status):
                # (A 5xx was retried already: asking the same host with a GET would not help.)
                await self._session.fail(response, what)
            if response.status_code != 200:
                return None  # the GET gives the registry's error body
            media_type = content_type(response)
            length = content_length(response, what)
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
            desc = await self._session.retrying(what, endpoint, lambda: head(endpoint))
            if desc is None:
                desc, _ = await self._get_manifest_on(endpoint, ref)
            return desc

        return await self._session.with_endpoints(ref, "resolve", what, op)

    async def get_manifest(self, ref: Reference) -> tuple[Descriptor, bytes]:
        """Fetch the manifest or index `ref` names, verified against its digest (or the copy
        read a moment ago: see the module docstring)."""
        key = self.cache.key(ref)
        while True:
            cached = self.cache.get(ref)
            if cached is not None:
                return cached
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()  # then the cache has it, or that read failed: try ourselves
        done = self._inflight[key] = anyio.Event()
        try:
            capability = "pull" if ref.digest is not None else "resolve"
            desc, data = await self._session.with_endpoints(
                ref, capability, f"manifest {ref}", lambda ep: self._get_manifest_on(ep, ref)
            )
            self.cache.put(ref, desc, data)
            return desc, data
        finally:
            del self._inflight[key]
            done.set()

    async def _get_manifest_on(
        self, endpoint: Endpoint, ref: Reference
    ) -> tuple[Descriptor, bytes]:
        what = f"manifest {ref}"

        async def once() -> tuple[httpx.Headers, bytes]:
            client = self._session.client_for(endpoint)
            url = self._session.url(endpoint, ref, "manifests", ref.object)
            headers = {**endpoint.headers, "Accept": MANIFEST_ACCEPT}
            response = await self._session.send(client, "GET", url, headers=headers)
            try:
                if response.status_code != 200:
                    await self._session.fail(response, what)
                check_encoding(response, what)
                return response.headers, await read_body(response, MAX_MANIFEST_SIZE, what)
            finally:
                await response.aclose()

        headers, data = await self._session.retrying(what, endpoint, once)
        return self._manifest_descriptor(ref, headers, data), data

    def _manifest_descriptor(
        self, ref: Reference, headers: httpx.Headers, data: bytes
    ) -> Descriptor:
        what = f"manifest {ref}"
        digest = ref.digest
        if digest is not None and not hash_matches(data, digest):
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
            if not hash_matches(data, header):
                metrics.registry_error("digest_mismatch")
                raise DigestMismatchError(
                    f"{what}: the content does not match the registry's digest {header}"
                )
            digest = digest or header
        if digest is None:
            digest = sha256_digest(data)
        header_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        parsed = parse_manifest(data, media_type_hint=header_type, max_size=MAX_MANIFEST_SIZE)
        media_type = parsed.media_type
        if not media_type:
            if header_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES:
                media_type = header_type
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
