"""`prefetch push`'s pure half: a SOCI index with one prefetch artifact per recorded layer,
after the zTOCs, spans as runs in first-read order; layers of another zTOC left out."""

from __future__ import annotations

import hashlib
import json

from snapshotter.prefetch.publish import prefetch_index
from snapshotter.prefetch.record import ImageRecording, LayerRecording
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci

L1, L2, L3 = ("sha256:" + c * 64 for c in "123")
Z1, Z2, Z3 = ("sha256:" + c * 64 for c in "abc")
MANIFEST = "sha256:" + "d" * 64


def ztoc(z: str, layer: str) -> oci.Descriptor:
    return soci_index.ztoc_descriptor(
        z,
        100,
        layer_digest=layer,
        layer_media_type=oci.MEDIA_TYPE_OCI_LAYER_GZIP,
        span_size=4 << 20,
    )


def test_prefetch_index() -> None:
    old = soci_index.SociIndex(
        version=2,
        ztocs=[ztoc(Z1, L1), ztoc(Z2, L2), ztoc(Z3, L3)],
        annotations={"com.amazon.soci.build-tool-identifier": "x"},
    )
    recording = ImageRecording(
        MANIFEST,
        "r/app:1",
        layers=(
            LayerRecording(L2, Z2, 50, spans=(7, 8, 9, 0, 1, 20)),
            LayerRecording(L1, Z1, 50, spans=(4, 5)),
            LayerRecording(L3, "sha256:" + "e" * 64, 50, spans=(1,)),
            LayerRecording("sha256:" + "f" * 64, Z1, 50, spans=(1,)),
        ),
    )
    built = prefetch_index(old, recording)
    assert [a.layer_digest for a in built.artifacts] == [L1, L2]  # the index's layer order
    assert len(built.skipped) == 2
    assert built.index.ztocs == old.ztocs and built.index.annotations == old.annotations
    manifest = json.loads(built.index.to_json_bytes())
    types = [d["mediaType"] for d in manifest["layers"]]
    assert types == ["application/octet-stream"] * 3 + [soci_index.MEDIA_TYPE_PREFETCH] * 2
    art = built.artifacts[1]
    assert json.loads(art.blob) == {
        "version": "1.0",
        "prefetch_spans": [
            {"start_span": 7, "end_span": 9},
            {"start_span": 0, "end_span": 1},
            {"start_span": 20, "end_span": 20},
        ],
    }
    assert art.descriptor.digest == "sha256:" + hashlib.sha256(art.blob).hexdigest()
    assert art.descriptor.annotations == {"com.amazon.soci.image-layer-digest": L2}
    assert (art.spans, art.runs) == (6, 3)
    parsed = soci_index.parse_soci_index(built.index.to_json_bytes())
    assert parsed.prefetch_for_layer(L2) == art.descriptor
