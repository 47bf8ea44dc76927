"""Publishing a recorded start as SOCI prefetch artifacts (`pysoci prefetch push`).

`prefetch_index` is pure: the image's SOCI index with one prefetch artifact per recorded
layer (its spans as runs in first-read order, annotated with the layer digest), listed after
the zTOCs in the index's layer order; the zTOCs, subject and annotations are kept, so the new
index differs from the old only by its prefetch descriptors. Layers recorded with another
zTOC than the index's are left out (their span ids mean nothing for it).

`publish` puts it in the image's repository: the artifacts, the `{}` config and the index;
then for a v2 index a new SOCI-enabled image (the platform manifest re-annotated with the new
index digest, the image index listing it and the new index) under a new tag, and for a v1
index a new referrer of the unchanged manifest, listed first under the referrers fallback tag
in place of the old index.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from snapshotter.content.discovery import FoundIndex, Modes, find_soci_index
from snapshotter.content.remote import referrers_fallback_tag
from snapshotter.errors import ContentNotFoundError, ManifestError, RegistryNotFoundError
from snapshotter.prefetch.artifact import LayerArtifact, artifact_for
from snapshotter.prefetch.record import ImageRecording
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.index import SociIndex

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 << 20


@dataclass
class PrefetchIndex:
    """A SOCI index with prefetch artifacts, and what was left out."""

    index: SociIndex
    artifacts: list[LayerArtifact]
    skipped: list[str] = field(default_factory=list)
    """Why recorded layers got no artifact."""


def prefetch_index(index: SociIndex, recording: ImageRecording) -> PrefetchIndex:
    """The index with the recording's spans as its prefetch artifacts."""
    by_layer = {layer.layer_digest: layer for layer in recording.layers}
    artifacts: list[LayerArtifact] = []
    skipped: list[str] = []
    for ztoc in index.ztocs:
        layer_digest = soci_index.layer_digest_of(ztoc)
        recorded = by_layer.pop(layer_digest, None)
        if recorded is None or not recorded.spans:
            continue
        if recorded.ztoc_digest != ztoc.digest:
            skipped.append(
                f"layer {layer_digest}: recorded with zTOC {recorded.ztoc_digest}, the index "
                f"has {ztoc.digest}"
            )
            continue
        artifacts.append(artifact_for(layer_digest, recorded.spans))
    skipped.extend(f"layer {d}: the index has no zTOC for it" for d in by_layer)
    return PrefetchIndex(index_with_prefetches(index, artifacts), artifacts, skipped)


def index_with_prefetches(index: SociIndex, artifacts: list[LayerArtifact]) -> SociIndex:
    """A copy of `index` whose prefetch descriptors are those of `artifacts`."""
    return SociIndex(
        version=index.version,
        ztocs=list(index.ztocs),
        prefetches=[a.descriptor for a in artifacts],
        subject=index.subject,
        annotations=dict(index.annotations),
    )


@dataclass(frozen=True)
class ResolvedImage:
    """The image `prefetch push` publishes for: its top object and its platform manifest."""

    ref: Reference
    top: oci.Descriptor
    top_raw: bytes
    manifest_desc: oci.Descriptor
    manifest_raw: bytes
    manifest: oci.ImageManifest
    found: FoundIndex


async def resolve_image(
    client: RegistryClient, ref: Reference, *, modes: Modes, platform: oci.Platform | None = None
) -> ResolvedImage:
    """The platform manifest of `ref` and the SOCI index it has (ContentNotFoundError when
    it has none: `pysoci convert` or `create`+`push` it first)."""
    top, top_raw = await client.get_manifest(ref)
    parsed = oci.parse_manifest(top_raw, media_type_hint=top.media_type)
    if isinstance(parsed, oci.ImageIndex):
        entry = oci.select_manifest(parsed, platform or oci.host_platform())
        desc, raw = await client.get_manifest(ref.with_digest(entry.digest))
        desc = oci.Descriptor(desc.media_type, desc.digest, desc.size, platform=entry.platform)
        manifest = oci.parse_manifest(raw, media_type_hint=desc.media_type)
    else:
        desc, raw, manifest = top, top_raw, parsed
    if not isinstance(manifest, oci.ImageManifest):
        raise ManifestError(f"{ref}: {desc.digest} is not an image manifest")
    found = await find_soci_index(client, ref, desc.digest, manifest, modes=modes)
    if found is None:
        raise ContentNotFoundError(
            f"{ref} ({desc.digest}) has no SOCI index: make one with `pysoci convert` (v2) or "
            "`pysoci create` and `pysoci push` (v1) first"
        )
    return ResolvedImage(ref, top, top_raw, desc, raw, manifest, found)


@dataclass(frozen=True)
class Published:
    """What `publish` pushed."""

    index: oci.Descriptor
    version: int
    image: Reference | None
    """v2: the new SOCI-enabled image; v1: None (the image is unchanged)."""
    image_digest: str = ""


def _opener(data: bytes) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        yield data

    return gen()


async def _push_bytes(client: RegistryClient, ref: Reference, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await client.push_blob(ref, digest, len(data), lambda: _opener(data))
    return digest


async def publish(
    client: RegistryClient, image: ResolvedImage, built: PrefetchIndex, dst: Reference | None
) -> Published:
    """Push the prefetch index and make it the image's (see the module docstring); `dst` is
    the new tag of a v2 image (in the same repository)."""
    ref = image.ref
    await _push_bytes(client, ref, soci_index.EMPTY_CONFIG_BYTES)
    for artifact in built.artifacts:
        await _push_bytes(client, ref, artifact.blob)
    data = built.index.to_json_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await client.push_manifest(ref.with_digest(digest), data, oci.MEDIA_TYPE_OCI_MANIFEST)
    index_desc = oci.Descriptor(
        oci.MEDIA_TYPE_OCI_MANIFEST, digest, len(data), artifact_type=built.index.artifact_type
    )
    if built.index.version == 1:
        await _list_referrer(client, image, index_desc, built.index)
        return Published(index_desc, 1, None)
    if dst is None:
        raise ManifestError("a SOCI v2 index needs a new image tag to be published under")
    if dst.registry != ref.registry or dst.repository != ref.repository:
        raise ManifestError(f"the new tag must be in {ref.registry}/{ref.repository}, not {dst}")
    rewritten = soci_index.soci_enable_manifest(image.manifest, digest)
    mraw = rewritten.to_json_bytes()
    mdigest = "sha256:" + hashlib.sha256(mraw).hexdigest()
    await client.push_manifest(ref.with_digest(mdigest), mraw, oci.MEDIA_TYPE_OCI_MANIFEST)
    parsed_top = oci.parse_manifest(image.top_raw, media_type_hint=image.top.media_type)
    if not isinstance(parsed_top, oci.ImageIndex):
        pushed = await client.push_manifest(dst, mraw, oci.MEDIA_TYPE_OCI_MANIFEST)
        return Published(index_desc, 2, dst, pushed.digest)
    platform = image.manifest_desc.platform or oci.host_platform()
    new_top = soci_index.add_index_to_image_index(
        parsed_top,
        image.manifest_desc,
        oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, mdigest, len(mraw), platform=platform),
        index_desc,
        platform,
    )
    pushed = await client.push_manifest(dst, new_top.to_json_bytes(), oci.MEDIA_TYPE_OCI_INDEX)
    return Published(index_desc, 2, dst, pushed.digest)


async def _list_referrer(
    client: RegistryClient, image: ResolvedImage, index_desc: oci.Descriptor, idx: SociIndex
) -> None:
    """The new v1 index first under the referrers fallback tag, the old one dropped (a
    registry with the referrers API lists both: it derives them from their subject)."""
    ref, subject = image.ref, image.manifest_desc.digest
    tag_ref = Reference(ref.registry, ref.repository, referrers_fallback_tag(subject), None)
    drop = {index_desc.digest, image.found.descriptor.digest}
    entries: list[oci.Descriptor] = []
    try:
        _, raw = await client.get_manifest(tag_ref)
        existing = oci.parse_manifest(raw)
        if isinstance(existing, oci.ImageIndex):
            entries = [d for d in existing.manifests if d.digest not in drop]
    except RegistryNotFoundError:
        pass
    entry = oci.Descriptor(
        oci.MEDIA_TYPE_OCI_MANIFEST,
        index_desc.digest,
        index_desc.size,
        artifact_type=idx.artifact_type,
        annotations=dict(idx.annotations),
    )
    listing = oci.ImageIndex(manifests=[entry, *entries]).to_json_bytes()
    await client.push_manifest(tag_ref, listing, oci.MEDIA_TYPE_OCI_INDEX)
