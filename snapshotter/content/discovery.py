"""Finding an image's SOCI index and zTOCs, in soci's order.

1. an explicit index digest (a label, or `--soci-index-digest`);
2. v2: the `com.amazon.soci.index-digest` annotation of the image manifest;
3. v1: the referrers API for the manifest, falling back to the `sha256-<hex>` tag;
4. the local content store (v1 indexes built here with `pysoci create`).
No index means the image is not lazy. An index named by digest (1, 2) is read from the local
store when it holds it, and a zTOC too: both are content-addressed, so a local copy is the
same bytes, and an index that was built here but never pushed still works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from snapshotter.content.indexing import iter_soci_index_descriptors
from snapshotter.content.layout import OciLayout
from snapshotter.errors import ContentNotFoundError, FormatError, RegistryError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.ztoc import DEFAULT_MAX_ENTRIES, Ztoc, decode_ztoc

log = logging.getLogger(__name__)

MAX_INDEX = 4 << 20
MAX_ZTOC = 1 << 30


@dataclass(frozen=True)
class FoundIndex:
    """A SOCI index and how it was found."""

    descriptor: oci.Descriptor
    index: soci_index.SociIndex
    source: str
    """explicit, v2-annotation, referrers or local; the first two end in " (local)" when the
    index was read from the local store."""


@dataclass(frozen=True)
class Modes:
    """Which ways of finding an index are enabled (soci: `[pull_modes.soci_v1|v2] enable`)."""

    v1: bool = True
    v2: bool = True
    local: bool = True
    """v1 indexes found in the local content store (`pysoci create`), with v1 on."""


async def _index_by_digest(
    client: RegistryClient, ref: Reference, digest: str, store: OciLayout | None
) -> tuple[oci.Descriptor, soci_index.SociIndex, bool]:
    """The index manifest `digest`: from the local store when it holds it (content-addressed,
    so a local copy is as good as the registry's), else from the registry. The flag says
    whether it was local."""
    if store is not None:
        try:
            raw = store.read_blob(digest, max_size=MAX_INDEX)
        except ContentNotFoundError:
            pass
        else:
            idx = soci_index.parse_soci_index(raw)
            desc = oci.Descriptor(
                oci.MEDIA_TYPE_OCI_MANIFEST, digest, len(raw), artifact_type=idx.artifact_type
            )
            return desc, idx, True
    desc, raw = await client.get_manifest(ref.with_digest(digest))
    return desc, soci_index.parse_soci_index(raw), False


def _local_index(
    store: OciLayout, manifest_digest: str
) -> tuple[oci.Descriptor, soci_index.SociIndex] | None:
    """A v1 index in the local store whose subject is `manifest_digest` (`pysoci create`)."""
    try:
        for desc, idx in iter_soci_index_descriptors(store):
            if idx.subject is not None and idx.subject.digest == manifest_digest:
                return desc, idx
    except (FormatError, ContentNotFoundError, OSError) as e:
        log.warning("local content store %s is unreadable (%s); not using it", store.root, e)
    return None


async def find_soci_index(
    client: RegistryClient,
    ref: Reference,
    manifest_digest: str,
    manifest: oci.ImageManifest,
    *,
    explicit_digest: str | None = None,
    modes: Modes = Modes(),
    store: OciLayout | None = None,
) -> FoundIndex | None:
    """The SOCI index for the platform manifest `manifest_digest` of `ref`, or None.

    `store` is the local content store: indexes named by digest are read from it when it holds
    them, and it is the last place looked (v1 indexes whose subject is the manifest).
    """
    if explicit_digest:
        desc, idx, local = await _index_by_digest(client, ref, explicit_digest, store)
        return FoundIndex(desc, idx, "explicit (local)" if local else "explicit")
    digest = soci_index.find_soci_index_digest(manifest)
    if digest and not modes.v2:
        log.info(
            "ignoring the SOCI index %s that %s@%s names: v2 indexes are not trusted "
            "([pull_modes.soci_v2] enable = false)",
            digest,
            ref,
            manifest_digest,
        )
    if modes.v2 and digest:
        desc, idx, local = await _index_by_digest(client, ref, digest, store)
        return FoundIndex(desc, idx, "v2-annotation (local)" if local else "v2-annotation")
    if modes.v1:
        try:
            referrers = await client.referrers(ref, manifest_digest, soci_index.SOCI_INDEX_V1)
        except RegistryError as e:
            log.info("no referrers for %s@%s: %s", ref, manifest_digest, e)
            referrers = []
        for desc in referrers:
            try:
                _, idx, _ = await _index_by_digest(client, ref, desc.digest, None)
            except (RegistryError, FormatError) as e:
                log.warning("skipping SOCI index %s of %s: %s", desc.digest, ref, e)
                continue
            if idx.subject is None or idx.subject.digest == manifest_digest:
                return FoundIndex(desc, idx, "referrers")
        # The local store holds v1 indexes (`pysoci create`), so v1 mode governs it too.
        if store is not None:
            found = _local_index(store, manifest_digest)
            if found is not None and modes.local:
                return FoundIndex(found[0], found[1], "local")
            if found is not None:
                log.info(
                    "ignoring the SOCI index %s of %s@%s in the local content store: it is "
                    "not trusted ([pull_modes.local_store] enable = false)",
                    found[0].digest,
                    ref,
                    manifest_digest,
                )
    else:
        log.info(
            "not looking for SOCI index v1 referrers of %s@%s: they are not trusted "
            "([pull_modes.soci_v1] enable = false)",
            ref,
            manifest_digest,
        )
    return None


async def fetch_ztoc(
    client: RegistryClient,
    ref: Reference,
    desc: oci.Descriptor,
    *,
    store: OciLayout | None = None,
    local: OciLayout | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Ztoc:
    """A zTOC by descriptor, from the first place that has it: `store` (where fetched zTOCs
    are kept), `local` (a read-only content store, such as the one `pysoci create` fills,
    whose index may exist nowhere else), the registry. What `store` lacked is written to it.

    It is decoded in a worker thread (a big zTOC must not stall the FUSE requests that the
    trio thread serves); more than `max_entries` entries is a ZtocTooLargeError."""

    async def decode(blob: bytes) -> Ztoc:
        return await trio.to_thread.run_sync(lambda: decode_ztoc(blob, max_entries=max_entries))

    if desc.size > MAX_ZTOC:
        raise FormatError(f"zTOC {desc.digest} claims {desc.size} bytes, over {MAX_ZTOC}")
    data: bytes | None = None
    for source in (store, local):
        if source is None:
            continue
        try:
            data = source.read_blob(desc.digest, max_size=MAX_ZTOC)
        except ContentNotFoundError:
            continue
        if source is store:
            return await decode(data)
        break
    if data is None:
        data = await client.read_blob(ref, desc.digest, max_size=max(desc.size, 1))
    ztoc = await decode(data)
    if store is not None:
        store.write_blob(data)
    return ztoc
