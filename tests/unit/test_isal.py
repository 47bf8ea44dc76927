"""ISA-L span inflation: the same bytes as zlib's, for every run of spans (primed mid-byte or
not, one gzip member or several), whole or streamed in chunks of any size; where ISA-L cannot
(a member boundary inside the run, corrupt data) the zlib path answers, errors included."""

from __future__ import annotations

import gzip as stdlib_gzip
import hashlib
import random

import pytest

from snapshotter.compression import gzip as gz
from snapshotter.compression import isal
from snapshotter.compression.detect import Compression
from snapshotter.compression.span_stream import SpanStreamInflater
from snapshotter.errors import CompressionError
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.zinfo import GzipZinfo
from tests.fixtures.range_source import FetchLayer, gzip_zinfo_of, make_layer
from tests.fixtures.tars import random_tar


def zlib_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isal, "available", lambda: False)


def multi_member_layer(seed: int) -> FetchLayer:
    """A tar split across three gzip members (a valid gzip file: members concatenated)."""
    rng = random.Random(seed)
    tar = random_tar(rng, max_file_size=200 << 10, max_entries=40)
    cuts = sorted(rng.sample(range(1, len(tar)), 2))
    pieces = [tar[: cuts[0]], tar[cuts[0] : cuts[1]], tar[cuts[1] :]]
    blob = b"".join(stdlib_gzip.compress(p, mtime=0) for p in pieces)
    ztoc = build_ztoc([blob], Compression.GZIP, 16 << 10)
    tar = tar[: ztoc.uncompressed_archive_size]
    return FetchLayer(tar, blob, "sha256:" + hashlib.sha256(blob).hexdigest(), ztoc)


def runs(z: GzipZinfo, rng: random.Random) -> list[tuple[int, int]]:
    out = [(s, min(s + rng.randrange(4), z.num_spans - 1)) for s in range(z.num_spans)]
    return [*out, (0, z.num_spans - 1)]


def test_isal_is_used_here() -> None:
    # scripts/setup.sh installs libisal2: a node without it is slower, never wrong.
    assert isal.available()


@pytest.mark.parametrize("kind", ["gzip", "pigz", "members"])
def test_same_bytes_as_zlib(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lay = multi_member_layer(5) if kind == "members" else make_layer(21, kind=kind)
    z = gzip_zinfo_of(lay.ztoc)
    assert any(z.bits(s) for s in range(z.num_spans))  # some runs start mid-byte
    rng = random.Random(8)
    todo = runs(z, rng)
    fast, fell_back = [], 0
    for first, last in todo:
        lo, hi = z.compressed_bounds(first)[0], z.compressed_bounds(last)[1]
        u0, u1 = z.uncompressed_bounds(first)[0], z.uncompressed_bounds(last)[1]
        got = isal.inflate_run(z.window(first), z.bits(first), lay.blob[lo:hi], u1 - u0)
        fell_back += got is None
        fast.append(gz.inflate_spans(z, first, last, lay.blob[lo:hi]))
        if got is not None:
            assert bytes(got) == lay.tar[u0:u1], (first, last)
    if kind == "members":
        assert fell_back  # runs crossing a member boundary go to zlib ...
    else:
        assert not fell_back
    zlib_only(monkeypatch)
    for (first, last), data in zip(todo, fast, strict=True):
        lo, hi = z.compressed_bounds(first)[0], z.compressed_bounds(last)[1]
        assert gz.inflate_spans(z, first, last, lay.blob[lo:hi]) == data  # ... and agree


@pytest.mark.parametrize("kind", ["gzip", "members"])
def test_streamed_in_any_chunks(kind: str) -> None:
    lay = multi_member_layer(6) if kind == "members" else make_layer(22)
    z = gzip_zinfo_of(lay.ztoc)
    rng = random.Random(9)
    crossed = 0
    for first, last in runs(z, rng)[::3]:
        lo, hi = z.compressed_bounds(first)[0], z.compressed_bounds(last)[1]
        u0, u1 = z.uncompressed_bounds(first)[0], z.uncompressed_bounds(last)[1]
        data = lay.blob[lo:hi]
        stream = SpanStreamInflater(z, first, last)
        try:
            pos = 0
            while pos < len(data):
                step = rng.choice([1, 3, 100, 4096, 1 << 20])
                stream.feed(data[pos : pos + step])
                pos += step
            assert stream.finish() == lay.tar[u0:u1], (first, last)
        except CompressionError as e:
            # Only a member boundary stops the stream; the caller then inflates it whole.
            assert "gzip member ends inside" in str(e), e
            crossed += 1
            stream.close()
    assert bool(crossed) == (kind == "members")


def test_corrupt_data_fails_cleanly() -> None:
    # Corrupt deflate data from ISA-L is "cannot": zlib then reports it; nothing crashes.
    # (What is served is guarded by the span digests, checked before any inflating.)
    lay = make_layer(23)
    z = gzip_zinfo_of(lay.ztoc)
    span = next(s for s in range(1, z.num_spans) if z.bits(s))
    lo, hi = z.compressed_bounds(span)
    bad = bytearray(lay.blob[lo:hi])
    for i in range(8, len(bad), 97):
        bad[i] ^= 0x5A
    u0, u1 = z.uncompressed_bounds(span)
    got = isal.inflate_run(z.window(span), z.bits(span), bad, u1 - u0)
    assert got is None or bytes(got) != lay.tar[u0:u1]
    try:
        out = gz.inflate_spans(z, span, span, bytes(bad))
    except CompressionError:
        return
    assert out != lay.tar[u0:u1]
