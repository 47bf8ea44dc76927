"""One layer's prefetch artifact from span ids: its blob and its index descriptor. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.index import PrefetchArtifact
from snapshotter.soci.prefetch import runs_in_order


@dataclass(frozen=True)
class LayerArtifact:
    """One layer's prefetch artifact: its descriptor and blob."""

    layer_digest: str
    descriptor: oci.Descriptor
    blob: bytes
    spans: int
    runs: int


def artifact_for(layer_digest: str, spans: Sequence[int]) -> LayerArtifact:
    """The prefetch artifact of one layer's spans (in the order given)."""
    runs = runs_in_order(spans)
    blob = soci_index.encode_prefetch(PrefetchArtifact(layer_digest, tuple(runs)))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    desc = soci_index.prefetch_descriptor(digest, len(blob), layer_digest=layer_digest)
    return LayerArtifact(layer_digest, desc, blob, len(set(spans)), len(runs))
