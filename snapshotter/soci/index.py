"""SOCI index manifests (v1 and v2), the prefetch artifact, and SOCI v2 image conversion.

A SOCI index is a plain OCI image manifest whose config media type is the SOCI artifact
type and whose layers are zTOC descriptors (one per indexed image layer, in layer order)
followed by prefetch descriptors. Pure and synchronous.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from snapshotter.errors import ManifestError
from snapshotter.soci.oci import (
    INDEX_MEDIA_TYPES,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    canonical_json,
    decode_json,
    parse_image_manifest,
    validate_digest,
)

SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
SOCI_INDEX_ARTIFACT_TYPES = {1: SOCI_INDEX_V1, 2: SOCI_INDEX_V2}
MEDIA_TYPE_ZTOC = "application/octet-stream"
MEDIA_TYPE_PREFETCH = "application/vnd.amazon.soci.prefetch.v1+json"

EMPTY_CONFIG_BYTES = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

ANNOTATION_IMAGE_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANNOTATION_IMAGE_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANNOTATION_SPAN_SIZE = "com.amazon.soci.span-size"
ANNOTATION_DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
ANNOTATION_BUILD_TOOL_IDENTIFIER = "com.amazon.soci.build-tool-identifier"
ANNOTATION_INDEX_DIGEST = "com.amazon.soci.index-digest"
ANNOTATION_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"

PREFETCH_VERSION = "1.0"
DEFAULT_MAX_INDEX_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_PREFETCH_SIZE = 4 * 1024 * 1024

_DECIMAL_RE = re.compile(r"[0-9]{1,19}")
_MAX_INT64 = 2**63 - 1


# --- zTOC and prefetch descriptors --------------------------------------------------------


def ztoc_descriptor(
    ztoc_digest: str,
    ztoc_size: int,
    *,
    layer_digest: str,
    layer_media_type: str,
    span_size: int,
    disable_xattrs: bool = False,
) -> Descriptor:
    """The index entry for the zTOC of one image layer."""
    validate_digest(layer_digest)
    if isinstance(span_size, bool) or not 0 < span_size <= _MAX_INT64:
        raise ManifestError(f"span size must be a positive integer, got {span_size!r}")
    annotations = {
        ANNOTATION_IMAGE_LAYER_MEDIA_TYPE: layer_media_type,
        ANNOTATION_IMAGE_LAYER_DIGEST: layer_digest,
        ANNOTATION_SPAN_SIZE: str(span_size),
    }
    if disable_xattrs:
        annotations[ANNOTATION_DISABLE_XATTRS] = "true"
    return Descriptor(MEDIA_TYPE_ZTOC, ztoc_digest, ztoc_size, annotations)


def prefetch_descriptor(
    prefetch_digest: str, prefetch_size: int, *, layer_digest: str
) -> Descriptor:
    """The index entry for the prefetch artifact of one image layer."""
    validate_digest(layer_digest)
    return Descriptor(
        MEDIA_TYPE_PREFETCH,
        prefetch_digest,
        prefetch_size,
        {ANNOTATION_IMAGE_LAYER_DIGEST: layer_digest},
    )


def layer_digest_of(desc: Descriptor) -> str:
    """The image layer digest a zTOC or prefetch descriptor belongs to."""
    value = desc.annotations.get(ANNOTATION_IMAGE_LAYER_DIGEST)
    if value is None:
        raise ManifestError(f"descriptor {desc.digest} has no {ANNOTATION_IMAGE_LAYER_DIGEST}")
    try:
        return validate_digest(value)
    except ManifestError as exc:
        raise ManifestError(f"{ANNOTATION_IMAGE_LAYER_DIGEST} of {desc.digest}: {exc}") from None


def span_size_of(desc: Descriptor) -> int:
    """The span size (bytes) recorded on a zTOC descriptor."""
    value = desc.annotations.get(ANNOTATION_SPAN_SIZE)
    if value is None:
        raise ManifestError(f"zTOC descriptor {desc.digest} has no {ANNOTATION_SPAN_SIZE}")
    if _DECIMAL_RE.fullmatch(value) is None or not 0 < int(value) <= _MAX_INT64:
        raise ManifestError(
            f"{ANNOTATION_SPAN_SIZE} of {desc.digest} must be a positive decimal, "
            f"got {value[:40]!r}"
        )
    return int(value)


def disable_xattrs_of(desc: Descriptor) -> bool:
    """True if the zTOC descriptor says the layer has no xattrs worth serving."""
    return desc.annotations.get(ANNOTATION_DISABLE_XATTRS) == "true"


# --- the index ----------------------------------------------------------------------------


@dataclass
class SociIndex:
    """A SOCI index: zTOC descriptors (image layer order), then prefetch descriptors.

    `subject` is the image manifest a v1 index annotates; v2 indexes have none (the image
    manifest points at the index instead).
    """

    version: int
    ztocs: list[Descriptor] = field(default_factory=list)
    prefetches: list[Descriptor] = field(default_factory=list)
    subject: Descriptor | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if self.version not in SOCI_INDEX_ARTIFACT_TYPES:
            raise ManifestError(f"unsupported SOCI index version {self.version!r}")
        if self.version == 2 and self.subject is not None:
            raise ManifestError("a SOCI v2 index has no subject")

    @property
    def artifact_type(self) -> str:
        """The SOCI index artifact type for this version (the config media type)."""
        return SOCI_INDEX_ARTIFACT_TYPES[self.version]

    @property
    def build_tool_identifier(self) -> str:
        """The build tool annotation, or "" when absent."""
        return self.annotations.get(ANNOTATION_BUILD_TOOL_IDENTIFIER, "")

    def ztoc_for_layer(self, layer_digest: str) -> Descriptor | None:
        """The zTOC descriptor of an image layer, or None if the layer is not indexed."""
        for desc in self.ztocs:
            if desc.annotations.get(ANNOTATION_IMAGE_LAYER_DIGEST) == layer_digest:
                return desc
        return None

    def prefetch_for_layer(self, layer_digest: str) -> Descriptor | None:
        """The prefetch artifact descriptor of an image layer, if any."""
        for desc in self.prefetches:
            if desc.annotations.get(ANNOTATION_IMAGE_LAYER_DIGEST) == layer_digest:
                return desc
        return None

    def to_manifest(self) -> ImageManifest:
        """The OCI image manifest that is this index on the wire."""
        self._validate()  # the fields are mutable
        return ImageManifest(
            config=Descriptor(self.artifact_type, EMPTY_CONFIG_DIGEST, len(EMPTY_CONFIG_BYTES)),
            layers=[*self.ztocs, *self.prefetches],
            media_type=MEDIA_TYPE_OCI_MANIFEST,
            subject=self.subject if self.version == 1 else None,
            annotations=self.annotations,
        )

    def to_json_bytes(self) -> bytes:
        """Canonical JSON of `to_manifest()`; its sha256 is the index digest."""
        return self.to_manifest().to_json_bytes()


def parse_soci_index(data: bytes, *, max_size: int = DEFAULT_MAX_INDEX_SIZE) -> SociIndex:
    """Parse and validate a SOCI index manifest (v1 or v2)."""
    manifest = parse_image_manifest(data, max_size=max_size)
    return soci_index_from_manifest(manifest)


def soci_index_from_manifest(manifest: ImageManifest) -> SociIndex:
    """Validate an already-parsed image manifest as a SOCI index."""
    if manifest.media_type and manifest.media_type != MEDIA_TYPE_OCI_MANIFEST:
        raise ManifestError(
            f"not a SOCI index: manifest media type {manifest.media_type!r} is not OCI"
        )
    config_type = manifest.config.media_type
    version = next((v for v, t in SOCI_INDEX_ARTIFACT_TYPES.items() if t == config_type), None)
    if version is None:
        raise ManifestError(f"not a SOCI index: config media type {config_type[:200]!r}")
    ztocs: list[Descriptor] = []
    prefetches: list[Descriptor] = []
    for i, desc in enumerate(manifest.layers):
        if desc.media_type == MEDIA_TYPE_ZTOC:
            try:
                layer_digest_of(desc)
                span_size_of(desc)
            except ManifestError as exc:
                raise ManifestError(f"SOCI index layer {i}: {exc}") from None
            ztocs.append(desc)
        elif desc.media_type == MEDIA_TYPE_PREFETCH:
            try:
                layer_digest_of(desc)
            except ManifestError as exc:
                raise ManifestError(f"SOCI index layer {i}: {exc}") from None
            prefetches.append(desc)
        else:
            raise ManifestError(
                f"SOCI index layer {i} has media type {desc.media_type[:200]!r}: "
                "neither a zTOC nor a prefetch artifact"
            )
    return SociIndex(
        version=version,
        ztocs=ztocs,
        prefetches=prefetches,
        # soci never writes a subject into a v2 index; tolerate one but do not keep it.
        subject=manifest.subject if version == 1 else None,
        annotations=dict(manifest.annotations),
    )


# --- prefetch artifact --------------------------------------------------------------------


@dataclass(frozen=True)
class PrefetchSpan:
    """A run of spans [start_span, end_span] (inclusive) to fetch first."""

    start_span: int
    end_span: int
    priority: int = 0

    def __post_init__(self) -> None:
        for name in ("start_span", "end_span", "priority"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ManifestError(f"prefetch {name} must be an integer, got {value!r}")
            if not 0 <= value <= _MAX_INT64:
                raise ManifestError(f"prefetch {name} {value} is out of range")
        if self.start_span > self.end_span:
            raise ManifestError(
                f"prefetch start_span {self.start_span} is after end_span {self.end_span}"
            )


@dataclass(frozen=True)
class PrefetchArtifact:
    """The prefetch spans of one image layer."""

    layer_digest: str
    spans: tuple[PrefetchSpan, ...] = ()

    def __post_init__(self) -> None:
        validate_digest(self.layer_digest)
        object.__setattr__(self, "spans", tuple(self.spans))


def _encode_span(span: PrefetchSpan) -> dict[str, int]:
    out = {"start_span": span.start_span, "end_span": span.end_span}
    if span.priority:  # soci's `priority,omitempty`
        out["priority"] = span.priority
    return out


def encode_prefetch(artifact: PrefetchArtifact) -> bytes:
    """The prefetch artifact blob (the layer digest goes on its descriptor, not in here),
    byte for byte as soci's `json.Marshal` writes it: the same spans give the same digest."""
    return canonical_json(
        {
            "version": PREFETCH_VERSION,
            "prefetch_spans": [_encode_span(s) for s in artifact.spans],
        }
    )


def parse_prefetch(
    data: bytes, layer_digest: str, *, max_size: int = DEFAULT_MAX_PREFETCH_SIZE
) -> PrefetchArtifact:
    """Parse a prefetch artifact blob for the layer named by its descriptor."""
    obj = decode_json(data, max_size=max_size, what="prefetch artifact")
    if not isinstance(obj, dict):
        raise ManifestError("prefetch artifact must be a JSON object")
    version = obj.get("version")
    if version != PREFETCH_VERSION:
        raise ManifestError(f"unsupported prefetch artifact version {version!r:.40}")
    raw_spans = obj.get("prefetch_spans")
    if raw_spans is None:
        raw_spans = []
    if not isinstance(raw_spans, list):
        raise ManifestError("prefetch_spans must be an array")
    spans = []
    for i, item in enumerate(raw_spans):
        if not isinstance(item, dict):
            raise ManifestError(f"prefetch_spans[{i}] must be an object")
        if "start_span" not in item or "end_span" not in item:
            raise ManifestError(f"prefetch_spans[{i}] needs start_span and end_span")
        try:
            spans.append(
                PrefetchSpan(item["start_span"], item["end_span"], item.get("priority", 0))
            )
        except ManifestError as exc:
            raise ManifestError(f"prefetch_spans[{i}]: {exc}") from None
    return PrefetchArtifact(layer_digest, tuple(spans))


# --- SOCI v2: SOCI-enabled images ---------------------------------------------------------


def soci_enable_manifest(manifest: ImageManifest, index_digest: str) -> ImageManifest:
    """The image manifest rewritten to point at its SOCI v2 index.

    Media types become OCI (the config descriptor keeps digest and size); layer
    descriptors are kept exactly, so the rewritten image shares its layers with the original.
    """
    validate_digest(index_digest)
    c = manifest.config
    config = Descriptor(
        MEDIA_TYPE_OCI_CONFIG, c.digest, c.size, c.annotations, c.platform, c.artifact_type, c.urls
    )
    return ImageManifest(
        config=config,
        layers=manifest.layers,
        media_type=MEDIA_TYPE_OCI_MANIFEST,
        artifact_type=manifest.artifact_type,
        subject=manifest.subject,
        annotations={**manifest.annotations, ANNOTATION_INDEX_DIGEST: index_digest},
    )


def add_index_to_image_index(
    index: ImageIndex | None,
    original_manifest_desc: Descriptor,
    rewritten_manifest_desc: Descriptor,
    soci_index_desc: Descriptor,
    platform: Platform,
) -> ImageIndex:
    """Add a SOCI v2 index for one platform to an image index.

    With `index` None (a single-platform image) a new OCI image index is made. The rewritten
    manifest replaces the original entry; SOCI entries left from an earlier conversion of
    the same manifest are dropped; the SOCI index descriptor is appended.
    """
    if index is not None and index.media_type and index.media_type not in INDEX_MEDIA_TYPES:
        raise ManifestError(f"not an image index: {index.media_type!r}")
    rewritten = Descriptor(
        rewritten_manifest_desc.media_type or MEDIA_TYPE_OCI_MANIFEST,
        rewritten_manifest_desc.digest,
        rewritten_manifest_desc.size,
        rewritten_manifest_desc.annotations,
        rewritten_manifest_desc.platform or original_manifest_desc.platform or platform,
        rewritten_manifest_desc.artifact_type,
        rewritten_manifest_desc.urls,
    )
    replaced_digests = {original_manifest_desc.digest, rewritten_manifest_desc.digest}
    entries: list[Descriptor] = []
    replaced = False
    for desc in index.manifests if index is not None else ():
        if desc.artifact_type == SOCI_INDEX_V2 and (
            desc.annotations.get(ANNOTATION_IMAGE_MANIFEST_DIGEST) in replaced_digests
        ):
            continue
        if desc.digest in replaced_digests:
            if not replaced:
                entries.append(rewritten)
                replaced = True
            continue
        entries.append(desc)
    if not replaced:
        if index is not None:
            raise ManifestError(
                f"image manifest {original_manifest_desc.digest} is not in the image index"
            )
        entries.append(rewritten)
    entries.append(
        Descriptor(
            MEDIA_TYPE_OCI_MANIFEST,
            soci_index_desc.digest,
            soci_index_desc.size,
            {ANNOTATION_IMAGE_MANIFEST_DIGEST: rewritten.digest},
            platform,
            SOCI_INDEX_V2,
        )
    )
    return ImageIndex(
        manifests=entries,
        media_type=MEDIA_TYPE_OCI_INDEX,
        artifact_type=index.artifact_type if index is not None else "",
        subject=index.subject if index is not None else None,
        annotations=index.annotations if index is not None else {},
    )


def find_soci_index_digest(manifest: ImageManifest) -> str | None:
    """The SOCI v2 index digest an image manifest points at, if any."""
    value = manifest.annotations.get(ANNOTATION_INDEX_DIGEST)
    if value is None:
        return None
    try:
        return validate_digest(value)
    except ManifestError as exc:
        raise ManifestError(f"{ANNOTATION_INDEX_DIGEST}: {exc}") from None


def soci_index_entries(index: ImageIndex) -> Sequence[Descriptor]:
    """The SOCI v2 index descriptors listed in an image index."""
    return [d for d in index.manifests if d.artifact_type == SOCI_INDEX_V2]
