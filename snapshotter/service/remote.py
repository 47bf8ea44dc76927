"""The remote-snapshot protocol: containerd's Prepare labels → image → SOCI index → a layer
served lazily (or unpacked here when it has no zTOC).

containerd's unpacker calls Prepare with `containerd.io/snapshot.ref` and the layer's labels;
if this hook returns a layer, the snapshotter commits it and answers AlreadyExists, and
containerd never downloads the blob. Labels come from CRI/nerdctl (`cri.*`, `remote/soci.*`)
or from ctr-remote (`remote/stargz.*`, which carry no manifest digest: the manifest is found
from the reference and the layer digest).

Called from gRPC threads; all registry and FUSE work runs on the trio loop through the bridge.

Indexes are looked for in soci's order (content.discovery), ending with the local content
store `ROOT/content` that `pysoci create --root ROOT` fills; zTOCs are read from it too, so an
index built on this node and never pushed serves its image lazily.

What a restart needs is kept at Prepare time, so that it needs no registry: the zTOC in the
daemon's own content store (`ROOT/lazy/ztocs`, an OCI layout, apart from `ROOT/content` which
`pysoci create` fills) and a record per lazy layer (`ROOT/lazy/<layer-id>.json`: image
reference, layer digest and size, zTOC descriptor).
`restore` mounts every remote snapshot's layer again at the same directory; `release` undoes
all of it (mount, cached spans, zTOC, record, local unpack) when the last snapshot using a
layer is removed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from snapshotter import metrics
from snapshotter.content.discovery import FoundIndex, Modes, fetch_ztoc, find_soci_index
from snapshotter.content.layout import OciLayout
from snapshotter.content.local_layers import LocalLayers
from snapshotter.errors import FormatError, InvalidReferenceError, ManifestError, PysociError
from snapshotter.fetch.registry_source import RegistryRangeSource
from snapshotter.layers import LazyLayers
from snapshotter.logs import log_context
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.rootfs import layer_id
from snapshotter.service import UnavailableError
from snapshotter.service.snapshots import LayerRecord, RemoteLayer
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

IMAGE_TTL: Final = 600.0
"""Seconds an image's manifest and index stay cached (its layers are prepared in one pull)."""
MAX_IMAGES: Final = 64


@dataclass(frozen=True)
class LazyLayerRecord:
    """What remounting a lazy layer needs, kept at `ROOT/lazy/<layer-id>.json`."""

    ref: str
    layer_digest: str
    layer_size: int
    ztoc_digest: str
    ztoc_size: int
    ztoc_media_type: str

    @classmethod
    def load(cls, path: Path) -> LazyLayerRecord:
        """Read one (FormatError when unreadable)."""
        try:
            raw = json.loads(path.read_bytes())
            return cls(
                ref=str(raw["ref"]),
                layer_digest=oci.validate_digest(str(raw["layer_digest"])),
                layer_size=int(raw["layer_size"]),
                ztoc_digest=oci.validate_digest(str(raw["ztoc_digest"])),
                ztoc_size=int(raw["ztoc_size"]),
                ztoc_media_type=str(raw["ztoc_media_type"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"lazy layer record {path}: {e}") from e

    def save(self, path: Path) -> None:
        """Write it atomically (fsync'ed: the snapshot record that refers to it is)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(asdict(self), sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class LayerNotInImageError(ManifestError):
    """The labels name a layer that the image they name does not have (another repository's
    layer, a stale manifest digest): nothing to serve lazily."""


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
    loaded_at: float = 0.0


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
        state_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.lazy = lazy
        self.local = local
        self.bridge = bridge
        self.modes = modes or Modes()
        self.content: OciLayout | None = None
        """`ROOT/lazy/ztocs`: the zTOCs of mounted layers, owned by this daemon."""
        self.records_dir: Path | None = None
        self.local_store_dir: Path | None = None
        """`ROOT/content`: the content store `pysoci create --root ROOT` fills (read only)."""
        if state_dir is not None:
            self.local_store_dir = state_dir / "content"
            self.records_dir = state_dir / "lazy"
            self.records_dir.mkdir(parents=True, exist_ok=True)
            self.content = OciLayout.open(self.records_dir / "ztocs", create=True)
        self._images: dict[tuple[str, str], _Image] = {}
        self._image_locks: dict[tuple[str, str], trio.Lock] = {}
        self._refs: dict[str, int] = {}
        self._layer_ids: dict[str, str] = {}
        self._unrestored: dict[str, LazyLayerRecord | None] = {}
        """Lazy layers a restart could not mount yet (layer id → record), retried on check."""

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
            if LABEL_TARGET in labels:
                log.info(
                    "snapshot %s: no image reference or layer digest among the labels; not lazy",
                    key,
                )
            return None
        return self.bridge.run(self._prepare, key, request)

    def check(self, layer_dirs: Sequence[str]) -> None:
        """Raise UnavailableError if any lazily served layer among `layer_dirs` is not usable."""
        for d in layer_dirs:
            lid = self._layer_ids.get(d)
            if lid is None:
                continue
            try:
                self.bridge.run(self._check_layer, lid)
            except PysociError as e:
                raise UnavailableError(f"layer {lid} is not available: {e}") from e

    def release(self, layer_dir: str) -> None:
        """A snapshot using `layer_dir` was removed: when nothing else uses the layer, unmount
        it and delete its cached spans, zTOC, record and local unpack."""
        self.bridge.run(self._release, layer_dir)

    # -- the work (trio loop) -------------------------------------------------------------------

    def _record_path(self, lid: str) -> Path | None:
        return None if self.records_dir is None else self.records_dir / f"{lid}.json"

    def _local_store(self) -> OciLayout | None:
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

    async def _check_layer(self, lid: str) -> None:
        if lid in self._unrestored:
            await self._remount(lid, self._unrestored[lid])
        await self.lazy.check_available(lid)

    async def _release(self, layer_dir: str) -> None:
        count = self._refs.get(layer_dir, 0) - 1
        if count > 0:
            self._refs[layer_dir] = count
            return
        self._refs.pop(layer_dir, None)
        lid = self._layer_ids.pop(layer_dir, None)
        if lid is None:
            if Path(layer_dir).parent == self.local.root:
                self.local.remove_dir(Path(layer_dir))
                log.info("removed the local layer %s: no snapshot uses it", layer_dir)
        else:
            unmounted = lid in self._unrestored  # a restart could not mount it
            self._unrestored.pop(lid, None)
            await self.lazy.unmount(lid, drop_cache=True)
            record = self._forget_record(lid)
            if unmounted and record is not None:  # unmount had no cache of it to drop
                self.lazy.remove_cached(record.layer_digest)
            log.info("released lazy layer %s: no snapshot uses it", lid)
        if not self._refs:
            self._images.clear()
            self._image_locks.clear()

    def _forget_record(self, lid: str) -> LazyLayerRecord | None:
        """Delete a lazy layer's record, and its zTOC when no other record names it; the
        record, when it was readable."""
        path = self._record_path(lid)
        if path is None:
            return None
        try:
            record: LazyLayerRecord | None = LazyLayerRecord.load(path)
        except FormatError:
            record = None
        path.unlink(missing_ok=True)
        if record is None or self.content is None:
            return record
        if all(other.ztoc_digest != record.ztoc_digest for other in self._records()):
            self.content.blob_path(record.ztoc_digest).unlink(missing_ok=True)
        return record

    def _records(self) -> list[LazyLayerRecord]:
        if self.records_dir is None:
            return []
        out = []
        for p in self.records_dir.glob("*.json"):
            try:
                out.append(LazyLayerRecord.load(p))
            except FormatError:
                continue
        return out

    async def restore(self, layers: Sequence[LayerRecord]) -> dict[str, int]:
        """After a restart: count the snapshots per layer, mount every lazy layer again at the
        directory containerd knows, and delete what no snapshot references. Needs no registry
        when the records and zTOCs are here; what cannot be mounted now is retried by `check`."""
        counts = {"mounted": 0, "failed": 0, "local": 0, "missing": 0}
        fuse_root = self.lazy.mountpoint
        for rec in layers:
            self._refs[rec.layer_dir] = self._refs.get(rec.layer_dir, 0) + 1
        for layer_dir in self._refs:
            path = Path(layer_dir)
            if path.parent == fuse_root:
                lid = path.name
                self._layer_ids[layer_dir] = lid
                record_path = self._record_path(lid)
                record: LazyLayerRecord | None = None
                try:
                    if record_path is None:
                        raise FormatError("no state directory for lazy layer records")
                    record = LazyLayerRecord.load(record_path)
                    await self._remount(lid, record)
                    counts["mounted"] += 1
                except PysociError as e:
                    counts["failed"] += 1
                    self._unrestored[lid] = record
                    log.error(
                        "restore: lazy layer %s (%s) cannot be mounted now (%s); snapshots "
                        "on it report unavailable until it can",
                        lid,
                        record.layer_digest if record else "no record",
                        e,
                    )
            elif path.is_dir():
                counts["local"] += 1
            else:
                counts["missing"] += 1
                log.error("restore: local layer directory %s is missing", layer_dir)
        self._remove_orphans()
        return counts

    async def _remount(self, lid: str, record: LazyLayerRecord | None) -> None:
        if record is None:
            raise FormatError(f"lazy layer {lid} has no record: it cannot be mounted again")
        ref = parse_reference(record.ref)
        desc = oci.Descriptor(record.ztoc_media_type, record.ztoc_digest, record.ztoc_size)
        ztoc = await fetch_ztoc(
            self.client,
            ref,
            desc,
            store=self.content,
            local=self._local_store(),
            max_entries=self.lazy.config.fuse.max_ztoc_entries,
        )
        if ztoc.compressed_archive_size != record.layer_size:
            raise FormatError(f"zTOC {record.ztoc_digest} does not fit layer {record.layer_digest}")
        source = RegistryRangeSource(self.client, ref, record.layer_digest)
        await self.lazy.mount(lid, record.layer_digest, ztoc, source)
        self._unrestored.pop(lid, None)

    def _remove_orphans(self) -> None:
        """Delete records, zTOCs, cached spans and local unpacks no snapshot references (left
        by a crash between a snapshot's removal and its cleanup)."""
        live_lids = set(self._layer_ids.values())
        live_digests: set[str] = set()
        live_ztocs: set[str] = set()
        if self.records_dir is not None:
            for p in self.records_dir.glob("*.json"):
                if p.stem not in live_lids:
                    log.info("cleanup: removing the record of unused lazy layer %s", p.stem)
                    p.unlink(missing_ok=True)
                    continue
                try:
                    record = LazyLayerRecord.load(p)
                except FormatError:
                    continue
                live_digests.add(record.layer_digest)
                live_ztocs.add(record.ztoc_digest)
        for digest in self.lazy.cache.cached_layers():
            if digest not in live_digests and self.lazy.remove_cached(digest):
                log.info("cleanup: removed the cached spans of unused layer %s", digest)
        if self.content is not None:
            blobs = self.content.root / "blobs" / "sha256"
            if blobs.is_dir():
                for blob in blobs.iterdir():
                    if f"sha256:{blob.name}" not in live_ztocs:
                        blob.unlink(missing_ok=True)
        if self.local.root.is_dir():
            for entry in self.local.root.iterdir():
                if str(entry) not in self._refs and not entry.name.startswith("."):
                    log.info("cleanup: removing unused local layer %s", entry)
                    self.local.remove_dir(entry)

    async def _prepare(self, key: str, request: LayerRequest) -> RemoteLayer | None:
        with log_context(image=str(request.ref), layer=request.layer_digest, snapshot=key):
            return await self._prepare_layer(key, request)

    async def _prepare_layer(self, key: str, request: LayerRequest) -> RemoteLayer | None:
        try:
            image = await self._image(request)
            layer, position = self._layer(image, request)
        except LayerNotInImageError as e:
            log.warning("snapshot %s: %s; not lazy, containerd unpacks it", key, e)
            return None
        if image.index is None:
            log.info(
                "snapshot %s: image %s (%s) has no SOCI index; containerd unpacks layer %s",
                key,
                request.ref,
                image.manifest_digest,
                request.layer_digest,
            )
            return None
        ztoc_desc = image.index.index.ztoc_for_layer(layer.digest)
        result: RemoteLayer
        if ztoc_desc is None:
            path = await self.local.ensure(
                self.client, request.ref, layer, image.diff_ids[position]
            )
            log.info("snapshot %s: layer %s has no zTOC; unpacked locally", key, layer.digest)
            metrics.LAZY_MOUNT_FALLBACKS.labels(reason="no_ztoc").inc()
            result = RemoteLayer(
                str(path), remote=False, local_reason="unpacked by pysoci: no zTOC for this layer"
            )
        else:
            lid = layer_id(layer.digest)
            record_path = self._record_path(lid)
            wrote_record = False
            try:
                ztoc = await fetch_ztoc(
                    self.client,
                    request.ref,
                    ztoc_desc,
                    store=self.content,
                    local=self._local_store(),
                    max_entries=self.lazy.config.fuse.max_ztoc_entries,
                )
                if ztoc.compressed_archive_size != layer.size:
                    raise FormatError(
                        f"zTOC {ztoc_desc.digest} is for {ztoc.compressed_archive_size} bytes, "
                        f"the layer has {layer.size}"
                    )
                if record_path is not None and not record_path.exists():
                    wrote_record = True
                    LazyLayerRecord(
                        ref=str(request.ref),
                        layer_digest=layer.digest,
                        layer_size=layer.size,
                        ztoc_digest=ztoc_desc.digest,
                        ztoc_size=ztoc_desc.size,
                        ztoc_media_type=ztoc_desc.media_type,
                    ).save(record_path)
                source = RegistryRangeSource(self.client, request.ref, layer.digest)
                path = await self.lazy.mount(lid, layer.digest, ztoc, source)
                self._layer_ids[str(path)] = lid
                result = RemoteLayer(str(path), remote=True)
                log.info("snapshot %s: layer %s served lazily at %s", key, layer.digest, path)
            except PysociError as e:
                if wrote_record and record_path is not None:
                    record_path.unlink(missing_ok=True)
                log.error(
                    "snapshot %s: LAZY MOUNT FAILED for layer %s of %s (%s); unpacking it locally",
                    key,
                    layer.digest,
                    request.ref,
                    e,
                )
                metrics.LAZY_MOUNT_FALLBACKS.labels(reason="mount_failed").inc()
                path = await self.local.ensure(
                    self.client, request.ref, layer, image.diff_ids[position]
                )
                result = RemoteLayer(
                    str(path),
                    remote=False,
                    local_reason=f"unpacked by pysoci: the lazy mount failed ({e})"[:1000],
                )
        self._refs[result.layer_dir] = self._refs.get(result.layer_dir, 0) + 1
        return result

    def _layer(self, image: _Image, request: LayerRequest) -> tuple[oci.Descriptor, int]:
        for i, layer in enumerate(image.manifest.layers):
            if layer.digest == request.layer_digest:
                return layer, i
        raise LayerNotInImageError(
            f"layer {request.layer_digest} is not in image {request.ref} "
            f"(manifest {image.manifest_digest})"
        )

    async def _image(self, request: LayerRequest) -> _Image:
        """The image a layer belongs to (cached: every layer of an image asks)."""
        cache_key = (str(request.ref), request.manifest_digest or request.layer_digest)
        self._expire_images()
        lock = self._image_locks.setdefault(cache_key, trio.Lock())
        async with lock:
            if cache_key in self._images:
                return self._images[cache_key]
            manifest_digest, manifest = await self._manifest(request)
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
                store=self._local_store(),
            )
            image = _Image(
                manifest_digest,
                manifest,
                oci.image_diff_ids(config, len(manifest.layers)),
                found,
                time.monotonic(),
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
            return image

    def _expire_images(self) -> None:
        """Forget images looked up long ago (one pull asks for all its layers at once)."""
        now = time.monotonic()
        for key, image in list(self._images.items()):
            if now - image.loaded_at > IMAGE_TTL or len(self._images) > MAX_IMAGES:
                del self._images[key]
        for key, lock in list(self._image_locks.items()):
            if (
                key not in self._images
                and not lock.locked()
                and lock.statistics().tasks_waiting == 0
            ):
                del self._image_locks[key]

    async def _manifest(self, request: LayerRequest) -> tuple[str, oci.ImageManifest]:
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
