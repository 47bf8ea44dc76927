"""GzipCheckpointer / inflate_spans against the original data and independent tools."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import shutil
import struct
import subprocess
import tarfile
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.compression.detect import Compression
from snapshotter.compression.gzip import GzipCheckpointer, inflate_span, inflate_spans
from snapshotter.compression.indexer import UncompressedIndexer, make_indexer
from snapshotter.compression.layer_index import LayerIndexResult
from snapshotter.errors import CheckpointError, CompressionError
from snapshotter.soci.zinfo import (
    WINDOW_SIZE,
    Checkpoint,
    GzipZinfo,
    TarZinfo,
    decode_gzip_zinfo,
    decode_zinfo,
    encode_gzip_zinfo,
)
from snapshotter.soci.ztoc import CompressionAlgorithm

HAVE_GZIP = shutil.which("gzip") is not None
HAVE_PIGZ = shutil.which("pigz") is not None

FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 1, 2, 4, 8, 16


def _content(rnd: random.Random, size: int, compressible: bool) -> bytes:
    if not compressible:
        return rnd.randbytes(size)
    words = [rnd.randbytes(rnd.randrange(1, 12)) for _ in range(20)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words)
    return bytes(out[:size])


Entry = tuple[str, int, bool]


def build_tar(seed: int, entries: list[Entry]) -> bytes:
    """A tar of regular files (given size and entropy), dirs and symlinks."""
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, (kind, size, compressible) in enumerate(entries):
            info = tarfile.TarInfo(f"d{i % 3}/e{i}")
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = f"../target{i}"
                tf.addfile(info)
            else:
                data = _content(rnd, size, compressible)
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# Drawn as a small spec (seed + entry kinds) so failures print readably.
tar_specs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.lists(
        st.tuples(
            st.sampled_from(["file", "file", "file", "dir", "symlink"]),
            st.sampled_from([0, 1, 511, 4096, 40_000, 150_000]),
            st.booleans(),
        ),
        max_size=7,
    ),
)


def _raw_deflate(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def gzip_member(
    data: bytes,
    level: int = 6,
    *,
    flags: int = 0,
    name: bytes = b"layer.tar",
    comment: bytes = b"a comment",
    extra: bytes = b"AB\x02\x00xy",
) -> bytes:
    """A hand-built gzip member with the optional header fields of `flags`."""
    header = bytearray(b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", 12345) + b"\x00\x03")
    if flags & FEXTRA:
        header += struct.pack("<H", len(extra)) + extra
    if flags & FNAME:
        header += name + b"\x00"
    if flags & FCOMMENT:
        header += comment + b"\x00"
    if flags & FHCRC:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return bytes(header) + _raw_deflate(data, level) + trailer


def _run(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def compress(data: bytes, how: tuple[str, int]) -> bytes:
    kind, arg = how
    if kind == "python":
        return gzip.compress(data, arg, mtime=0)
    if kind == "gzip-bin":
        return _run(["gzip", f"-{arg}", "-c"], data)
    if kind == "pigz":
        return _run(["pigz", "-p", "2", "-b", "32", "-c"], data)
    if kind == "members":
        # Split into `arg` members at pseudo-random points, each with a different header.
        rnd = random.Random(len(data) + arg)
        cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(arg - 1))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        return b"".join(
            gzip_member(p, 1 + i % 9, flags=(i * 7) & (FNAME | FEXTRA | FCOMMENT | FHCRC))
            for i, p in enumerate(parts)
        )
    if kind == "header":
        return gzip_member(data, 6, flags=arg)
    raise AssertionError(kind)


def compressions() -> st.SearchStrategy[tuple[str, int]]:
    options = [
        st.tuples(st.just("python"), st.sampled_from([1, 6, 9])),
        st.tuples(st.just("members"), st.integers(2, 4)),
        st.tuples(
            st.just("header"),
            st.sampled_from(
                [FNAME, FEXTRA, FCOMMENT, FHCRC | FNAME, FEXTRA | FNAME | FCOMMENT | FHCRC]
            ),
        ),
    ]
    if HAVE_GZIP:
        options.append(st.tuples(st.just("gzip-bin"), st.sampled_from([1, 6, 9])))
    if HAVE_PIGZ:
        options.append(st.tuples(st.just("pigz"), st.just(0)))
    return st.one_of(options)


def build_index(blob: bytes, span_size: int, chunk: int) -> tuple[LayerIndexResult, bytes]:
    cp = GzipCheckpointer(span_size)
    out = bytearray()
    for i in range(0, len(blob), chunk):
        for piece in cp.feed(blob[i : i + chunk]):
            out += piece
    return cp.finish(), bytes(out)


def read_range(z: GzipZinfo, blob: bytes, offset: int, length: int) -> bytes:
    spans = z.spans_for_range(offset, length)
    if not spans:
        return b""
    first, last = spans[0], spans[-1]
    c0, c1 = z.compressed_bounds(first)[0], z.compressed_bounds(last)[1]
    data = inflate_spans(z, first, last, blob[c0:c1])
    u0 = z.uncompressed_bounds(first)[0]
    return data[offset - u0 : offset - u0 + length]


def check_layer(blob: bytes, original: bytes, span_size: int, chunk: int, reads: list[int]) -> None:
    res, streamed = build_index(blob, span_size, chunk)
    assert streamed == original
    assert res.algorithm == CompressionAlgorithm.GZIP
    assert res.compressed_size == len(blob)
    assert res.uncompressed_size == len(original)
    assert res.span_size == span_size
    z = decode_zinfo(
        CompressionAlgorithm.GZIP,
        res.zinfo_blob,
        compressed_size=len(blob),
        uncompressed_size=len(original),
    )
    assert isinstance(z, GzipZinfo)
    assert not z.legacy
    assert z.num_spans == len(res.span_digests) == res.max_span_id + 1
    assert z.span_size == span_size
    cp0 = z.checkpoint(0)
    assert cp0.uncompressed_offset == 0 and cp0.bits == 0
    assert cp0.window == bytes(32768)
    covered = 0
    for span in range(z.num_spans):
        c0, c1 = z.compressed_bounds(span)
        u0, u1 = z.uncompressed_bounds(span)
        assert u0 == covered
        covered = u1
        assert res.span_digests[span] == "sha256:" + hashlib.sha256(blob[c0:c1]).hexdigest()
        assert inflate_span(z, span, blob[c0:c1]) == original[u0:u1]
        cp = z.checkpoint(span)
        # The window is the 32 KiB of output before the checkpoint, zero-padded on the left.
        expect = original[max(0, u0 - 32768) : u0]
        assert cp.window == bytes(32768 - len(expect)) + expect
        if span > 0:
            # Spans are where soci's rule puts them: more than span_size apart.
            assert u0 - z.uncompressed_bounds(span - 1)[0] > span_size
    assert covered == len(original)
    # Every multi-span run too.
    if z.num_spans:
        c0, c1 = z.compressed_bounds(0)[0], z.compressed_bounds(z.num_spans - 1)[1]
        assert inflate_spans(z, 0, z.num_spans - 1, blob[c0:c1]) == original
    rnd = random.Random(len(blob) ^ span_size)
    for _ in reads:
        off = rnd.randrange(len(original) + 1)
        length = rnd.randrange(len(original) - off + 1)
        assert read_range(z, blob, off, length) == original[off : off + length]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    spec=tar_specs,
    how=compressions(),
    span_size=st.sampled_from([1024, 4096, 20_000, 65536]),
    chunk=st.sampled_from([1, 1000, 65536, 1 << 20]),
    padding=st.sampled_from([0, 0, 0, 7]),
)
def test_spans_match_original(
    spec: tuple[int, list[Entry]], how: tuple[str, int], span_size: int, chunk: int, padding: int
) -> None:
    original = build_tar(*spec)
    blob = compress(original, how) + bytes(padding)
    if chunk == 1 and len(blob) > 20_000:
        chunk = 4096  # byte-at-a-time feeding is covered on small layers
    if not padding:
        assert gzip.decompress(blob) == original  # the oracle agrees with itself
    check_layer(blob, original, span_size, chunk, reads=list(range(20)))


def test_large_layer_many_spans() -> None:
    rnd = random.Random(5)
    original = b"".join(_content(rnd, 50_000, i % 3 != 0) for i in range(40))
    blob = gzip.compress(original, 6, mtime=0)
    check_layer(blob, original, 32768, 65536, reads=list(range(200)))


def test_empty_members_and_empty_blocks() -> None:
    # An empty first member, a sync-flushed stream with empty stored blocks, another member.
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    sync = c.flush(zlib.Z_SYNC_FLUSH)
    payload = b"x" * 5000 + random.Random(1).randbytes(70_000)
    sync += c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH) + c.flush(zlib.Z_SYNC_FLUSH)
    sync += c.compress(payload[:3000]) + c.flush()
    blob = gzip.compress(b"", mtime=0) + sync + gzip.compress(b"tail" * 100, mtime=0)
    original = payload + payload[:3000] + b"tail" * 100
    for span in (1024, 10_000, 1 << 20):
        check_layer(blob, original, span, 999, reads=list(range(50)))


def test_soci_style_checkpoints_at_zero_after_empty_blocks() -> None:
    # soci checkpoints every block end while its output is 0: a stream opening with an empty
    # stored block gets a second checkpoint at uncompressed 0 (in = after that block). Such a
    # zTOC must decode, and every read must come out right through it.
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    head = c.flush(zlib.Z_FULL_FLUSH)
    assert len(head) == 10 + 5  # gzip header + one empty stored block
    payload = random.Random(7).randbytes(30_000) + b"y" * 40_000
    blob = head + c.compress(payload) + c.flush()
    res, _ = build_index(blob, 8192, 4096)
    ours = decode_zinfo(
        CompressionAlgorithm.GZIP,
        res.zinfo_blob,
        compressed_size=len(blob),
        uncompressed_size=len(payload),
    )
    assert isinstance(ours, GzipZinfo)
    points = list(ours.checkpoints())
    assert (points[0].compressed_offset, points[0].uncompressed_offset) == (10, 0)
    soci_points = [points[0], Checkpoint(15, 0, 0, bytes(32768)), *points[1:]]
    z = decode_zinfo(
        CompressionAlgorithm.GZIP,
        encode_gzip_zinfo(8192, soci_points),
        compressed_size=len(blob),
        uncompressed_size=len(payload),
    )
    assert isinstance(z, GzipZinfo)
    assert z.num_spans == len(points) + 1
    assert z.uncompressed_bounds(0) == (0, 0)
    assert z.span_of(0) == 1
    assert inflate_span(z, 0, blob[slice(*z.compressed_bounds(0))]) == b""
    for offset in range(0, len(payload), 3001):
        n = min(5000, len(payload) - offset)
        assert read_range(z, blob, offset, n) == payload[offset : offset + n]


def test_reads_spanning_members_from_one_checkpoint() -> None:
    # Span size larger than each member: a span crosses member boundaries.
    rnd = random.Random(9)
    parts = [rnd.randbytes(3000) + b"z" * 3000 for _ in range(6)]
    blob = b"".join(gzip_member(p, 6, flags=FNAME if i % 2 else 0) for i, p in enumerate(parts))
    original = b"".join(parts)
    res, _ = build_index(blob, 1 << 22, 4096)
    z = decode_gzip_zinfo(
        res.zinfo_blob, compressed_size=len(blob), uncompressed_size=len(original)
    )
    assert z.num_spans == 1
    assert inflate_span(z, 0, blob[z.compressed_bounds(0)[0] :]) == original
    check_layer(blob, original, 5000, 4096, reads=list(range(50)))


def test_feed_accepts_memoryview_and_bytearray() -> None:
    original = random.Random(3).randbytes(100_000)
    blob = gzip.compress(original)
    cp = GzipCheckpointer(8192)
    out = bytearray()
    reused = bytearray(10_000)
    for i in range(0, len(blob), 10_000):
        piece = blob[i : i + 10_000]
        reused[: len(piece)] = piece
        for chunk in cp.feed(memoryview(reused)[: len(piece)]):
            out += chunk
        reused.extend(b"")  # the buffer is not held after feed() is exhausted
        reused += b"\x00"
        del reused[-1]
    assert bytes(out) == original
    assert cp.finish().uncompressed_size == len(original)


def _index(blob: bytes, span_size: int = 4096, chunk: int = 1000) -> LayerIndexResult:
    return build_index(blob, span_size, chunk)[0]


GOOD = gzip.compress(random.Random(2).randbytes(30_000) + b"a" * 30_000, 6, mtime=0)


@pytest.mark.parametrize(
    "cut", [0, 1, 5, 10, 11, 100, len(GOOD) // 2, len(GOOD) - 8, len(GOOD) - 1]
)
def test_truncated_stream(cut: int) -> None:
    with pytest.raises(CompressionError):
        _index(GOOD[:cut])


def test_trailing_garbage_and_padding() -> None:
    assert _index(GOOD + bytes(100)).compressed_size == len(GOOD) + 100
    with pytest.raises(CompressionError, match="garbage"):
        _index(GOOD + b"PK\x03\x04")
    with pytest.raises(CompressionError, match="garbage"):
        _index(GOOD + bytes(10) + b"\x01")
    with pytest.raises(CompressionError):
        _index(GOOD + b"\x1f\x8c" + bytes(20))  # bad second magic byte
    with pytest.raises(CompressionError):
        _index(GOOD + b"\x1f")  # a truncated further member


def test_not_gzip() -> None:
    with pytest.raises(CompressionError):
        _index(b"this is not gzip data at all" * 10)
    with pytest.raises(CompressionError):
        _index(b"\x1f\x8b\x09" + bytes(20))  # unknown method


@settings(max_examples=40, deadline=None)
@given(pos=st.integers(10, len(GOOD) - 9), xor=st.integers(1, 255))
def test_corrupt_deflate_data_is_detected(pos: int, xor: int) -> None:
    bad = bytearray(GOOD)
    bad[pos] ^= xor
    # Python's gzip is the oracle: where it rejects the stream, so must we; where the flip
    # is harmless (padding bits of a stored block), the output must be the same.
    try:
        expect = gzip.decompress(bytes(bad))
    except (OSError, EOFError, zlib.error):
        with pytest.raises(CompressionError):
            _index(bytes(bad))
    else:
        _, out = build_index(bytes(bad), 4096, 1000)
        assert out == expect


def test_inflate_span_rejects_wrong_input() -> None:
    rnd = random.Random(4)
    original = rnd.randbytes(20_000) + _content(rnd, 300_000, True)
    blob = gzip.compress(original, 9)
    res = _index(blob, 8192)
    z = decode_gzip_zinfo(
        res.zinfo_blob, compressed_size=len(blob), uncompressed_size=len(original)
    )
    assert z.num_spans > 2
    c0, c1 = z.compressed_bounds(1)
    with pytest.raises(CompressionError):
        inflate_span(z, 1, blob[c0 : c1 - 1])  # wrong length
    with pytest.raises(CompressionError):
        inflate_span(z, 1, bytes(c1 - c0))  # zeros are not this span
    with pytest.raises(CheckpointError):
        inflate_span(z, z.num_spans, b"")
    with pytest.raises(CheckpointError):
        inflate_spans(z, 2, 1, b"")
    # Data of another span, cut to the right length: never wrong-length output.
    d0, d1 = z.compressed_bounds(0)
    other = (blob[d0:d1] * 2)[: c1 - c0]
    try:
        got = inflate_span(z, 1, other)
    except CompressionError:
        pass
    else:
        assert len(got) == z.uncompressed_bounds(1)[1] - z.uncompressed_bounds(1)[0]


def test_inflate_span_bounds_allocation_by_input() -> None:
    # A zTOC claiming 1 TiB of output from 100 compressed bytes fails before allocating.
    blob = encode_gzip_zinfo(4096, [Checkpoint(10, 0, 0, bytes(WINDOW_SIZE))])
    z = decode_gzip_zinfo(blob, compressed_size=110, uncompressed_size=1 << 40)
    with pytest.raises(CompressionError, match="cannot come from"):
        inflate_span(z, 0, bytes(100))
    # The best real ratio stays under the bound.
    original = bytes(10_000_000)
    gz = gzip.compress(original, 9)
    res = _index(gz, 1 << 30)
    z = decode_gzip_zinfo(res.zinfo_blob, compressed_size=len(gz), uncompressed_size=len(original))
    assert inflate_span(z, 0, gz[z.compressed_bounds(0)[0] :]) == original


def test_feed_misuse() -> None:
    cp = GzipCheckpointer(1024)
    it = cp.feed(GOOD[:100])
    with pytest.raises(RuntimeError):
        cp.feed(GOOD[100:])
    list(it)
    list(cp.feed(GOOD[100:]))
    cp.finish()
    with pytest.raises(RuntimeError):
        cp.finish()
    with pytest.raises(ValueError):
        GzipCheckpointer(0)


# ---- uncompressed layers -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    original=st.binary(max_size=20_000),
    span_size=st.integers(1, 5000),
    chunk=st.integers(1, 7000),
)
def test_uncompressed_indexer(original: bytes, span_size: int, chunk: int) -> None:
    ix = make_indexer(Compression.UNCOMPRESSED, span_size)
    assert isinstance(ix, UncompressedIndexer)
    out = bytearray()
    for i in range(0, len(original), chunk):
        for piece in ix.feed(original[i : i + chunk]):
            out += piece
    assert out == original
    res = ix.finish()
    assert res.algorithm == CompressionAlgorithm.UNCOMPRESSED
    assert res.compressed_size == res.uncompressed_size == len(original)
    z = decode_zinfo(
        CompressionAlgorithm.UNCOMPRESSED,
        res.zinfo_blob,
        compressed_size=len(original),
        uncompressed_size=len(original),
    )
    assert isinstance(z, TarZinfo)
    assert z.version == 2 and z.span_size == span_size
    assert z.num_spans == len(res.span_digests)
    for span, digest in enumerate(res.span_digests):
        a, b = z.compressed_bounds(span)
        assert (a, b) == (span * span_size, min((span + 1) * span_size, len(original)))
        assert digest == "sha256:" + hashlib.sha256(original[a:b]).hexdigest()


def test_make_indexer() -> None:
    assert isinstance(make_indexer(Compression.GZIP, 1024), GzipCheckpointer)
    with pytest.raises(CompressionError):
        make_indexer(Compression.ZSTD, 1024)
