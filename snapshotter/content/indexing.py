"""Build SOCI indexes for images in a local OCI layout: `create` (v1) and `convert` (v2).

Layers are read once each, in parallel; a zTOC already present for the same (layer digest,
span size) is reused instead of rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from snapshotter import BUILD_TOOL_IDENTIFIER
from snapshotter.compression.detect import (
    Compression,
    compression_from_media_type,
    detect_compression,
)
from snapshotter.content.layout import OciLayout
from snapshotter.errors import DigestMismatchError, FormatError, ManifestError
from snapshotter.prefetch.build import PrefetchInputs, build_prefetches
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.build import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE, ZtocBuilder
from snapshotter.soci.ztoc import Ztoc, decode_ztoc, encode_ztoc

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


class NoZtocsError(FormatError):
    """No layer of an image got a zTOC, so there is nothing to index."""


@dataclass(frozen=True)
class IndexOptions:
    """What to index and how."""

    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    platforms: tuple[oci.Platform, ...] = ()
    """Platforms to index; empty means the host's platform."""
    all_platforms: bool = False
    build_tool_identifier: str = BUILD_TOOL_IDENTIFIER
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    prefetch: PrefetchInputs = field(default_factory=PrefetchInputs)
    """Files and recorded starts to make prefetch artifacts of (none by default)."""


@dataclass(frozen=True)
class LayerProgress:
    """A progress event: `done` of `total` compressed bytes of `layer` read."""

    layer: str
    done: int
    total: int


@dataclass(frozen=True)
class LayerOutcome:
    """What happened to one layer."""

    layer: oci.Descriptor
    ztoc: oci.Descriptor | None
    status: str
    """One of: built, reused, skipped."""
    reason: str = ""


@dataclass(frozen=True)
class IndexResult:
    """One SOCI index written for one platform manifest."""

    manifest: oci.Descriptor
    index: soci_index.SociIndex
    index_descriptor: oci.Descriptor
    layers: list[LayerOutcome]


ProgressCallback = Callable[[LayerProgress], None]


def _layer_compression(layout: OciLayout, layer: oci.Descriptor) -> Compression:
    known = compression_from_media_type(layer.media_type)
    if known is not None:
        return known
    with layout.open_blob(layer.digest) as f:
        return detect_compression(f.read(8))


def _read_blob(layout: OciLayout, layer: oci.Descriptor) -> Iterator[bytes]:
    with layout.open_blob(layer.digest) as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


class _ZtocCache:
    """zTOCs by (layer digest, span size): those already in the layout, and those being built."""

    def __init__(self, layout: OciLayout) -> None:
        self._known: dict[tuple[str, int], oci.Descriptor] = {}
        self._lock = threading.Lock()
        for idx in iter_soci_indexes(layout):
            for desc in idx.ztocs:
                key = (
                    desc.annotations[soci_index.ANNOTATION_IMAGE_LAYER_DIGEST],
                    soci_index.span_size_of(desc),
                )
                if layout.has_blob(desc.digest):
                    self._known.setdefault(key, desc)

    def get(self, layer_digest: str, span_size: int) -> oci.Descriptor | None:
        with self._lock:
            return self._known.get((layer_digest, span_size))

    def put(self, layer_digest: str, span_size: int, desc: oci.Descriptor) -> None:
        with self._lock:
            self._known.setdefault((layer_digest, span_size), desc)


def iter_soci_indexes(layout: OciLayout) -> Iterator[soci_index.SociIndex]:
    """Every SOCI index reachable from the layout's index.json (v1 entries and v2 image indexes)."""
    for _desc, idx in iter_soci_index_descriptors(layout):
        yield idx


def iter_soci_index_descriptors(
    layout: OciLayout,
) -> Iterator[tuple[oci.Descriptor, soci_index.SociIndex]]:
    """Pairs of (descriptor, parsed SOCI index) reachable from the layout's index.json."""
    seen: set[str] = set()
    stack = list(layout.index().manifests)
    while stack:
        desc = stack.pop()
        if desc.digest in seen or not layout.has_blob(desc.digest):
            continue
        seen.add(desc.digest)
        if desc.media_type in (oci.MEDIA_TYPE_OCI_INDEX, oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST):
            parsed = oci.parse_manifest(layout.read_blob(desc.digest, max_size=4 << 20))
            if isinstance(parsed, oci.ImageIndex):
                stack.extend(parsed.manifests)
            continue
        if desc.artifact_type in (soci_index.SOCI_INDEX_V1, soci_index.SOCI_INDEX_V2):
            data = layout.read_blob(desc.digest, max_size=4 << 20)
            yield desc, soci_index.parse_soci_index(data)


class LayoutIndexer:
    """Builds zTOCs and SOCI indexes for images stored in one OCI layout."""

    def __init__(
        self,
        layout: OciLayout,
        options: IndexOptions,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.layout = layout
        self.options = options
        self._progress = progress or (lambda _event: None)
        self._cache = _ZtocCache(layout)

    # -- image walking -------------------------------------------------------------------

    def platform_manifests(self, ref: str) -> tuple[oci.Descriptor, list[oci.Descriptor]]:
        """The descriptor `ref` names and the platform manifests to index under it."""
        top = self.layout.resolve(ref)
        if top.media_type not in (oci.MEDIA_TYPE_OCI_INDEX, oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST):
            return top, [top]
        parsed = oci.parse_manifest(self.layout.read_blob(top.digest, max_size=4 << 20))
        if not isinstance(parsed, oci.ImageIndex):
            raise ManifestError(f"{ref}: {top.media_type} blob is not an image index")
        if self.options.all_platforms:
            chosen = [
                d
                for d in parsed.manifests
                if d.artifact_type != soci_index.SOCI_INDEX_V2
                and "vnd.docker.reference.type" not in d.annotations
            ]
        else:
            wanted = self.options.platforms or (oci.host_platform(),)
            chosen = [oci.select_manifest(parsed, p) for p in wanted]
        return top, chosen

    def _manifest(self, desc: oci.Descriptor) -> oci.ImageManifest:
        parsed = oci.parse_manifest(
            self.layout.read_blob(desc.digest, max_size=4 << 20), media_type_hint=desc.media_type
        )
        if not isinstance(parsed, oci.ImageManifest):
            raise ManifestError(f"{desc.digest} is not an image manifest")
        return parsed

    # -- layers ----------------------------------------------------------------------------

    def _index_layer(self, layer: oci.Descriptor) -> LayerOutcome:
        opts = self.options
        if layer.size < opts.min_layer_size:
            return LayerOutcome(
                layer, None, "skipped", f"smaller than min layer size ({opts.min_layer_size})"
            )
        compression = _layer_compression(self.layout, layer)
        if compression is Compression.ZSTD:
            log.info("layer %s is zstd: no zTOC (zstd layers are unpacked locally)", layer.digest)
            return LayerOutcome(layer, None, "skipped", "zstd layers have no zTOC")
        reused = self._cache.get(layer.digest, opts.span_size)
        if reused is not None:
            return LayerOutcome(layer, reused, "reused")
        builder = ZtocBuilder(
            compression, opts.span_size, build_tool_identifier=opts.build_tool_identifier
        )
        blob_hash = hashlib.sha256()
        done = 0
        for chunk in _read_blob(self.layout, layer):
            blob_hash.update(chunk)
            builder.feed(chunk)
            done += len(chunk)
            self._progress(LayerProgress(layer.digest, done, layer.size))
        actual = "sha256:" + blob_hash.hexdigest()
        if actual != layer.digest or done != layer.size:
            raise DigestMismatchError(
                f"layer blob {layer.digest} has digest {actual} and size {done} "
                f"(manifest says size {layer.size})"
            )
        ztoc_blob = encode_ztoc(builder.finish())
        ztoc_digest = self.layout.write_blob(ztoc_blob)
        desc = soci_index.ztoc_descriptor(
            ztoc_digest,
            len(ztoc_blob),
            layer_digest=layer.digest,
            layer_media_type=layer.media_type,
            span_size=opts.span_size,
        )
        self._cache.put(layer.digest, opts.span_size, desc)
        return LayerOutcome(layer, desc, "built")

    def index_layers(self, layers: list[oci.Descriptor]) -> dict[str, LayerOutcome]:
        """Index each distinct layer once, in parallel; keyed by layer digest."""
        unique = list({layer.digest: layer for layer in layers}.values())
        with ThreadPoolExecutor(max_workers=max(1, self.options.workers)) as pool:
            outcomes = list(pool.map(self._index_layer, unique))
        return {o.layer.digest: o for o in outcomes}

    # -- indexes ---------------------------------------------------------------------------

    def _build_index(
        self, manifest_desc: oci.Descriptor, outcomes: dict[str, LayerOutcome], version: int
    ) -> IndexResult:
        manifest = self._manifest(manifest_desc)
        layer_outcomes = [outcomes[layer.digest] for layer in manifest.layers]
        ztocs = [o.ztoc for o in layer_outcomes if o.ztoc is not None]
        if not ztocs:
            raise NoZtocsError(
                f"no zTOCs created for {manifest_desc.digest}: every layer was skipped "
                f"(min layer size {self.options.min_layer_size})"
            )
        subject = (
            oci.Descriptor(manifest_desc.media_type, manifest_desc.digest, manifest_desc.size)
            if version == 1
            else None
        )
        idx = soci_index.SociIndex(
            version=version,
            ztocs=ztocs,
            prefetches=self._prefetches(manifest_desc, ztocs),
            subject=subject,
            annotations={
                soci_index.ANNOTATION_BUILD_TOOL_IDENTIFIER: self.options.build_tool_identifier
            },
        )
        self.layout.write_blob(soci_index.EMPTY_CONFIG_BYTES)
        data = idx.to_json_bytes()
        digest = self.layout.write_blob(data)
        artifact = soci_index.SOCI_INDEX_V1 if version == 1 else soci_index.SOCI_INDEX_V2
        desc = oci.Descriptor(
            oci.MEDIA_TYPE_OCI_MANIFEST,
            digest,
            len(data),
            artifact_type=artifact,
            platform=manifest_desc.platform,
        )
        return IndexResult(manifest_desc, idx, desc, layer_outcomes)

    def _prefetches(
        self, manifest_desc: oci.Descriptor, ztocs: list[oci.Descriptor]
    ) -> list[oci.Descriptor]:
        if not self.options.prefetch:
            return []

        def load(desc: oci.Descriptor) -> Ztoc:
            return decode_ztoc(self.layout.read_blob(desc.digest, max_size=1 << 30))

        built = build_prefetches(ztocs, load, self.options.prefetch)
        for path in built.missing:
            log.warning("prefetch file %s not found in any layer of %s", path, manifest_desc.digest)
        for artifact in built.artifacts:
            self.layout.write_blob(artifact.blob)
        return [a.descriptor for a in built.artifacts]

    def _index_all(self, manifests: list[oci.Descriptor], version: int) -> list[IndexResult]:
        layers = [layer for m in manifests for layer in self._manifest(m).layers]
        outcomes = self.index_layers(layers)
        results: list[IndexResult] = []
        skipped: list[NoZtocsError] = []
        for m in manifests:
            try:
                results.append(self._build_index(m, outcomes, version))
            except NoZtocsError as e:
                skipped.append(e)
        if not results:
            if len(skipped) == 1:
                raise skipped[0]
            reasons = "; ".join(str(error) for error in skipped)
            raise NoZtocsError(f"no zTOCs created for any platform: {reasons}")
        for error in skipped:
            # Other platforms still get an index; this one stays as it was (not lazy).
            log.warning("%s; that platform is left without a SOCI index", error)
        return results

    def create(self, ref: str) -> list[IndexResult]:
        """Build v1 SOCI indexes (with subject) and list them in the layout's index.json."""
        _top, manifests = self.platform_manifests(ref)
        results = self._index_all(manifests, version=1)
        for r in results:
            self.layout.add_manifest(r.index_descriptor)
        return results

    def convert(self, ref: str, dst_tag: str) -> tuple[oci.Descriptor, list[IndexResult]]:
        """Build a v2 SOCI-enabled image from `ref` and tag it `dst_tag`; returns its index."""
        top, manifests = self.platform_manifests(ref)
        image_index: oci.ImageIndex | None = None
        if top.media_type in (oci.MEDIA_TYPE_OCI_INDEX, oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST):
            parsed = oci.parse_manifest(self.layout.read_blob(top.digest, max_size=4 << 20))
            assert isinstance(parsed, oci.ImageIndex)
            if any(d.artifact_type == soci_index.SOCI_INDEX_V2 for d in parsed.manifests):
                raise ManifestError(f"{ref} is already SOCI-enabled (it lists a SOCI v2 index)")
            image_index = parsed
        for m in manifests:
            if soci_index.find_soci_index_digest(self._manifest(m)) is not None:
                raise ManifestError(f"{ref} ({m.digest}) is already SOCI-enabled")
        results = self._index_all(manifests, version=2)
        for r in results:
            manifest = self._manifest(r.manifest)
            rewritten = soci_index.soci_enable_manifest(manifest, r.index_descriptor.digest)
            data = rewritten.to_json_bytes()
            digest = self.layout.write_blob(data)
            platform = r.manifest.platform or self._platform_of(manifest)
            rewritten_desc = oci.Descriptor(
                oci.MEDIA_TYPE_OCI_MANIFEST, digest, len(data), platform=platform
            )
            image_index = soci_index.add_index_to_image_index(
                image_index, r.manifest, rewritten_desc, r.index_descriptor, platform
            )
        assert image_index is not None
        data = image_index.to_json_bytes()
        digest = self.layout.write_blob(data)
        desc = oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, digest, len(data))
        self.layout.set_tag(dst_tag, desc)
        return desc, results

    def _platform_of(self, manifest: oci.ImageManifest) -> oci.Platform:
        """The platform an image config declares (for single-platform images)."""
        config = self.layout.read_blob(manifest.config.digest, max_size=4 << 20)
        try:
            obj = json.loads(config)
            return oci.Platform(
                os=str(obj["os"]),
                architecture=str(obj["architecture"]),
                variant=str(obj.get("variant", "")),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                f"image config {manifest.config.digest} has no platform: {e}"
            ) from e
