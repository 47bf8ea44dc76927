"""A layer's start recorded from the reads its filesystem serves, kept under ROOT/prefetch
across a restart, and handed to the next mount of the same image, layer and zTOC.

The filesystem side is the real MountTable over the layer's own tar bytes (no FUSE: the
kernel adds nothing to what is recorded; the integration test runs it under FUSE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.config import PrefetchConfig
from snapshotter.errors import FormatError
from snapshotter.fs.table import MountTable
from snapshotter.fs.tree import LayerTree
from snapshotter.prefetch.recordings import Recordings
from snapshotter.remote.spec import LayerSpec, layer_id
from snapshotter.soci.prefetch import clean_path
from snapshotter.soci.zinfo import decode_zinfo
from tests.fixtures.range_source import FetchLayer, make_layer

SPAN = 16 << 10
ZTOC = "sha256:" + "c" * 64
MANIFEST = "sha256:" + "d" * 64


class TarData:
    """The uncompressed archive as a LayerData (what the span manager would serve)."""

    def __init__(self, lay: FetchLayer) -> None:
        self.tar = lay.tar

    async def read(self, offset: int, length: int, *, readahead_until: int | None = None) -> bytes:
        return self.tar[offset : offset + length]

    def status(self) -> dict[str, object]:
        return {}

    def set_span_observer(self, observer: Any) -> None:
        pass


def file_inodes(tree: LayerTree) -> dict[int, int]:
    """Entry → inode of the regular files with data."""
    out = {}
    for ino in range(tree.first_ino, tree.first_ino + len(tree)):
        found = tree.data(ino)
        if found is not None and found[2] > 0:
            out[found[0]] = ino
    return out


def spec_of(lay: FetchLayer, **kw: Any) -> LayerSpec:
    values: dict[str, Any] = dict(
        layer_id=layer_id(lay.digest, ZTOC),
        layer_digest=lay.digest,
        layer_size=len(lay.blob),
        ztoc_digest=ZTOC,
        ztoc_size=10,
        image_ref="registry.test/app:v1",
        manifest_digest=MANIFEST,
    )
    values.update(kw)
    return LayerSpec(**values)


async def test_reads_recorded_kept_and_offered_to_the_next_mount(tmp_path: Path) -> None:
    lay = make_layer(11, span_size=SPAN, min_size=512 << 10)
    z = lay.ztoc
    zinfo = decode_zinfo(
        z.compression_algorithm,
        z.checkpoints,
        compressed_size=z.compressed_archive_size,
        uncompressed_size=z.uncompressed_archive_size,
    )
    config = PrefetchConfig(quiet_period_sec=1)
    recordings = Recordings(config, tmp_path / "prefetch")
    spec = spec_of(lay)
    table = MountTable()
    layer = table.add_layer(spec.layer_id, z, TarData(lay))
    recorder = recordings.start(spec, zinfo)
    assert recorder is not None
    layer.observer = Recordings.observer(recorder)
    tree, _ = await layer.built()
    c = tree.entries
    inodes = file_inodes(tree)
    last = max(inodes, key=lambda e: int(c.offset[e]))
    ino = inodes[last]
    n = min(4096, int(c.size[last]))
    data = await layer.read(ino, 0, 4096)
    assert data == lay.tar[int(c.offset[last]) : int(c.offset[last]) + n]
    await recordings.flush()  # kept while still recording: a restart loses at most a second
    kept = recordings.store.layer(MANIFEST, lay.digest, ZTOC)
    assert kept is not None and kept.state == "recording"
    assert zinfo.span_of(int(c.offset[last])) in kept.spans
    assert kept.files == (clean_path(c.name(last)).decode(),)
    await trio.sleep(1.1)
    await recordings.flush()
    assert recordings.recording(spec.layer_id) is None  # quiet: the window closed
    done = recordings.store.layer(MANIFEST, lay.digest, ZTOC)
    assert done is not None and done.state == "done" and done.reason == "quiet"

    # A restart: a new data plane over the same ROOT offers the spans to the next mount.
    again = Recordings(config, tmp_path / "prefetch")
    assert again.recorded(spec) == list(done.spans)
    assert again.recorded(spec_of(lay, ztoc_digest="sha256:" + "e" * 64)) == []
    assert again.recorded(spec_of(lay, manifest_digest="sha256:" + "f" * 64)) == []
    off = Recordings(PrefetchConfig(use_recordings=False, record=False), tmp_path / "prefetch")
    assert off.recorded(spec) == [] and off.start(spec, zinfo) is None


async def test_unmount_keeps_what_was_read(tmp_path: Path) -> None:
    lay = make_layer(12, span_size=SPAN, min_size=256 << 10)
    z = lay.ztoc
    zinfo = decode_zinfo(
        z.compression_algorithm,
        z.checkpoints,
        compressed_size=z.compressed_archive_size,
        uncompressed_size=z.uncompressed_archive_size,
    )
    recordings = Recordings(PrefetchConfig(), tmp_path)
    spec = spec_of(lay)
    recorder = recordings.start(spec, zinfo)
    assert recorder is not None
    await recordings.stop(spec.layer_id)  # nothing read: nothing kept
    assert recordings.store.load(MANIFEST) is None
    recorder = recordings.start(spec, zinfo)
    assert recorder is not None
    table = MountTable()
    layer = table.add_layer(spec.layer_id, z, TarData(lay))
    layer.observer = Recordings.observer(recorder)
    tree, _ = await layer.built()
    ino = next(iter(file_inodes(tree).values()))
    await layer.read(ino, 0, 1)
    await recordings.stop(spec.layer_id)
    kept = recordings.store.layer(MANIFEST, lay.digest, ZTOC)
    assert kept is not None and kept.reason == "unmounted" and kept.spans
    assert spec_of(lay, manifest_digest="").manifest_digest == ""
    assert recordings.start(spec_of(lay, manifest_digest=""), zinfo) is None


def test_spec_carries_the_prefetch_artifact() -> None:
    lay = make_layer(13, span_size=SPAN, min_size=64 << 10)
    art = "sha256:" + "9" * 64
    spec = spec_of(lay, prefetch_digest=art, prefetch_size=77)
    assert spec.prefetch is not None and spec.prefetch.size == 77
    assert spec.prefetch.media_type == "application/vnd.amazon.soci.prefetch.v1+json"
    assert LayerSpec.from_json(spec.to_json()) == spec
    assert LayerSpec.from_labels(spec.layer_id, spec.to_labels()) == spec
    plain = spec_of(lay)
    assert plain.prefetch is None and "pysoci.io/prefetch.digest" not in plain.to_labels()
    assert LayerSpec.from_labels(plain.layer_id, plain.to_labels()) == plain
    for bad in (
        {"prefetch_digest": art},
        {"prefetch_size": 5},
        {"prefetch_digest": "x", "prefetch_size": 1},
    ):
        with pytest.raises(FormatError):
            spec_of(lay, **bad)
