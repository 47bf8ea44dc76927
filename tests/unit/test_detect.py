"""Compression detection and whole-stream decompression."""

from __future__ import annotations

import gzip
import random
import subprocess

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.compression.detect import (
    Compression,
    compression_from_media_type,
    detect_compression,
    iter_decompress,
)
from snapshotter.errors import CompressionError


def test_detect_compression() -> None:
    assert detect_compression(gzip.compress(b"x")) is Compression.GZIP
    assert detect_compression(zstandard.ZstdCompressor().compress(b"x")) is Compression.ZSTD
    assert detect_compression(b"\x1f\x8b") is Compression.GZIP
    assert detect_compression(b"") is Compression.UNCOMPRESSED
    assert detect_compression(b"\x1f") is Compression.UNCOMPRESSED
    assert detect_compression(b"\x28\xb5\x2f") is Compression.UNCOMPRESSED
    assert detect_compression(b"usr/\x00\x00\x00") is Compression.UNCOMPRESSED
    assert detect_compression(memoryview(b"\x28\xb5\x2f\xfd rest")) is Compression.ZSTD


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar", Compression.UNCOMPRESSED),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", Compression.UNCOMPRESSED),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.oci.image.manifest.v1+json", None),
        ("application/octet-stream", None),
        ("", None),
    ],
)
def test_media_types(media_type: str, expected: Compression | None) -> None:
    assert compression_from_media_type(media_type) is expected


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@settings(max_examples=40, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=5000), min_size=1, max_size=4),
    chunk=st.integers(1, 4096),
    padding=st.sampled_from([0, 0, 9]),
)
def test_gunzip_multi_member(parts: list[bytes], chunk: int, padding: int) -> None:
    blob = b"".join(gzip.compress(p, 6) for p in parts) + bytes(padding)
    expect = b"".join(parts)
    if not padding:
        assert gzip.decompress(blob) == expect
    got = b"".join(iter_decompress(Compression.GZIP, _chunks(blob, chunk)))
    assert got == expect


def test_gunzip_large_output_is_streamed() -> None:
    data = bytes(30 << 20)
    blob = gzip.compress(data, 1)
    sizes = [len(c) for c in iter_decompress(Compression.GZIP, [blob])]
    assert sum(sizes) == len(data)
    assert max(sizes) <= 1 << 20


def test_gunzip_against_system_gzip() -> None:
    data = random.Random(1).randbytes(100_000) * 2
    blob = subprocess.run(["gzip", "-9", "-c"], input=data, capture_output=True, check=True).stdout
    assert b"".join(iter_decompress(Compression.GZIP, _chunks(blob, 1000))) == data


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        gzip.compress(b"hello" * 100)[:-3],
        gzip.compress(b"hello") + b"garbage",
        gzip.compress(b"hello") + bytes(4) + b"\x01",
        b"\x1f\x8b\x08\x00" + bytes(20),
        b"plain text",
    ],
)
def test_gunzip_errors(blob: bytes) -> None:
    with pytest.raises(CompressionError):
        b"".join(iter_decompress(Compression.GZIP, _chunks(blob, 7) or [b""]))


@settings(max_examples=30, deadline=None)
@given(parts=st.lists(st.binary(max_size=5000), min_size=1, max_size=4), chunk=st.integers(1, 999))
def test_unzstd_multi_frame(parts: list[bytes], chunk: int) -> None:
    cctx = zstandard.ZstdCompressor()
    blob = b"".join(cctx.compress(p) for p in parts)
    got = b"".join(iter_decompress(Compression.ZSTD, _chunks(blob, chunk)))
    assert got == b"".join(parts)


def test_unzstd_errors() -> None:
    blob = zstandard.ZstdCompressor().compress(random.Random(3).randbytes(10_000))
    with pytest.raises(CompressionError):
        b"".join(iter_decompress(Compression.ZSTD, [blob[:-5]]))
    with pytest.raises(CompressionError):
        b"".join(iter_decompress(Compression.ZSTD, [blob[:100] + bytes(200)]))
    with pytest.raises(CompressionError):
        b"".join(iter_decompress(Compression.ZSTD, []))


def test_uncompressed_passthrough() -> None:
    assert list(iter_decompress(Compression.UNCOMPRESSED, [b"ab", b"", bytearray(b"c")])) == [
        b"ab",
        b"c",
    ]
