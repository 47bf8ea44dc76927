"""Moving images and SOCI artifacts between a registry and the local content store.

`pull` copies what index building needs (manifests, configs and the layers that can get a
zTOC) into the local OCI layout; `push_soci_index` publishes an index and its zTOCs (v1 also
under the referrers fallback tag); `push_image` publishes a converted image, mounting or
streaming the layers it shares with the original.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from snapshotter.content.indexing import LayerProgress
from snapshotter.content.layout import OciLayout
from snapshotter.errors import ManifestError, RegistryNotFoundError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 << 20
ProgressCallback = Callable[[LayerProgress], None]


def referrers_fallback_tag(subject_digest: str) -> str:
    """The tag that lists referrers on registries without the referrers API."""
    algorithm, _, encoded = subject_digest.partition(":")
    return f"{algorithm}-{encoded}"


@dataclass
class RemoteStore:
    """A registry client and the local store it fills and publishes from."""

    client: RegistryClient
    store: OciLayout
    progress: ProgressCallback | None = None
    parallel: int = 4

    # -- pull ------------------------------------------------------------------------------

    async def pull(
        self,
        ref: Reference,
        *,
        platforms: tuple[oci.Platform, ...] = (),
        all_platforms: bool = False,
        want_layer: Callable[[oci.Descriptor], bool] = lambda _d: True,
    ) -> oci.Descriptor:
        """Copy `ref` into the local store (tagged with its full name); return its descriptor.

        Only the chosen platforms' manifests and configs, and their layers `want_layer`
        accepts, are fetched; an image index is stored whole (its raw bytes).
        """
        top, raw = await self.client.get_manifest(ref)
        self.store.write_blob(raw)
        parsed = oci.parse_manifest(raw, media_type_hint=top.media_type)
        if isinstance(parsed, oci.ImageIndex):
            if all_platforms:
                chosen = [
                    d
                    for d in parsed.manifests
                    if d.artifact_type not in soci_index.SOCI_INDEX_ARTIFACT_TYPES.values()
                    and oci.ANNOTATION_DOCKER_REFERENCE_TYPE not in d.annotations
                ]
            else:
                wanted = platforms or (oci.host_platform(),)
                chosen = [oci.select_manifest(parsed, p) for p in wanted]
        else:
            chosen = [top]
        layers: dict[str, oci.Descriptor] = {}
        for desc in chosen:
            if desc.digest == top.digest:
                manifest = parsed
            else:
                _, mraw = await self.client.get_manifest(ref.with_digest(desc.digest))
                self.store.write_blob(mraw)
                manifest = oci.parse_manifest(mraw, media_type_hint=desc.media_type)
            if not isinstance(manifest, oci.ImageManifest):
                raise ManifestError(f"{ref}: {desc.digest} is not an image manifest")
            config = await self.client.read_blob(ref, manifest.config.digest, max_size=MAX_MANIFEST)
            self.store.write_blob(config)
            for layer in manifest.layers:
                if want_layer(layer) and not self.store.has_blob(layer.digest):
                    layers[layer.digest] = layer
        await self._fetch_layers(ref, list(layers.values()))
        self.store.set_tag(str(ref), top)
        return top

    async def _fetch_layers(self, ref: Reference, layers: list[oci.Descriptor]) -> None:
        limiter = trio.CapacityLimiter(self.parallel)

        async def fetch(layer: oci.Descriptor) -> None:
            async with limiter:
                with self.store.blob_writer(layer.digest) as writer:
                    async for chunk in self.client.fetch_blob(ref, layer.digest):
                        writer.write(chunk)
                        if self.progress:
                            self.progress(LayerProgress(layer.digest, writer.size, layer.size))
                    writer.commit()

        async with trio.open_nursery() as nursery:
            for layer in layers:
                nursery.start_soon(fetch, layer)

    # -- push ------------------------------------------------------------------------------

    def _local_blob(self, digest: str) -> Callable[[], AsyncIterator[bytes]]:
        async def read() -> AsyncIterator[bytes]:
            with self.store.open_blob(digest) as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return read

    async def _push_blobs(
        self, dst: Reference, blobs: list[oci.Descriptor], source: Reference | None = None
    ) -> None:
        """Push blobs: from the local store when present, else mounted or streamed from `source`."""
        limiter = trio.CapacityLimiter(self.parallel)
        same_registry = source is not None and source.registry == dst.registry

        async def push(desc: oci.Descriptor) -> None:
            async with limiter:
                if self.store.has_blob(desc.digest):
                    opener = self._local_blob(desc.digest)
                elif source is not None:
                    src = source

                    def opener() -> AsyncIterator[bytes]:
                        return self.client.fetch_blob(src, desc.digest)
                else:
                    raise RegistryNotFoundError(f"blob {desc.digest} is not in the local store")
                await self.client.push_blob(
                    dst,
                    desc.digest,
                    desc.size,
                    opener,
                    mount_from=source.repository if same_registry and source else None,
                )

        unique = list({d.digest: d for d in blobs}.values())
        async with trio.open_nursery() as nursery:
            for desc in unique:
                nursery.start_soon(push, desc)

    async def push_soci_index(self, dst: Reference, index_desc: oci.Descriptor) -> None:
        """Publish a SOCI index (zTOCs, the `{}` config, the manifest by digest).

        A v1 index is also listed under the referrers fallback tag `sha256-<subject hex>`
        (merged with what the tag already lists), which is how registries without the
        referrers API expose it and how they are asked for it.
        """
        raw = self.store.read_blob(index_desc.digest, max_size=MAX_MANIFEST)
        idx = soci_index.parse_soci_index(raw)
        self.store.write_blob(soci_index.EMPTY_CONFIG_BYTES)
        config = oci.Descriptor(
            idx.artifact_type, soci_index.EMPTY_CONFIG_DIGEST, len(soci_index.EMPTY_CONFIG_BYTES)
        )
        await self._push_blobs(dst, [config, *idx.ztocs, *idx.prefetches])
        await self.client.push_manifest(
            dst.with_digest(index_desc.digest), raw, oci.MEDIA_TYPE_OCI_MANIFEST
        )
        if idx.version == 1 and idx.subject is not None:
            await self._add_to_referrers_tag(dst, idx.subject.digest, index_desc, idx)

    async def _add_to_referrers_tag(
        self,
        dst: Reference,
        subject_digest: str,
        index_desc: oci.Descriptor,
        idx: soci_index.SociIndex,
    ) -> None:
        tag_ref = Reference(
            dst.registry, dst.repository, referrers_fallback_tag(subject_digest), None
        )
        entries: list[oci.Descriptor] = []
        try:
            _, raw = await self.client.get_manifest(tag_ref)
            existing = oci.parse_manifest(raw)
            if isinstance(existing, oci.ImageIndex):
                entries = [d for d in existing.manifests if d.digest != index_desc.digest]
        except RegistryNotFoundError:
            pass
        entries.append(
            oci.Descriptor(
                oci.MEDIA_TYPE_OCI_MANIFEST,
                index_desc.digest,
                index_desc.size,
                artifact_type=idx.artifact_type,
                annotations=dict(idx.annotations),
            )
        )
        listing = oci.ImageIndex(manifests=entries).to_json_bytes()
        await self.client.push_manifest(tag_ref, listing, oci.MEDIA_TYPE_OCI_INDEX)

    async def push_image(
        self, top: oci.Descriptor, dst: Reference, source: Reference | None = None
    ) -> oci.Descriptor:
        """Publish an image from the local store (index or manifest) under `dst`'s tag.

        Every blob it references is pushed from the local store, or mounted/streamed from
        `source` (the image it was converted from) when not stored locally.
        """
        raw = self.store.read_blob(top.digest, max_size=MAX_MANIFEST)
        parsed = oci.parse_manifest(raw, media_type_hint=top.media_type)
        manifests: list[tuple[oci.Descriptor, bytes]] = []
        if isinstance(parsed, oci.ImageIndex):
            for d in parsed.manifests:
                if not self.store.has_blob(d.digest):
                    # A platform that was not converted: copy it as it is from the source.
                    if source is None:
                        raise RegistryNotFoundError(
                            f"{d.digest} listed by {top.digest} is not in the local store"
                        )
                    _, mraw = await self.client.get_manifest(source.with_digest(d.digest))
                    self.store.write_blob(mraw)
                manifests.append((d, self.store.read_blob(d.digest, max_size=MAX_MANIFEST)))
        else:
            manifests.append((top, raw))
        for desc, mraw in manifests:
            manifest = oci.parse_manifest(mraw, media_type_hint=desc.media_type)
            if not isinstance(manifest, oci.ImageManifest):
                raise ManifestError(f"{desc.digest} is not an image manifest")
            if manifest.config.media_type in soci_index.SOCI_INDEX_ARTIFACT_TYPES.values():
                await self.push_soci_index(dst, desc)
                continue
            await self._push_blobs(dst, [manifest.config, *manifest.layers], source)
            await self.client.push_manifest(dst.with_digest(desc.digest), mraw, desc.media_type)
        pushed = await self.client.push_manifest(dst, raw, top.media_type)
        log.info("pushed %s as %s", top.digest, dst)
        return pushed
