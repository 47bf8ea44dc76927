"""`LayerSpec`: what serving one layer lazily needs, as plain values.

It is what the control plane hands the data plane (as JSON) and what a remote snapshot keeps
in the metastore (as `pysoci.io/` labels) so that a restart can serve the layer again without
a registry: the layer's digest and size, the zTOC that describes it, the image it is fetched
from, and how the SOCI index was found. A lazy layer is keyed by its zTOC as well as its
digest (`layer_id`): two indexes for one layer are two lazy layers, never one served with the
other's table of contents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from snapshotter import labels
from snapshotter.errors import FormatError
from snapshotter.registry.reference import parse_reference
from snapshotter.soci import oci
from snapshotter.soci.index import MEDIA_TYPE_PREFETCH

MAX_LAYER_ID = 64
PREFETCH_DIGEST = labels.PREFIX + "prefetch.digest"
PREFETCH_SIZE = labels.PREFIX + "prefetch.size"
"""The layer's SOCI prefetch artifact, when its index lists one."""


def layer_id(layer_digest: str, ztoc_digest: str) -> str:
    """The directory name of a lazy layer: its digest and its zTOC's, shortened."""
    return f"{_hex(layer_digest)[:24]}-{_hex(ztoc_digest)[:12]}"


def _hex(digest: str) -> str:
    return oci.validate_digest(digest).split(":", 1)[1]


def _check_layer_id(value: str) -> str:
    if (
        not value
        or len(value) > MAX_LAYER_ID
        or not all(c.isalnum() or c in "-_." for c in value)
        or value.startswith(".")
    ):
        raise FormatError(f"invalid lazy layer id {value!r}")
    return value


@dataclass(frozen=True)
class LayerSpec:
    """One layer to serve lazily; every field is a plain value (it crosses processes)."""

    layer_id: str
    """The layer's directory name in the data plane's FUSE mount."""
    layer_digest: str
    layer_size: int
    ztoc_digest: str
    ztoc_size: int
    image_ref: str
    """The image reference the layer's bytes are fetched from."""
    diff_id: str = ""
    """The uncompressed layer's digest (from the image config), when known."""
    manifest_digest: str = ""
    index_digest: str = ""
    index_source: str = ""
    prefetch_digest: str = ""
    """The layer's prefetch artifact in the index (fetched after the mount, never before)."""
    prefetch_size: int = 0

    def __post_init__(self) -> None:
        _check_layer_id(self.layer_id)
        oci.validate_digest(self.layer_digest)
        oci.validate_digest(self.ztoc_digest)
        for name in ("diff_id", "manifest_digest", "index_digest", "prefetch_digest"):
            value = getattr(self, name)
            if value:
                oci.validate_digest(value)
        if self.prefetch_size < 0 or (self.prefetch_size > 0) != bool(self.prefetch_digest):
            raise FormatError(
                f"layer spec {self.layer_id}: a prefetch artifact needs a digest and a size"
            )
        if self.layer_size < 0 or self.ztoc_size <= 0:
            raise FormatError(
                f"layer spec {self.layer_id}: sizes must be positive "
                f"(layer {self.layer_size}, zTOC {self.ztoc_size})"
            )
        parse_reference(self.image_ref)

    @property
    def ztoc(self) -> oci.Descriptor:
        """The zTOC's descriptor."""
        return oci.Descriptor("application/octet-stream", self.ztoc_digest, self.ztoc_size)

    @property
    def prefetch(self) -> oci.Descriptor | None:
        """The prefetch artifact's descriptor, if the index lists one for the layer."""
        if not self.prefetch_digest:
            return None
        return oci.Descriptor(MEDIA_TYPE_PREFETCH, self.prefetch_digest, self.prefetch_size)

    # -- JSON (the data-plane protocol) -----------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> LayerSpec:
        """Parse and validate; FormatError when malformed."""
        if not isinstance(raw, dict):
            raise FormatError("layer spec: expected an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise FormatError(f"layer spec: unknown fields {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            want = int if name in ("layer_size", "ztoc_size", "prefetch_size") else str
            if type(value) is not want:
                raise FormatError(f"layer spec: {name} must be a {want.__name__}")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise FormatError(f"layer spec: {e}") from None

    # -- labels (the metastore record) ------------------------------------------------------

    def to_labels(self) -> dict[str, str]:
        """The `pysoci.io/` labels a remote snapshot keeps (the id is its directory name)."""
        out = {
            labels.LAYER_DIGEST: self.layer_digest,
            labels.LAYER_SIZE: str(self.layer_size),
            labels.ZTOC_DIGEST: self.ztoc_digest,
            labels.ZTOC_SIZE: str(self.ztoc_size),
            labels.IMAGE_REF: self.image_ref,
        }
        optional = {
            labels.LAYER_DIFF_ID: self.diff_id,
            labels.IMAGE_MANIFEST: self.manifest_digest,
            labels.INDEX_DIGEST: self.index_digest,
            labels.INDEX_SOURCE: self.index_source,
            PREFETCH_DIGEST: self.prefetch_digest,
            PREFETCH_SIZE: str(self.prefetch_size) if self.prefetch_size else "",
        }
        out.update({k: v for k, v in optional.items() if v})
        return out

    @classmethod
    def from_labels(cls, layer_id_: str, values: Mapping[str, str]) -> LayerSpec:
        """The spec a remote snapshot's labels record; FormatError when they do not."""
        try:
            return cls(
                layer_id=layer_id_,
                layer_digest=values[labels.LAYER_DIGEST],
                layer_size=_int(values[labels.LAYER_SIZE]),
                ztoc_digest=values[labels.ZTOC_DIGEST],
                ztoc_size=_int(values[labels.ZTOC_SIZE]),
                image_ref=values[labels.IMAGE_REF],
                diff_id=values.get(labels.LAYER_DIFF_ID, ""),
                manifest_digest=values.get(labels.IMAGE_MANIFEST, ""),
                index_digest=values.get(labels.INDEX_DIGEST, ""),
                index_source=values.get(labels.INDEX_SOURCE, ""),
                prefetch_digest=values.get(PREFETCH_DIGEST, ""),
                prefetch_size=_int(values.get(PREFETCH_SIZE, "0")),
            )
        except KeyError as e:
            raise FormatError(f"lazy layer {layer_id_}: its snapshot has no label {e}") from None


def _int(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise FormatError(f"expected a decimal size, got {text[:40]!r}")
    return int(text)
