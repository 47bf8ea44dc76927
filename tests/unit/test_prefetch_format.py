"""The spans a prefetch artifact lists: soci's file rule over zTOCs, recorded orders as runs,
and artifacts read back within bounds."""

from __future__ import annotations

import pytest

from snapshotter.errors import ManifestError
from snapshotter.soci.index import PrefetchArtifact, PrefetchSpan, encode_prefetch, parse_prefetch
from snapshotter.soci.prefetch import (
    LayerEntries,
    clean_path,
    expand_runs,
    file_span_range,
    normalized_runs,
    runs_in_order,
    spans_for_paths,
)
from snapshotter.soci.ztoc import entry_columns
from tests.fixtures.range_source import make_layer, zinfo_of

SPAN = 16 << 10
LAYER = "sha256:" + "a" * 64


def test_clean_path_as_soci() -> None:
    assert clean_path("/usr/lib/../bin/python") == b"usr/bin/python"
    assert clean_path("./etc/") == b"etc"
    assert clean_path(b"a//b") == b"a/b"
    assert clean_path("/") == b""


def test_runs_in_order_keeps_first_read_order() -> None:
    assert runs_in_order([5, 6, 7, 2, 3, 6, 9, -1]) == [
        PrefetchSpan(5, 7),
        PrefetchSpan(2, 3),
        PrefetchSpan(9, 9),
    ]


def test_normalized_runs_sorted_and_merged() -> None:
    assert normalized_runs([(7, 9), (0, 1), (2, 3), (8, 12), (20, 20)]) == [
        PrefetchSpan(0, 3),
        PrefetchSpan(7, 12),
        PrefetchSpan(20, 20),
    ]


def test_expand_runs_bounded_by_the_ztoc() -> None:
    ids, outside = expand_runs([PrefetchSpan(3, 5), PrefetchSpan(4, 1 << 40)], 8)
    assert ids == [3, 4, 5, 6, 7]
    assert outside == (1 << 40) - 8 + 1


def test_file_spans_as_soci_inclusive_end() -> None:
    lay = make_layer(3, span_size=SPAN, min_size=256 << 10)
    z = zinfo_of(lay.ztoc)
    # A file ending exactly on a span boundary also names the next span (soci's rule).
    boundary = z.uncompressed_bounds(0)[1]
    assert file_span_range(z, 0, boundary) == (0, 1)
    assert file_span_range(z, 0, boundary - 1) == (0, 0)
    assert file_span_range(z, boundary + 1, 10) == (1, 1)
    assert file_span_range(z, z.uncompressed_size + 5, 10) == (z.num_spans - 1,) * 2


def test_spans_for_paths_top_layer_wins() -> None:
    low, high = make_layer(4, span_size=SPAN), make_layer(4, span_size=SPAN)
    layers = [
        LayerEntries("sha256:" + "1" * 64, entry_columns(low.ztoc.files), zinfo_of(low.ztoc)),
        LayerEntries("sha256:" + "2" * 64, entry_columns(high.ztoc.files), zinfo_of(high.ztoc)),
    ]
    files = [f for f in low.ztoc.files if f.type == "reg" and f.uncompressed_size > 0]
    target = files[len(files) // 2]
    found, missing = spans_for_paths(layers, ["/" + target.name, "no/such/file"])
    assert missing == ["no/such/file"]
    assert list(found) == ["sha256:" + "2" * 64]  # both layers have it: the top one wins
    z = layers[1].zinfo
    first = z.span_of(target.uncompressed_offset)
    assert found["sha256:" + "2" * 64][0].start_span == first


def test_prefetch_artifact_round_trip_and_rejects() -> None:
    art = PrefetchArtifact(LAYER, (PrefetchSpan(0, 3), PrefetchSpan(9, 9)))
    assert parse_prefetch(encode_prefetch(art), LAYER) == art
    for bad in (
        b'{"version":"2.0","prefetch_spans":[]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":1}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":1}]}',
        b'{"version":"1.0","prefetch_spans":{}}',
        b"[]",
    ):
        with pytest.raises(ManifestError):
            parse_prefetch(bad, LAYER)
