"""Finding an image's SOCI index and zTOCs, in soci's order.

1. an explicit index digest (a label, or `--soci-index-digest`);
2. v2: the `com.amazon.soci.index-digest` annotation of the image manifest;
3. v1: the referrers API for the manifest, falling back to the `sha256-<hex>` tag;
4. the local content store (indexes built here with `pysoci create`).
No index means the image is not lazy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from snapshotter.content.indexing import iter_soci_index_descriptors
from snapshotter.content.layout import OciLayout
from snapshotter.errors import ContentNotFoundError, FormatError, RegistryError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.ztoc import Ztoc, decode_ztoc

log = logging.getLogger(__name__)

MAX_INDEX = 4 << 20
MAX_ZTOC = 1 << 30


@dataclass(frozen=True)
class FoundIndex:
    """A SOCI index and how it was found."""

    descriptor: oci.Descriptor
    index: soci_index.SociIndex
    source: str
    """explicit, v2-annotation, referrers or local."""


@dataclass(frozen=True)
class Modes:
    """Which ways of finding an index are enabled (soci: `[pull_modes.soci_v1|v2] enable`)."""

    v1: bool = True
    v2: bool = True


async def _from_registry(
    client: RegistryClient, ref: Reference, digest: str
) -> tuple[oci.Descriptor, soci_index.SociIndex]:
    desc, raw = await client.get_manifest(ref.with_digest(digest))
    return desc, soci_index.parse_soci_index(raw)


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
    """The SOCI index for the platform manifest `manifest_digest` of `ref`, or None."""
    if explicit_digest:
        desc, idx = await _from_registry(client, ref, explicit_digest)
        return FoundIndex(desc, idx, "explicit")
    if modes.v2:
        digest = soci_index.find_soci_index_digest(manifest)
        if digest:
            desc, idx = await _from_registry(client, ref, digest)
            return FoundIndex(desc, idx, "v2-annotation")
    if modes.v1:
        try:
            referrers = await client.referrers(ref, manifest_digest, soci_index.SOCI_INDEX_V1)
        except RegistryError as e:
            log.info("no referrers for %s@%s: %s", ref, manifest_digest, e)
            referrers = []
        for desc in referrers:
            try:
                _, idx = await _from_registry(client, ref, desc.digest)
            except (RegistryError, FormatError) as e:
                log.warning("skipping SOCI index %s of %s: %s", desc.digest, ref, e)
                continue
            if idx.subject is None or idx.subject.digest == manifest_digest:
                return FoundIndex(desc, idx, "referrers")
    if store is not None:
        for desc, idx in iter_soci_index_descriptors(store):
            if idx.subject is not None and idx.subject.digest == manifest_digest:
                return FoundIndex(desc, idx, "local")
    return None


def _desc(digest: str, idx: soci_index.SociIndex) -> oci.Descriptor:
    raw = idx.to_json_bytes()
    return oci.Descriptor(
        oci.MEDIA_TYPE_OCI_MANIFEST, digest, len(raw), artifact_type=idx.artifact_type
    )


async def fetch_ztoc(
    client: RegistryClient,
    ref: Reference,
    desc: oci.Descriptor,
    *,
    store: OciLayout | None = None,
) -> Ztoc:
    """A zTOC by descriptor: from the local store when there, else the registry (then stored)."""
    if desc.size > MAX_ZTOC:
        raise FormatError(f"zTOC {desc.digest} claims {desc.size} bytes, over {MAX_ZTOC}")
    if store is not None:
        try:
            return decode_ztoc(store.read_blob(desc.digest, max_size=MAX_ZTOC))
        except ContentNotFoundError:
            pass
    data = await client.read_blob(ref, desc.digest, max_size=max(desc.size, 1))
    if store is not None:
        store.write_blob(data)
    return decode_ztoc(data)
