"""The remote-snapshot protocol: containerd's Prepare labels → image → SOCI index → a layer
served lazily (or unpacked here when it has no zTOC).

containerd's unpacker calls Prepare with `containerd.io/snapshot.ref` and the layer's labels;
if this hook returns a layer, the snapshotter commits it and answers AlreadyExists, and
containerd never downloads the blob. Labels come from CRI/nerdctl (`cri.*`, `remote/soci.*`)
or from ctr-remote (`remote/stargz.*`, which carry no manifest digest: the manifest is found
from the reference and the layer digest).

Called from gRPC threads; all registry and FUSE work runs on the trio loop through the bridge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from snapshotter.content.discovery import FoundIndex, Modes, fetch_ztoc, find_soci_index
from snapshotter.content.local_layers import LocalLayers
from snapshotter.errors import FormatError, InvalidReferenceError, ManifestError, PysociError
from snapshotter.fetch.registry_source import RegistryRangeSource
from snapshotter.layers import LazyLayers
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.rootfs import layer_id
from snapshotter.service import UnavailableError
from snapshotter.service.snapshots import RemoteLayer
from snapshotter.soci import oci
from snapshotter.soci.index import SOCI_INDEX_ARTIFACT_TYPES

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
LABEL_STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
LABEL_SOCI_INDEX_DIGEST = "containerd.io/snapshot/remote/soci.index.digest"


@dataclass(frozen=True)
class LayerRequest:
    """The image and layer a Prepare's labels name."""

    ref: Reference
    layer_digest: str
    manifest_digest: str | None
    index_digest: str | None


def parse_labels(labels: Mapping[str, str]) -> LayerRequest | None:
    """The layer request in Prepare labels; None when they do not name one (not lazy).

    Malformed values raise typed errors (the caller logs them and lets containerd unpack).
    """
    if LABEL_TARGET not in labels:
        return None
    image = labels.get(LABEL_CRI_IMAGE_REF) or labels.get(LABEL_STARGZ_REFERENCE)
    layer = labels.get(LABEL_CRI_LAYER_DIGEST) or labels.get(LABEL_STARGZ_DIGEST)
    if not image or not layer:
        return None
    manifest = labels.get(LABEL_CRI_MANIFEST_DIGEST) or None
    index = labels.get(LABEL_SOCI_INDEX_DIGEST) or None
    return LayerRequest(
        ref=parse_reference(image),
        layer_digest=oci.validate_digest(layer),
        manifest_digest=oci.validate_digest(manifest) if manifest else None,
        index_digest=oci.validate_digest(index) if index else None,
    )


@dataclass
class _Image:
    """What one image's layers share: its manifest, diff IDs and SOCI index."""

    manifest_digest: str
    manifest: oci.ImageManifest
    diff_ids: list[str]
    index: FoundIndex | None


class TrioBridge:
    """Runs trio work from other threads (gRPC's) on the daemon's trio loop."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an async function on the loop and wait for its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a sync function on the loop thread (for state owned by the loop)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


class SociRemote:
    """The snapshotter's RemoteHook: serves indexed layers lazily, unpacks the others."""

    def __init__(
        self,
        client: RegistryClient,
        lazy: LazyLayers,
        local: LocalLayers,
        bridge: TrioBridge,
        *,
        modes: Modes | None = None,
    ) -> None:
        self.client = client
        self.lazy = lazy
        self.local = local
        self.bridge = bridge
        self.modes = modes or Modes()
        self._images: dict[tuple[str, str], _Image] = {}
        self._image_locks: dict[tuple[str, str], trio.Lock] = {}
        self._refs: dict[str, int] = {}
        self._layer_ids: dict[str, str] = {}

    # -- the hook (gRPC threads) --------------------------------------------------------------

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        labels: Mapping[str, str],
        parent_layers: Sequence[str],
    ) -> RemoteLayer | None:
        """Make the layer a Prepare names available, or None to let containerd unpack it."""
        try:
            request = parse_labels(labels)
        except (FormatError, InvalidReferenceError) as e:
            log.warning("snapshot %s: unusable remote-snapshot labels (%s); not lazy", key, e)
            return None
        if request is None:
            return None
        return self.bridge.run(self._prepare, key, request)

    def check(self, layer_dirs: Sequence[str]) -> None:
        """Raise UnavailableError if any lazily served layer among `layer_dirs` is not usable."""
        for d in layer_dirs:
            lid = self._layer_ids.get(d)
            if lid is None:
                continue
            try:
                self.bridge.run_sync(self.lazy.check, lid)
            except PysociError as e:
                raise UnavailableError(f"layer {lid} is not available: {e}") from e

    def release(self, layer_dir: str) -> None:
        """A snapshot using `layer_dir` was removed: stop serving it when nothing else does."""
        count = self._refs.get(layer_dir, 0) - 1
        if count > 0:
            self._refs[layer_dir] = count
            return
        self._refs.pop(layer_dir, None)
        lid = self._layer_ids.pop(layer_dir, None)
        if lid is not None:
            self.bridge.run(self.lazy.unmount, lid)

    # -- the work (trio loop) -------------------------------------------------------------------

    async def _prepare(self, key: str, request: LayerRequest) -> RemoteLayer | None:
        image = await self._image(request)
        if image is None or image.index is None:
            log.info(
                "snapshot %s: image %s has no SOCI index; containerd unpacks layer %s",
                key,
                request.ref,
                request.layer_digest,
            )
            return None
        layer, position = self._layer(image, request)
        ztoc_desc = image.index.index.ztoc_for_layer(layer.digest)
        result: RemoteLayer
        if ztoc_desc is None:
            path = await self.local.ensure(
                self.client, request.ref, layer, image.diff_ids[position]
            )
            log.info("snapshot %s: layer %s has no zTOC; unpacked locally", key, layer.digest)
            result = RemoteLayer(str(path), remote=False)
        else:
            try:
                ztoc = await fetch_ztoc(self.client, request.ref, ztoc_desc)
                if ztoc.compressed_archive_size != layer.size:
                    raise FormatError(
                        f"zTOC {ztoc_desc.digest} is for {ztoc.compressed_archive_size} bytes, "
                        f"the layer has {layer.size}"
                    )
                lid = layer_id(layer.digest)
                source = RegistryRangeSource(self.client, request.ref, layer.digest)
                path = await self.lazy.mount(lid, layer.digest, ztoc, source)
                self._layer_ids[str(path)] = lid
                result = RemoteLayer(str(path), remote=True)
                log.info("snapshot %s: layer %s served lazily at %s", key, layer.digest, path)
            except PysociError as e:
                log.error(
                    "snapshot %s: LAZY MOUNT FAILED for layer %s of %s (%s); unpacking it locally",
                    key,
                    layer.digest,
                    request.ref,
                    e,
                )
                path = await self.local.ensure(
                    self.client, request.ref, layer, image.diff_ids[position]
                )
                result = RemoteLayer(str(path), remote=False)
        self._refs[result.layer_dir] = self._refs.get(result.layer_dir, 0) + 1
        return result

    def _layer(self, image: _Image, request: LayerRequest) -> tuple[oci.Descriptor, int]:
        for i, layer in enumerate(image.manifest.layers):
            if layer.digest == request.layer_digest:
                return layer, i
        raise ManifestError(
            f"layer {request.layer_digest} is not in {request.ref} ({image.manifest_digest})"
        )

    async def _image(self, request: LayerRequest) -> _Image | None:
        """The image a layer belongs to (cached: every layer of an image asks)."""
        cache_key = (str(request.ref), request.manifest_digest or request.layer_digest)
        lock = self._image_locks.setdefault(cache_key, trio.Lock())
        async with lock:
            if cache_key in self._images:
                return self._images[cache_key]
            manifest_digest, manifest = await self._manifest(request)
            if manifest is None:
                return None
            config = await self.client.read_blob(
                request.ref, manifest.config.digest, max_size=4 << 20
            )
            found = await find_soci_index(
                self.client,
                request.ref,
                manifest_digest,
                manifest,
                explicit_digest=request.index_digest,
                modes=self.modes,
            )
            image = _Image(
                manifest_digest, manifest, oci.image_diff_ids(config, len(manifest.layers)), found
            )
            if found is not None:
                log.info(
                    "image %s (%s): SOCI index %s, found by %s",
                    request.ref,
                    manifest_digest,
                    found.descriptor.digest,
                    found.source,
                )
            self._images[cache_key] = image
            if len(self._images) > 256:  # a small cache: images are looked up once per pull
                self._images.pop(next(iter(self._images)))
            return image

    async def _manifest(self, request: LayerRequest) -> tuple[str, oci.ImageManifest | None]:
        """The platform manifest holding the layer (ctr-remote sends no manifest digest)."""
        ref = (
            request.ref.with_digest(request.manifest_digest)
            if request.manifest_digest
            else request.ref
        )
        desc, raw = await self.client.get_manifest(ref)
        parsed = oci.parse_manifest(raw, media_type_hint=desc.media_type)
        if isinstance(parsed, oci.ImageManifest):
            return desc.digest, parsed if _has_layer(parsed, request.layer_digest) else None
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
        return "", None


def _has_layer(manifest: oci.ImageManifest, digest: str) -> bool:
    return any(layer.digest == digest for layer in manifest.layers)
