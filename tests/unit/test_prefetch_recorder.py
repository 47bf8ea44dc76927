"""Recorder: a layer's start as spans (header chain first, then the bytes read) and files in
first-read order, its window closed by quiet, time or span bound, its file list bounded."""

from __future__ import annotations

from snapshotter.fs.tree import LayerTree, build_tree
from snapshotter.prefetch.record import DONE, QUIET, RECORDING, SPAN_LIMIT, TIME_LIMIT, UNMOUNTED
from snapshotter.prefetch.recorder import Recorder, RecordLimits
from snapshotter.soci.prefetch import clean_path
from snapshotter.soci.zinfo import Zinfo, decode_zinfo
from tests.fixtures.range_source import FetchLayer, make_layer

SPAN = 16 << 10
ZTOC = "sha256:" + "c" * 64


def setup(limits: RecordLimits | None = None) -> tuple[FetchLayer, LayerTree, Zinfo, Recorder]:
    limits = limits or RecordLimits()
    lay = make_layer(7, span_size=SPAN, min_size=512 << 10)
    z = lay.ztoc
    zinfo = decode_zinfo(
        z.compression_algorithm,
        z.checkpoints,
        compressed_size=z.compressed_archive_size,
        uncompressed_size=z.uncompressed_archive_size,
    )
    tree = build_tree(z, 2)
    return lay, tree, zinfo, Recorder(lay.digest, ZTOC, zinfo, limits, wall_clock=lambda: 1000.0)


def big_files(tree: LayerTree, zinfo: Zinfo) -> list[int]:
    """Regular entries whose data starts past the first span, biggest last."""
    c = tree.entries
    out = [
        i
        for i in range(len(c))
        if int(c.size[i]) > 2 * SPAN and zinfo.span_of(int(c.offset[i])) > 1
    ]
    return sorted(out, key=lambda i: int(c.offset[i]))


def test_records_header_then_data_spans_in_first_read_order() -> None:
    lay, tree, zinfo, r = setup()
    entries = big_files(tree, zinfo)
    late, early = entries[-1], entries[0]
    c = tree.entries
    start = int(c.offset[late])
    r.observe(tree, late, start, 3 * SPAN, now=0.0)
    want_late = list(
        dict.fromkeys(
            [
                *range(zinfo.span_of(int(tree.header_start[late])), zinfo.span_of(start) + 1),
                *zinfo.spans_for_range(start, 3 * SPAN),
            ]
        )
    )
    assert r.spans == want_late
    r.observe(tree, early, int(c.offset[early]), 10, now=1.0)
    r.observe(tree, late, start, 10, now=2.0)  # nothing new
    got = r.taken()
    assert got.spans[: len(want_late)] == tuple(want_late)
    assert zinfo.span_of(int(c.offset[early])) in got.spans[len(want_late) :]
    assert got.files == (clean_path(c.name(late)).decode(), clean_path(c.name(early)).decode())
    assert got.read_bytes == 3 * SPAN + 20
    assert got.span_bytes == sum(
        zinfo.compressed_bounds(s)[1] - zinfo.compressed_bounds(s)[0] for s in got.spans
    )
    assert got.state == RECORDING and got.started == 1000.0
    assert got.layer_digest == lay.digest and got.num_spans == zinfo.num_spans


def test_window_closes_when_quiet_and_after_the_time_limit() -> None:
    _, tree, zinfo, r = setup(RecordLimits(quiet_period=5, max_duration=60))
    e = big_files(tree, zinfo)
    c = tree.entries
    assert not r.tick(100.0)  # nothing read yet: the window has not opened
    r.observe(tree, e[0], int(c.offset[e[0]]), 1, now=100.0)
    assert not r.tick(104.0)
    assert r.tick(105.0) and r.reason == QUIET and r.state == DONE
    before = r.spans
    r.observe(tree, e[-1], int(c.offset[e[-1]]), 1, now=106.0)  # after the window: ignored
    assert r.spans == before

    _, tree, zinfo, r = setup(RecordLimits(quiet_period=5, max_duration=10))
    for t in range(0, 12, 2):  # something new every 2 s
        i = e[t // 2 % len(e)]
        r.observe(tree, i, int(c.offset[i]) + t * SPAN, SPAN, now=float(t))
    assert r.reason == TIME_LIMIT


def test_span_and_file_bounds() -> None:
    _, tree, zinfo, r = setup(RecordLimits(max_spans=3, max_files=1))
    e = big_files(tree, zinfo)
    c = tree.entries
    r.observe(tree, e[0], int(c.offset[e[0]]), 1, now=0.0)
    r.observe(tree, e[-1], int(c.offset[e[-1]]), 10 * SPAN, now=1.0)
    got = r.taken()
    assert len(got.spans) == 3 and got.state == DONE and got.reason == SPAN_LIMIT
    assert len(got.files) == 1 and got.files_dropped == 1

    _, tree, zinfo, r = setup()
    r.observe(tree, e[0], int(c.offset[e[0]]), 1, now=0.0)
    r.stop()
    assert r.taken().reason == UNMOUNTED
