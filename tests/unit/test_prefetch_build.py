"""Prefetch artifacts of an index being built: from soci's file list (`--prefetch-file`,
`--prefetch-files-json`) and from a recorded start (`--prefetch-from`), its spans when the
zTOC is the recorded one, its files otherwise."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from snapshotter.cli.main import main
from snapshotter.content.layout import OciLayout
from snapshotter.errors import FormatError
from snapshotter.prefetch.build import PrefetchInputs, build_prefetches, parse_paths_json
from snapshotter.prefetch.record import ImageRecording, LayerRecording
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.zinfo import decode_zinfo
from snapshotter.soci.ztoc import Ztoc
from tests.fixtures.images import Layer, files_tar, write_image
from tests.fixtures.range_source import FetchLayer, make_layer

SPAN = 16 << 10
Z1, Z2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def desc(lay: FetchLayer, z: str) -> oci.Descriptor:
    return soci_index.ztoc_descriptor(
        z,
        10,
        layer_digest=lay.digest,
        layer_media_type=oci.MEDIA_TYPE_OCI_LAYER_GZIP,
        span_size=SPAN,
    )


@pytest.fixture(scope="module")
def layers() -> tuple[FetchLayer, FetchLayer]:
    return make_layer(21, span_size=SPAN), make_layer(22, span_size=SPAN)


def loader(*pairs: tuple[str, FetchLayer]) -> dict[str, Ztoc]:
    return {z: lay.ztoc for z, lay in pairs}


def test_paths_as_soci_finds_them(layers: tuple[FetchLayer, FetchLayer]) -> None:
    low, high = layers
    ztocs = {Z1: low.ztoc, Z2: high.ztoc}
    f = next(x for x in high.ztoc.files if x.type == "reg" and x.uncompressed_size > SPAN)
    built = build_prefetches(
        [desc(low, Z1), desc(high, Z2)],
        lambda d: ztocs[d.digest],
        PrefetchInputs(paths=("/" + f.name, "/no/such")),
    )
    assert built.missing == ["/no/such"]
    (art,) = built.artifacts
    assert art.layer_digest == high.digest
    z = decode_zinfo(
        high.ztoc.compression_algorithm,
        high.ztoc.checkpoints,
        compressed_size=high.ztoc.compressed_archive_size,
        uncompressed_size=high.ztoc.uncompressed_archive_size,
    )
    first = z.span_of(f.uncompressed_offset)
    parsed = soci_index.parse_prefetch(art.blob, high.digest)
    assert parsed.spans[0].start_span == first


def test_recording_spans_or_its_files(layers: tuple[FetchLayer, FetchLayer]) -> None:
    low, high = layers
    ztocs = {Z1: low.ztoc, Z2: high.ztoc}
    f = next(x for x in low.ztoc.files if x.type == "reg" and x.uncompressed_size > 0)
    rec = ImageRecording(
        "sha256:" + "d" * 64,
        "",
        layers=(
            LayerRecording(high.digest, Z2, high.ztoc.max_span_id + 1, spans=(3, 4, 0)),
            # Recorded with another zTOC: its files are looked up in this one.
            LayerRecording(low.digest, "sha256:" + "e" * 64, 99, spans=(50,), files=(f.name,)),
        ),
    )
    built = build_prefetches(
        [desc(low, Z1), desc(high, Z2)],
        lambda d: ztocs[d.digest],
        PrefetchInputs(recordings=(rec,)),
    )
    assert [a.layer_digest for a in built.artifacts] == [low.digest, high.digest]
    high_art = soci_index.parse_prefetch(built.artifacts[1].blob, high.digest)
    assert [(s.start_span, s.end_span) for s in high_art.spans] == [(3, 4), (0, 0)]
    assert built.artifacts[0].spans >= 1
    assert (
        not PrefetchInputs()
        and build_prefetches([], lambda d: ztocs[d.digest], PrefetchInputs()).artifacts == []
    )


def test_paths_json() -> None:
    assert parse_paths_json(b'["/a", "b/c"]') == ("/a", "b/c")
    for bad in (b"{}", b"[1]", b"nope"):
        with pytest.raises(FormatError):
            parse_paths_json(bad)


def test_convert_with_prefetch_files(tmp_path: Path) -> None:
    """`pysoci convert --oci-layout DIR:v1 DST --prefetch-file P --prefetch-files-json F`:
    the SOCI index lists one artifact for the layer holding the files, after its zTOC."""
    rng = random.Random(3)
    tar = files_tar({"opt/a": rng.randbytes(300 << 10), "opt/b": rng.randbytes(300 << 10)})
    write_image(tmp_path / "img", "v1", [Layer.from_tar(tar, level=1)])
    listed = tmp_path / "files.json"
    listed.write_text(json.dumps(["/opt/b"]))
    code = main(
        [
            "convert",
            "--oci-layout",
            f"{tmp_path / 'img'}:v1",
            "dst",
            "--min-layer-size",
            "0",
            "--span-size",
            "64KiB",
            "--prefetch-file",
            "/opt/a",
            "--prefetch-files-json",
            str(listed),
            "-q",
        ]
    )
    assert code == 0
    layout = OciLayout.open(tmp_path / "img")
    top = oci.parse_manifest(layout.read_blob(layout.resolve("dst").digest, max_size=1 << 20))
    assert isinstance(top, oci.ImageIndex)
    (entry,) = soci_index.soci_index_entries(top)
    idx = soci_index.parse_soci_index(layout.read_blob(entry.digest, max_size=1 << 20))
    (pf,) = idx.prefetches
    art = soci_index.parse_prefetch(
        layout.read_blob(pf.digest, max_size=1 << 20), soci_index.layer_digest_of(pf)
    )
    # /opt/a and /opt/b cover the whole layer (600 KiB in 64 KiB spans): one run.
    assert len(art.spans) == 1 and art.spans[0].start_span == 0
    assert art.spans[0].end_span >= 9
