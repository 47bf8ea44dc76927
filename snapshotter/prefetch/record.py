"""The kept form of recorded starts: one `ImageRecording` per image manifest, one
`LayerRecording` per lazy layer of it. Plain values, JSON on disk and in `pysoci prefetch
show --json` (which `pysoci convert --prefetch-from` reads back); every field is checked when
read, and what is read is bounded.

Spans are span ids of the zTOC named by `ztoc_digest` (they mean nothing for another zTOC of
the same layer), in the order they were first read; files are the layer's tar names (cleaned)
in the order they were first read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from snapshotter.errors import FormatError
from snapshotter.soci.oci import validate_digest

FORMAT_VERSION: Final = 1
MAX_SPANS: Final = 1 << 20
"""Most span ids one layer's recording may hold when read back (the recorder's own bound,
`[prefetch] max_spans_per_layer`, is lower)."""
MAX_FILES: Final = 1 << 20
MAX_LAYERS: Final = 1024
MAX_NAME: Final = 4096

RECORDING: Final = "recording"
DONE: Final = "done"
STATES: Final = (RECORDING, DONE)

QUIET: Final = "quiet"
TIME_LIMIT: Final = "time limit"
SPAN_LIMIT: Final = "span limit"
UNMOUNTED: Final = "unmounted"
REASONS: Final = ("", QUIET, TIME_LIMIT, SPAN_LIMIT, UNMOUNTED)


class RecordingFormatError(FormatError):
    """A recorded start (a file under ROOT/prefetch, or an export) is malformed."""


@dataclass(frozen=True)
class LayerRecording:
    """What containers read of one lazy layer from its first read until reads went quiet."""

    layer_digest: str
    ztoc_digest: str
    num_spans: int
    """Spans of that zTOC (the ids below are smaller)."""
    state: str = RECORDING
    reason: str = ""
    """Why a done recording ended: quiet, time limit, span limit, unmounted."""
    started: float = 0.0
    """Unix time of the first read."""
    last_read: float = 0.0
    """Unix time of the last read of something not recorded before."""
    spans: tuple[int, ...] = ()
    files: tuple[str, ...] = ()
    files_dropped: int = 0
    """Files first read after the per-layer bound was reached (their spans are recorded)."""
    span_bytes: int = 0
    """Compressed bytes of the spans: what fetching them costs."""
    read_bytes: int = 0
    """File bytes the containers read while recording (uncompressed)."""
    index_digest: str = ""

    def __post_init__(self) -> None:
        where = f"recording of layer {self.layer_digest[:80]!r}"
        try:
            validate_digest(self.layer_digest)
            validate_digest(self.ztoc_digest)
            if self.index_digest:
                validate_digest(self.index_digest)
        except FormatError as e:
            raise RecordingFormatError(f"{where}: {e}") from None
        if self.state not in STATES or self.reason not in REASONS:
            raise RecordingFormatError(f"{where}: state {self.state!r}, reason {self.reason!r}")
        if not 0 < self.num_spans <= MAX_SPANS:
            raise RecordingFormatError(f"{where}: {self.num_spans} spans")
        if len(self.spans) > MAX_SPANS or len(self.files) > MAX_FILES:
            raise RecordingFormatError(f"{where}: more spans or files than can be kept")
        if len(set(self.spans)) != len(self.spans) or any(
            not 0 <= s < self.num_spans for s in self.spans
        ):
            raise RecordingFormatError(
                f"{where}: span ids must be distinct and below {self.num_spans}"
            )
        if any(len(name) > MAX_NAME for name in self.files):
            raise RecordingFormatError(f"{where}: a file name is over {MAX_NAME} characters")
        for name in ("files_dropped", "span_bytes", "read_bytes"):
            if getattr(self, name) < 0:
                raise RecordingFormatError(f"{where}: negative {name}")
        if not (math.isfinite(self.started) and math.isfinite(self.last_read)):
            raise RecordingFormatError(f"{where}: times must be finite")

    @property
    def duration(self) -> float:
        """Seconds from the first read to the last new one."""
        return max(0.0, self.last_read - self.started)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "layer_digest": self.layer_digest,
            "ztoc_digest": self.ztoc_digest,
            "index_digest": self.index_digest,
            "num_spans": self.num_spans,
            "state": self.state,
            "reason": self.reason,
            "started": self.started,
            "last_read": self.last_read,
            "span_bytes": self.span_bytes,
            "read_bytes": self.read_bytes,
            "files_dropped": self.files_dropped,
            "spans": list(self.spans),
            "files": list(self.files),
        }

    @classmethod
    def from_json(cls, raw: object) -> LayerRecording:
        """Parse and validate; RecordingFormatError when malformed."""
        if not isinstance(raw, dict):
            raise RecordingFormatError("a layer recording must be an object")
        strings = ("layer_digest", "ztoc_digest", "index_digest", "state", "reason")
        ints = ("num_spans", "span_bytes", "read_bytes", "files_dropped")
        kwargs: dict[str, Any] = {}
        for name in strings:
            kwargs[name] = _get(raw, name, str, "" if name in ("index_digest", "reason") else None)
        for name in ints:
            kwargs[name] = _get(raw, name, int, 0 if name != "num_spans" else None)
        for name in ("started", "last_read"):
            value = _get(raw, name, float, 0.0)
            kwargs[name] = float(value)
        spans = _get(raw, "spans", list, [])
        files = _get(raw, "files", list, [])
        if len(spans) > MAX_SPANS or len(files) > MAX_FILES:
            raise RecordingFormatError("a layer recording holds too many spans or files")
        if not all(type(s) is int for s in spans) or not all(isinstance(f, str) for f in files):
            raise RecordingFormatError("spans must be integers and files strings")
        return cls(spans=tuple(spans), files=tuple(files), **kwargs)


@dataclass(frozen=True)
class ImageRecording:
    """The recorded start of one image manifest, per layer (in the order first mounted)."""

    manifest_digest: str
    image_ref: str
    updated: float = 0.0
    layers: tuple[LayerRecording, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        try:
            validate_digest(self.manifest_digest)
        except FormatError as e:
            raise RecordingFormatError(f"recorded image: {e}") from None
        if len(self.image_ref) > MAX_NAME or len(self.layers) > MAX_LAYERS:
            raise RecordingFormatError(f"recording of {self.manifest_digest}: too large")
        digests = [layer.layer_digest for layer in self.layers]
        if len(set(digests)) != len(digests):
            raise RecordingFormatError(f"recording of {self.manifest_digest}: a layer twice")

    def layer(self, layer_digest: str) -> LayerRecording | None:
        """The recording of one layer, if any."""
        for layer in self.layers:
            if layer.layer_digest == layer_digest:
                return layer
        return None

    def with_layer(self, layer: LayerRecording, updated: float) -> ImageRecording:
        """A copy with `layer` added or replacing the layer's earlier recording."""
        layers = [x for x in self.layers if x.layer_digest != layer.layer_digest]
        layers.append(layer)
        order = {x.layer_digest: i for i, x in enumerate(self.layers)}
        layers.sort(key=lambda x: order.get(x.layer_digest, len(order)))
        return ImageRecording(self.manifest_digest, self.image_ref, updated, tuple(layers))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "version": FORMAT_VERSION,
            "manifest_digest": self.manifest_digest,
            "image_ref": self.image_ref,
            "updated": self.updated,
            "layers": [layer.to_json() for layer in self.layers],
        }

    def to_bytes(self) -> bytes:
        """The file form."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: object) -> ImageRecording:
        """Parse and validate; RecordingFormatError when malformed."""
        if not isinstance(raw, dict):
            raise RecordingFormatError("a recorded image must be an object")
        if raw.get("version") != FORMAT_VERSION:
            raise RecordingFormatError(f"unknown recording version {raw.get('version')!r:.40}")
        layers = _get(raw, "layers", list, [])
        if len(layers) > MAX_LAYERS:
            raise RecordingFormatError("a recorded image holds too many layers")
        return cls(
            manifest_digest=_get(raw, "manifest_digest", str, None),
            image_ref=_get(raw, "image_ref", str, ""),
            updated=float(_get(raw, "updated", float, 0.0)),
            layers=tuple(LayerRecording.from_json(x) for x in layers),
        )


def parse_recordings(data: bytes, *, max_size: int) -> list[ImageRecording]:
    """Recordings from JSON: one recorded image, a list of them, or `pysoci prefetch show
    --json`'s `{"recordings": [...]}`."""
    if len(data) > max_size:
        raise RecordingFormatError(f"recording of {len(data)} bytes, over {max_size}")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise RecordingFormatError(f"recording is not JSON: {e}") from None
    if isinstance(raw, dict) and "recordings" in raw:
        raw = raw["recordings"]
    items = raw if isinstance(raw, list) else [raw]
    return [ImageRecording.from_json(item) for item in items]


def _get(raw: Mapping[str, Any], name: str, want: type, default: Any) -> Any:
    value = raw.get(name, default)
    if value is None:
        raise RecordingFormatError(f"recording: {name} is missing")
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordingFormatError(f"recording: {name} must be a number")
        return value
    if type(value) is not want:
        raise RecordingFormatError(f"recording: {name} must be a {want.__name__}")
    return value
