"""From what containerd (or `pysoci mount`) names to what each layer needs.

`parse_labels` turns Prepare labels into a `LayerRequest`; `ImageResolver` finds the platform
manifest, the diff IDs and the SOCI index of an image (cached for the minutes one pull takes,
every layer of the image asks); `plan_layer` says how one layer is served: lazily, with the
`LayerSpec` the data plane needs, or unpacked here, with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from snapshotter import labels
from snapshotter.content.discovery import FoundIndex, Modes, find_soci_index
from snapshotter.content.layout import OciLayout
from snapshotter.errors import ManifestError, PysociError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.remote.spec import LayerSpec, layer_id
from snapshotter.soci import oci
from snapshotter.soci.index import SOCI_INDEX_ARTIFACT_TYPES

log = logging.getLogger(__name__)

IMAGE_TTL: Final = 600.0
"""Seconds an image's manifest and index stay cached (its layers are prepared in one pull)."""
MAX_IMAGES: Final = 64
MAX_CONFIG: Final = 4 << 20


class LayerNotInImageError(ManifestError):
    """The labels name a layer that the image they name does not have (another repository's
    layer, a stale manifest digest): nothing to serve lazily."""


@dataclass(frozen=True)
class LayerRequest:
    """The image and layer a Prepare's labels name."""

    ref: Reference
    layer_digest: str
    manifest_digest: str | None = None
    index_digest: str | None = None


def parse_labels(values: Mapping[str, str]) -> LayerRequest | None:
    """The layer request in Prepare labels; None when they do not name one (not lazy).

    Malformed values raise typed errors (the caller logs them and lets containerd unpack).
    """
    if labels.TARGET not in values:
        return None
    image = values.get(labels.CRI_IMAGE_REF) or values.get(labels.STARGZ_REFERENCE)
    layer = values.get(labels.CRI_LAYER_DIGEST) or values.get(labels.STARGZ_DIGEST)
    if not image or not layer:
        return None
    manifest = values.get(labels.CRI_MANIFEST_DIGEST) or None
    index = values.get(labels.SOCI_INDEX_DIGEST) or None
    return LayerRequest(
        ref=parse_reference(image),
        layer_digest=oci.validate_digest(layer),
        manifest_digest=oci.validate_digest(manifest) if manifest else None,
        index_digest=oci.validate_digest(index) if index else None,
    )


@dataclass(frozen=True)
class ResolvedImage:
    """What one image's layers share: its platform manifest, diff IDs and SOCI index."""

    ref: Reference
    manifest_digest: str
    manifest: oci.ImageManifest
    diff_ids: list[str]
    index: FoundIndex | None
    loaded_at: float = 0.0

    def position(self, layer_digest: str) -> int:
        """The layer's position in the manifest; LayerNotInImageError when absent."""
        for i, layer in enumerate(self.manifest.layers):
            if layer.digest == layer_digest:
                return i
        raise LayerNotInImageError(
            f"layer {layer_digest} is not in image {self.ref} (manifest {self.manifest_digest})"
        )


@dataclass(frozen=True)
class LayerPlan:
    """How one layer of a resolved image is served."""

    layer: oci.Descriptor
    diff_id: str
    spec: LayerSpec | None
    """Set when the layer can be served lazily."""
    local_reason: str = ""
    """Why not, otherwise."""


def plan_layer(image: ResolvedImage, position: int) -> LayerPlan:
    """Lazy when the image's index has a zTOC for the layer, local otherwise."""
    layer = image.manifest.layers[position]
    diff_id = image.diff_ids[position]
    if image.index is None:
        return LayerPlan(layer, diff_id, None, "no SOCI index")
    ztoc = image.index.index.ztoc_for_layer(layer.digest)
    if ztoc is None:
        return LayerPlan(layer, diff_id, None, "no zTOC for this layer")
    prefetch = image.index.index.prefetch_for_layer(layer.digest)
    spec = LayerSpec(
        layer_id=layer_id(layer.digest, ztoc.digest),
        layer_digest=layer.digest,
        layer_size=layer.size,
        ztoc_digest=ztoc.digest,
        ztoc_size=ztoc.size,
        image_ref=str(image.ref),
        diff_id=diff_id,
        manifest_digest=image.manifest_digest,
        index_digest=image.index.descriptor.digest,
        index_source=image.index.source,
        prefetch_digest=prefetch.digest if prefetch is not None else "",
        prefetch_size=prefetch.size if prefetch is not None else 0,
    )
    return LayerPlan(layer, diff_id, spec)


class ImageResolver:
    """Resolves images through the registry (and the local content store), with a cache."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        modes: Modes | None = None,
        local_store_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.modes = modes or Modes()
        self.local_store_dir = local_store_dir
        """`ROOT/content`: the content store `pysoci create --root ROOT` fills (read only)."""
        self._images: dict[tuple[str, str], ResolvedImage] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    def local_store(self) -> OciLayout | None:
        """`ROOT/content` when it is a content store (looked at on each use: `pysoci create`
        may make it while the daemon runs)."""
        path = self.local_store_dir
        if path is None or not (path / "oci-layout").exists():
            return None
        try:
            return OciLayout.open(path)
        except PysociError as e:
            log.warning("local content store %s is unusable (%s); not using it", path, e)
            return None

    def forget(self) -> None:
        """Drop every cached image (nothing is being pulled)."""
        self._images.clear()
        self._locks = {k: v for k, v in self._locks.items() if v.locked()}

    async def for_request(self, request: LayerRequest) -> ResolvedImage:
        """The image holding the requested layer (cached: every layer of an image asks)."""
        key = (str(request.ref), request.manifest_digest or request.layer_digest)
        image = await self._cached(key, lambda: self._load_for_request(request))
        image.position(request.layer_digest)
        return image

    async def for_platform(
        self,
        ref: Reference,
        platform: oci.Platform | None = None,
        *,
        index_digest: str | None = None,
    ) -> ResolvedImage:
        """The image `ref` for `platform` (the host's by default), not cached."""
        manifest_desc, manifest = await self.client.get_platform_manifest(ref, platform)
        return await self._complete(ref, manifest_desc.digest, manifest, index_digest)

    async def _cached(
        self, key: tuple[str, str], load: Callable[[], Awaitable[ResolvedImage]]
    ) -> ResolvedImage:
        self._expire()
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            image = self._images.get(key)
            if image is None:
                image = await load()
                self._images[key] = image
            return image

    def _expire(self) -> None:
        now = time.monotonic()
        for key, image in list(self._images.items()):
            if now - image.loaded_at > IMAGE_TTL or len(self._images) > MAX_IMAGES:
                del self._images[key]
        for key, lock in list(self._locks.items()):
            if (
                key not in self._images
                and not lock.locked()
                and not lock.statistics().tasks_waiting
            ):
                del self._locks[key]

    async def _load_for_request(self, request: LayerRequest) -> ResolvedImage:
        digest, manifest = await self._manifest_holding(request)
        return await self._complete(request.ref, digest, manifest, request.index_digest)

    async def _complete(
        self,
        ref: Reference,
        manifest_digest: str,
        manifest: oci.ImageManifest,
        index_digest: str | None,
    ) -> ResolvedImage:
        config = await self.client.read_blob(ref, manifest.config.digest, max_size=MAX_CONFIG)
        found = await find_soci_index(
            self.client,
            ref,
            manifest_digest,
            manifest,
            explicit_digest=index_digest,
            modes=self.modes,
            store=self.local_store(),
        )
        if found is None:
            log.info("image %s (%s) has no SOCI index", ref, manifest_digest)
        else:
            log.info(
                "image %s (%s): SOCI index %s, found by %s",
                ref,
                manifest_digest,
                found.descriptor.digest,
                found.source,
            )
        return ResolvedImage(
            ref,
            manifest_digest,
            manifest,
            oci.image_diff_ids(config, len(manifest.layers)),
            found,
            time.monotonic(),
        )

    async def _manifest_holding(self, request: LayerRequest) -> tuple[str, oci.ImageManifest]:
        """The platform manifest holding the layer (ctr-remote sends no manifest digest);
        LayerNotInImageError when none does."""
        ref = (
            request.ref.with_digest(request.manifest_digest)
            if request.manifest_digest
            else request.ref
        )
        desc, raw = await self.client.get_manifest(ref)
        parsed = oci.parse_manifest(raw, media_type_hint=desc.media_type)
        if isinstance(parsed, oci.ImageManifest):
            if not _has_layer(parsed, request.layer_digest):
                raise LayerNotInImageError(
                    f"layer {request.layer_digest} is not in image {request.ref} "
                    f"(manifest {desc.digest})"
                )
            return desc.digest, parsed
        candidates = [
            d
            for d in parsed.manifests
            if d.artifact_type not in SOCI_INDEX_ARTIFACT_TYPES.values()
            and oci.ANNOTATION_DOCKER_REFERENCE_TYPE not in d.annotations
        ]
        try:  # the host's platform first: that is what containerd pulls
            preferred = oci.select_manifest(parsed, oci.host_platform())
            candidates.sort(key=lambda d: d.digest != preferred.digest)
        except ManifestError:
            pass
        for d in candidates:
            _, mraw = await self.client.get_manifest(request.ref.with_digest(d.digest))
            manifest = oci.parse_manifest(mraw, media_type_hint=d.media_type)
            if isinstance(manifest, oci.ImageManifest) and _has_layer(
                manifest, request.layer_digest
            ):
                return d.digest, manifest
        raise LayerNotInImageError(
            f"layer {request.layer_digest} is not in image {request.ref}: none of the "
            f"{len(candidates)} platform manifest(s) of {desc.digest} lists it"
        )


def _has_layer(manifest: oci.ImageManifest, digest: str) -> bool:
    return any(layer.digest == digest for layer in manifest.layers)
