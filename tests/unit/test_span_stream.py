"""SpanStreamInflater: fed in chunks of any size, it inflates exactly what inflate_spans does,
across gzip members (pigz), with primed bits, and refuses too much or too little input."""

from __future__ import annotations

import random

import pytest

from snapshotter.compression.gzip import inflate_spans
from snapshotter.compression.span_stream import SpanStreamInflater
from snapshotter.errors import CompressionError
from tests.fixtures.range_source import gzip_zinfo_of, make_layer


@pytest.mark.parametrize("kind", ["gzip", "pigz"])
def test_streamed_equals_whole(kind: str) -> None:
    lay = make_layer(11, span_size=16 << 10, kind=kind)
    z = gzip_zinfo_of(lay.ztoc)
    rng = random.Random(3)
    runs = [(0, 0), (1, 3), (z.num_spans - 2, z.num_spans - 1)]
    runs += [(s, min(s + rng.randrange(3), z.num_spans - 1)) for s in range(0, z.num_spans, 3)]
    assert any(z.bits(s) for s in range(z.num_spans))  # some runs start mid-byte
    for first, last in runs:
        lo, hi = z.compressed_bounds(first)[0], z.compressed_bounds(last)[1]
        data = lay.blob[lo:hi]
        stream = SpanStreamInflater(z, first, last)
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 512, 4096, 65536])
            stream.feed(data[pos : pos + step])
            pos += step
        assert stream.finish() == inflate_spans(z, first, last, data), (first, last)


def test_short_and_long_input_are_errors() -> None:
    lay = make_layer(12, span_size=16 << 10)
    z = gzip_zinfo_of(lay.ztoc)
    lo, hi = z.compressed_bounds(2)
    stream = SpanStreamInflater(z, 2, 2)
    stream.feed(lay.blob[lo : hi - 10])
    with pytest.raises(CompressionError, match="ended after"):
        stream.finish()
    stream = SpanStreamInflater(z, 2, 2)
    with pytest.raises(CompressionError, match="more than"):
        stream.feed(lay.blob[lo : hi + 1])
    stream.close()
