"""Prefetch artifacts for an index being built (`pysoci create|convert --prefetch-file PATH
--prefetch-files-json FILE --prefetch-from FILE`).

Per indexed layer, the spans of: a recorded start of that layer made with the same zTOC (in
first-read order); else the files that recording names, found in the layer's zTOC; then the
listed paths, found as soci finds them (top layer first, `soci.prefetch.spans_for_paths`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snapshotter.errors import FormatError
from snapshotter.prefetch.artifact import LayerArtifact, artifact_for
from snapshotter.prefetch.record import ImageRecording, LayerRecording
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.prefetch import LayerEntries, expand_runs, spans_for_paths
from snapshotter.soci.zinfo import decode_zinfo
from snapshotter.soci.ztoc import Ztoc, entry_columns

log = logging.getLogger(__name__)

MAX_PATHS = 1 << 20


@dataclass(frozen=True)
class PrefetchInputs:
    """What an index's prefetch artifacts are made of."""

    paths: tuple[str, ...] = ()
    recordings: tuple[ImageRecording, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.paths or self.recordings)


@dataclass
class BuiltPrefetches:
    """The artifacts (in the index's layer order) and the paths found in no layer."""

    artifacts: list[LayerArtifact] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def parse_paths_json(data: bytes) -> tuple[str, ...]:
    """soci's `--prefetch-files-json`: a JSON array of path strings."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"prefetch files JSON: {e}") from None
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise FormatError("prefetch files JSON must be an array of path strings")
    if len(raw) > MAX_PATHS:
        raise FormatError(f"prefetch files JSON lists over {MAX_PATHS} paths")
    return tuple(raw)


def _recorded(inputs: PrefetchInputs, layer_digest: str) -> LayerRecording | None:
    for image in inputs.recordings:
        found = image.layer(layer_digest)
        if found is not None and (found.spans or found.files):
            return found
    return None


def build_prefetches(
    ztocs: Sequence[oci.Descriptor], load: Callable[[oci.Descriptor], Ztoc], inputs: PrefetchInputs
) -> BuiltPrefetches:
    """The prefetch artifacts of an index whose zTOC descriptors are `ztocs` (image layer
    order); `load` decodes one zTOC."""
    layers: list[LayerEntries] = []
    for desc in ztocs:
        ztoc = load(desc)
        zinfo = decode_zinfo(
            ztoc.compression_algorithm,
            ztoc.checkpoints,
            compressed_size=ztoc.compressed_archive_size,
            uncompressed_size=ztoc.uncompressed_archive_size,
        )
        layers.append(
            LayerEntries(soci_index.layer_digest_of(desc), entry_columns(ztoc.files), zinfo)
        )
    spans: dict[str, list[int]] = {layer.layer_digest: [] for layer in layers}
    by_file: list[str] = []
    for desc, layer in zip(ztocs, layers, strict=True):
        recorded = _recorded(inputs, layer.layer_digest)
        if recorded is None:
            continue
        if recorded.ztoc_digest == desc.digest:
            spans[layer.layer_digest].extend(recorded.spans)
        else:
            log.info(
                "layer %s was recorded with zTOC %s: using the %d files it read",
                layer.layer_digest,
                recorded.ztoc_digest,
                len(recorded.files),
            )
            found, _ = spans_for_paths([layer], recorded.files)
            ids, _ = expand_runs(found.get(layer.layer_digest, []), layer.zinfo.num_spans)
            spans[layer.layer_digest].extend(ids)
    by_file = list(inputs.paths)
    found, missing = spans_for_paths(layers, by_file)
    for layer in layers:
        ids, _ = expand_runs(found.get(layer.layer_digest, []), layer.zinfo.num_spans)
        spans[layer.layer_digest].extend(ids)
    out = BuiltPrefetches(missing=missing)
    for layer in layers:
        if spans[layer.layer_digest]:
            out.artifacts.append(artifact_for(layer.layer_digest, spans[layer.layer_digest]))
    return out
