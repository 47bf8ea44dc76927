"""Checkpoint blobs (gzip and tar) and span arithmetic."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import CheckpointError
from snapshotter.soci.zinfo import (
    CHECKPOINT_SIZE,
    HEADER_SIZE,
    WINDOW_SIZE,
    Checkpoint,
    GzipZinfo,
    TarZinfo,
    decode_gzip_zinfo,
    decode_tar_zinfo,
    decode_zinfo,
    encode_gzip_zinfo,
    encode_tar_zinfo,
)
from snapshotter.soci.ztoc import CompressionAlgorithm

TAR_ZINFO_FBS = """namespace zinfo;
table TarZinfo {
  version : int32;
  span_size : int64;
  size : int64;
}
root_type TarZinfo;
"""


def _window(seed: int) -> bytes:
    return random.Random(seed).randbytes(WINDOW_SIZE)


@st.composite
def checkpoint_lists(draw: st.DrawFn) -> tuple[list[Checkpoint], int, int]:
    """Valid checkpoints plus compressed/uncompressed sizes that contain them."""
    n = draw(st.integers(1, 5))
    first_in = draw(st.integers(10, 40))
    ins = [first_in]
    outs = [0]
    for _ in range(n - 1):
        ins.append(ins[-1] + draw(st.integers(1, 10_000)))
        outs.append(outs[-1] + draw(st.integers(1, 50_000)))
    bits = [0] + [draw(st.integers(0, 7)) for _ in range(n - 1)]
    cps = [
        Checkpoint(i, o, b, _window(k) if k else bytes(WINDOW_SIZE))
        for k, (i, o, b) in enumerate(zip(ins, outs, bits, strict=True))
    ]
    csize = ins[-1] + draw(st.integers(0, 5000))
    usize = outs[-1] + draw(st.integers(0, 5000))
    return cps, csize, usize


@settings(max_examples=40, deadline=None)
@given(data=checkpoint_lists(), span_size=st.integers(1, 1 << 30))
def test_gzip_roundtrip_and_arithmetic(
    data: tuple[list[Checkpoint], int, int], span_size: int
) -> None:
    cps, csize, usize = data
    blob = encode_gzip_zinfo(span_size, cps)
    assert len(blob) == HEADER_SIZE + CHECKPOINT_SIZE * len(cps)
    # Independent parse of the layout with struct.
    count, span = struct.unpack_from("<iq", blob)
    assert (count, span) == (len(cps), span_size)
    for k, cp in enumerate(cps):
        off = HEADER_SIZE + k * CHECKPOINT_SIZE
        assert struct.unpack_from("<qqB", blob, off) == (
            cp.compressed_offset,
            cp.uncompressed_offset,
            cp.bits,
        )
        assert blob[off + 17 : off + 17 + WINDOW_SIZE] == cp.window
    z = decode_gzip_zinfo(blob, compressed_size=csize, uncompressed_size=usize)
    assert list(z.checkpoints()) == cps
    assert z.num_spans == len(cps) and z.max_span_id == len(cps) - 1
    assert z.span_size == span_size
    assert (z.compressed_size, z.uncompressed_size) == (csize, usize)
    for k, cp in enumerate(cps):
        start = cp.compressed_offset - (1 if cp.bits else 0)
        end = cps[k + 1].compressed_offset if k + 1 < len(cps) else csize
        assert z.compressed_bounds(k) == (start, end)
        uend = cps[k + 1].uncompressed_offset if k + 1 < len(cps) else usize
        assert z.uncompressed_bounds(k) == (cp.uncompressed_offset, uend)
        if uend > cp.uncompressed_offset:
            assert z.span_of(cp.uncompressed_offset) == k
            assert z.span_of(uend - 1) == k
    # spans_for_range against a brute-force scan.
    rnd = random.Random(span_size)
    for _ in range(30):
        if usize == 0:
            break
        off = rnd.randrange(usize)
        length = rnd.randrange(usize - off + 1)
        expect = [
            k
            for k in range(len(cps))
            if length
            and z.uncompressed_bounds(k)[0] < off + length
            and z.uncompressed_bounds(k)[1] > off
        ]
        assert list(z.spans_for_range(off, length)) == expect


def test_legacy_layout() -> None:
    cps = [
        Checkpoint(10, 0, 0, bytes(WINDOW_SIZE)),
        Checkpoint(5000, 70_000, 3, _window(1)),
        Checkpoint(9000, 140_000, 0, _window(2)),
    ]
    current = encode_gzip_zinfo(1 << 16, cps)
    # Legacy: same header (count includes checkpoint 0), checkpoint 0 omitted.
    legacy = current[:HEADER_SIZE] + current[HEADER_SIZE + CHECKPOINT_SIZE :]
    assert len(legacy) == HEADER_SIZE + CHECKPOINT_SIZE * 2
    z = decode_gzip_zinfo(legacy, compressed_size=10_000, uncompressed_size=150_000)
    assert z.legacy
    assert list(z.checkpoints()) == cps
    assert z.window(0) == bytes(WINDOW_SIZE)
    assert z.compressed_bounds(0) == (10, 5000)
    assert z.compressed_bounds(1) == (4999, 9000)
    assert z.compressed_bounds(2) == (9000, 10_000)
    # Only checkpoint 0: a 12-byte legacy blob.
    only = decode_gzip_zinfo(struct.pack("<iq", 1, 4096), compressed_size=30, uncompressed_size=5)
    assert only.num_spans == 1 and only.legacy
    assert only.uncompressed_bounds(0) == (0, 5) and only.compressed_bounds(0) == (10, 30)


def test_decode_accepts_memoryview() -> None:
    blob = encode_gzip_zinfo(100, [Checkpoint(10, 0, 0, _window(3))])
    z = decode_gzip_zinfo(memoryview(blob), compressed_size=20, uncompressed_size=20)
    assert z.window(0) == _window(3)


def _blob(rows: list[tuple[int, int, int]], count: int | None = None, span: int = 4096) -> bytes:
    parts = [struct.pack("<iq", len(rows) if count is None else count, span)]
    for i, o, b in rows:
        parts.append(struct.pack("<qqB", i, o, b) + bytes(WINDOW_SIZE))
    return b"".join(parts)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "shorter"),
        (b"\x01\x00\x00\x00", "shorter"),
        (_blob([(10, 0, 0)], span=0), "span size"),
        (_blob([(10, 0, 0)], span=-5), "span size"),
        (_blob([(10, 0, 0)], count=0), "count"),
        (_blob([(10, 0, 0)], count=-1), "count"),
        (_blob([(10, 0, 0)], count=3), "does not hold"),
        (_blob([(10, 0, 0)])[:-1], "does not hold"),
        (_blob([(10, 0, 0)]) + b"\x00", "does not hold"),
        (_blob([(10, 0, 0), (20, 100, 8)]), "bits"),
        (_blob([(10, 0, 0), (20, 100, 255)]), "bits"),
        (_blob([(10, 0, 0), (20, 100, 0), (30, 50, 0)]), "uncompressed offset 50 decreasing"),
        (_blob([(10, 0, 0), (9, 100, 0)]), "decreasing"),
        (_blob([(10, 5, 0)]), "not 0"),
        (_blob([(-1, 0, 0)]), "negative"),
        (_blob([(10, 0, 0), (20, -100, 0)]), "negative|increasing"),
        (_blob([(10, 0, 0), (2000, 100, 0)]), "beyond"),
        (_blob([(10, 0, 0), (20, 2000, 0)]), "beyond"),
        (_blob([(0, 0, 3)]), "bits set at compressed offset 0"),
    ],
)
def test_gzip_decode_rejects(blob: bytes, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        decode_gzip_zinfo(blob, compressed_size=1000, uncompressed_size=1000)


def test_huge_count_fails_fast() -> None:
    blob = struct.pack("<iq", 2**31 - 1, 4096) + bytes(100)
    with pytest.raises(CheckpointError):
        decode_gzip_zinfo(blob, compressed_size=1 << 40, uncompressed_size=1 << 40)


def test_out_of_range_queries() -> None:
    blob = encode_gzip_zinfo(
        4096, [Checkpoint(10, 0, 0, bytes(WINDOW_SIZE)), Checkpoint(50, 5000, 1, _window(4))]
    )
    z = decode_gzip_zinfo(blob, compressed_size=100, uncompressed_size=9000)
    for bad in (-1, 2, 100):
        with pytest.raises(CheckpointError):
            z.compressed_bounds(bad)
        with pytest.raises(CheckpointError):
            z.uncompressed_bounds(bad)
        with pytest.raises(CheckpointError):
            z.checkpoint(bad)
        with pytest.raises(CheckpointError):
            z.window(bad)
    for bad in (-1, 9000, 10**12):
        with pytest.raises(CheckpointError):
            z.span_of(bad)
    with pytest.raises(CheckpointError):
        z.spans_for_range(8000, 1001)
    with pytest.raises(CheckpointError):
        z.spans_for_range(-1, 5)
    with pytest.raises(CheckpointError):
        z.spans_for_range(5, -1)
    assert z.spans_for_range(8999, 0) == range(0)
    assert z.spans_for_range(9000, 0) == range(0)
    assert z.spans_for_range(4999, 2) == range(0, 2)
    assert z.spans_for_range(0, 9000) == range(0, 2)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200))
def test_fuzz_decoders_raise_only_typed_errors(blob: bytes) -> None:
    for decode in (
        lambda b: decode_gzip_zinfo(b, compressed_size=1000, uncompressed_size=1000),
        decode_tar_zinfo,
        lambda b: decode_zinfo(
            CompressionAlgorithm.UNCOMPRESSED, b, compressed_size=5, uncompressed_size=5
        ),
    ):
        with contextlib.suppress(CheckpointError):
            decode(blob)


@settings(max_examples=200, deadline=None)
@given(
    span_size=st.integers(1, 2**62),
    size=st.integers(0, 2**62),
    data=st.data(),
)
def test_tar_zinfo_roundtrip_and_mutations(span_size: int, size: int, data: st.DataObject) -> None:
    blob = encode_tar_zinfo(span_size, size)
    z = decode_tar_zinfo(blob)
    assert (z.version, z.span_size, z.size) == (2, span_size, size)
    # Truncations and byte flips must only ever produce CheckpointError or a TarZinfo.
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CheckpointError):
        decode_tar_zinfo(blob[: min(cut, 3)])
    with contextlib.suppress(CheckpointError):
        decode_tar_zinfo(blob[:cut])
    pos = data.draw(st.integers(0, len(blob) - 1))
    flipped = bytearray(blob)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(CheckpointError):
        decode_tar_zinfo(bytes(flipped))


def test_tar_arithmetic() -> None:
    z = decode_zinfo(
        CompressionAlgorithm.UNCOMPRESSED,
        encode_tar_zinfo(1000, 2500),
        compressed_size=2500,
        uncompressed_size=2500,
    )
    assert isinstance(z, TarZinfo)
    assert z.num_spans == 3 and z.max_span_id == 2
    assert [z.uncompressed_bounds(i) for i in range(3)] == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert z.compressed_bounds(2) == (2000, 2500)
    assert z.span_of(999) == 0 and z.span_of(1000) == 1 and z.span_of(2499) == 2
    assert z.spans_for_range(999, 2) == range(0, 2)
    assert z.spans_for_range(0, 2500) == range(0, 3)
    with pytest.raises(CheckpointError):
        z.span_of(2500)
    with pytest.raises(CheckpointError):
        z.uncompressed_bounds(3)
    exact = decode_tar_zinfo(encode_tar_zinfo(1000, 3000))
    assert exact.num_spans == 3  # soci: max_span_id = size/span - 1 when it divides
    with pytest.raises(CheckpointError, match="does not match"):
        decode_zinfo(
            CompressionAlgorithm.UNCOMPRESSED,
            encode_tar_zinfo(1000, 2500),
            compressed_size=2501,
            uncompressed_size=2500,
        )
    with pytest.raises(CheckpointError):
        decode_tar_zinfo(encode_tar_zinfo(0, 10))


@pytest.mark.parametrize("usize", [2000, 2100, 2499, 2500])
def test_tar_layer_archive_may_end_before_the_blob(usize: int) -> None:
    """soci writes a tar layer's uncompressed size where the archive ends (end-of-archive
    blocks included, record padding not), pysoci once wrote the blob's size: both are read.
    The last span is then shorter in the uncompressed view than in the blob (whose bytes its
    digest covers)."""
    z = decode_zinfo(
        CompressionAlgorithm.UNCOMPRESSED,
        encode_tar_zinfo(1000, 2500),
        compressed_size=2500,
        uncompressed_size=usize,
    )
    assert z.num_spans == 3 and z.uncompressed_size == usize and z.compressed_size == 2500
    assert z.uncompressed_bounds(2) == (2000, usize)
    assert z.compressed_bounds(2) == (2000, 2500)
    assert z.spans_for_range(0, usize) == range(0, 3 if usize > 2000 else 2)
    with pytest.raises(CheckpointError):
        z.span_of(usize)


@pytest.mark.parametrize("usize", [1999, 2501, -1])
def test_tar_layer_archive_size_outside_the_last_span_is_refused(usize: int) -> None:
    with pytest.raises(CheckpointError, match="outside its last span"):
        decode_zinfo(
            CompressionAlgorithm.UNCOMPRESSED,
            encode_tar_zinfo(1000, 2500),
            compressed_size=2500,
            uncompressed_size=usize,
        )


def test_decode_zinfo_dispatch() -> None:
    blob = encode_gzip_zinfo(4096, [Checkpoint(10, 0, 0, bytes(WINDOW_SIZE))])
    z = decode_zinfo(CompressionAlgorithm.GZIP, blob, compressed_size=50, uncompressed_size=9)
    assert isinstance(z, GzipZinfo)
    with pytest.raises(CheckpointError):
        decode_zinfo(CompressionAlgorithm.GZIP, blob, compressed_size=5, uncompressed_size=9)


@pytest.mark.skipif(shutil.which("flatc") is None, reason="flatc not installed")
def test_tar_zinfo_against_flatc(tmp_path: Path) -> None:
    schema = tmp_path / "zinfo.fbs"
    schema.write_text(TAR_ZINFO_FBS)
    # Our encoding, decoded by flatc.
    ours = tmp_path / "ours.bin"
    ours.write_bytes(encode_tar_zinfo(4 << 20, 123_456_789_012))
    subprocess.run(
        [
            *("flatc", "--json", "--strict-json", "--raw-binary"),
            *("-o", str(tmp_path), str(schema), "--", str(ours)),
        ],
        check=True,
        capture_output=True,
    )
    decoded = json.loads((tmp_path / "ours.json").read_text())
    assert decoded == {"version": 2, "span_size": 4 << 20, "size": 123_456_789_012}
    # flatc's encoding, decoded by us.
    src = tmp_path / "theirs.json"
    src.write_text(json.dumps({"version": 2, "span_size": 65536, "size": 7}))
    subprocess.run(
        ["flatc", "--binary", "-o", str(tmp_path), str(schema), str(src)],
        check=True,
        capture_output=True,
    )
    z = decode_tar_zinfo((tmp_path / "theirs.bin").read_bytes())
    assert (z.version, z.span_size, z.size) == (2, 65536, 7)
