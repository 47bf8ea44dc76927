"""End to end over the formats: layer → zTOC → encode/decode → every file read through it.

The oracle is Python's tarfile reading the same uncompressed tar.
"""

from __future__ import annotations

import io
import os
import random
import sysconfig
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.compression.detect import Compression
from snapshotter.compression.gzip import inflate_spans
from snapshotter.errors import CompressionError, DigestMismatchError, FormatError, TarFormatError
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.reader import ZtocReader, clean_path
from snapshotter.soci.zinfo import GzipZinfo
from snapshotter.soci.ztoc import CompressionAlgorithm, decode_ztoc, encode_ztoc
from tests.fixtures.images import gzip_blob, pigz_blob
from tests.fixtures.tars import gzip_with_header_fields, random_tar

Variant = str
VARIANTS: list[Variant] = ["gzip1", "gzip6", "gzip9", "pigz", "fields", "none"]


def compress(tar: bytes, variant: Variant) -> tuple[bytes, Compression]:
    if variant == "none":
        return tar, Compression.UNCOMPRESSED
    if variant == "pigz":
        return pigz_blob(tar, blocksize_kib=32), Compression.GZIP
    if variant == "fields":
        return gzip_with_header_fields(tar), Compression.GZIP
    return gzip_blob(tar, int(variant[4:])), Compression.GZIP


def reader_for(blob: bytes, compression: Compression, span_size: int) -> ZtocReader:
    ztoc = build_ztoc(
        [blob[i : i + 7919] for i in range(0, len(blob), 7919)], compression, span_size
    )
    # Through the wire format, as a snapshotter would get it.
    ztoc = decode_ztoc(encode_ztoc(ztoc))
    return ZtocReader(ztoc, lambda s, e: blob[s:e])


def go_archive_end(tar: bytes) -> int:
    """Where Go's archive/tar stops reading `tar` (Python's tarfile as the oracle): past the
    last entry and the two end-of-archive blocks, before the record padding."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.getmembers()
        end = t.offset
    assert tar[end : end + 1024] == bytes(1024)
    return end + 1024


def assert_matches_tar(reader: ZtocReader, tar: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
        by_name = {clean_path(f.name): f for f in reader.ztoc.files}
        assert len(reader.ztoc.files) == len(members)
        for m in members:
            meta = by_name[clean_path(m.name)]
            assert meta.uncompressed_offset == m.offset_data
            assert meta.mode == m.mode
            assert (meta.uid, meta.gid) == (m.uid, m.gid)
            if m.isreg():
                assert (meta.type, meta.uncompressed_size) == ("reg", m.size)
                f = t.extractfile(m)
                assert f is not None
                assert reader.read_file(meta) == f.read(), m.name
            elif m.issym():
                assert (meta.type, meta.linkname) == ("symlink", m.linkname)
            elif m.islnk():
                assert (meta.type, meta.linkname) == ("hardlink", m.linkname)
            elif m.isdir():
                assert meta.type == "dir"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    variant=st.sampled_from(VARIANTS),
    span_size=st.sampled_from([1024, 4096, 65536]),
)
def test_every_file_through_the_ztoc_equals_tar(
    seed: int, variant: Variant, span_size: int
) -> None:
    tar = random_tar(random.Random(seed), max_file_size=3 * span_size)
    blob, compression = compress(tar, variant)
    reader = reader_for(blob, compression, span_size)
    # soci's uncompressed size: the archive's end, unless the last span starts at or past it.
    end = go_archive_end(tar)
    last_start = reader.zinfo.uncompressed_bounds(reader.zinfo.max_span_id)[0]
    usize = reader.ztoc.uncompressed_archive_size
    assert usize == (end if last_start < end else len(tar))
    assert tar[usize:] == bytes(len(tar) - usize)
    assert reader.ztoc.compressed_archive_size == len(blob)
    expected_algo = (
        CompressionAlgorithm.UNCOMPRESSED if variant == "none" else CompressionAlgorithm.GZIP
    )
    assert reader.ztoc.compression_algorithm == expected_algo
    assert_matches_tar(reader, tar)
    rng = random.Random(seed ^ 0x5A5A)
    for _ in range(20):
        off = rng.randrange(len(tar))
        n = rng.randrange(0, 3 * span_size)
        assert reader.read(off, n) == tar[:usize][off : off + n]


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.UNCOMPRESSED])
def test_uncompressed_size_is_where_the_archive_ends(compression: Compression) -> None:
    """As soci's ztoc/toc_builder.go writes it (Go's archive/tar position at io.EOF): the
    end-of-archive blocks count, the record padding after them does not. For the Debian
    layer of the interop tests that is 267441664 of a 267448320-byte stream."""
    tar = random_tar(random.Random(8), max_file_size=300_000)
    assert len(tar) % tarfile.RECORDSIZE == 0 and len(tar) - go_archive_end(tar) > 0
    blob = tar if compression is Compression.UNCOMPRESSED else gzip_blob(tar)
    reader = reader_for(blob, compression, 64 << 10)
    assert reader.ztoc.uncompressed_archive_size == go_archive_end(tar)
    assert_matches_tar(reader, tar)


def test_uncompressed_size_falls_back_to_the_stream_when_the_last_span_is_padding() -> None:
    """A tar layer whose archive ends before its last span starts (the record padding spans
    a span boundary): soci would write a last span of negative length, pysoci the whole
    stream, so that every span stays readable."""
    tar = random_tar(random.Random(1), max_file_size=0, max_entries=2)
    end = go_archive_end(tar)
    span = 512
    assert (len(tar) - 1) // span * span >= end  # the last span lies in the padding
    reader = reader_for(tar, Compression.UNCOMPRESSED, span)
    assert reader.ztoc.uncompressed_archive_size == len(tar)
    last = reader.zinfo.max_span_id
    assert reader.read_spans(last, last) == bytes(span)


def test_tampered_span_is_never_served() -> None:
    tar = random_tar(random.Random(3), max_file_size=20000)
    blob = bytearray(gzip_blob(tar))
    reader = reader_for(bytes(blob), Compression.GZIP, 4096)
    bad = bytearray(blob)
    s, e = reader.zinfo.compressed_bounds(reader.zinfo.num_spans // 2)
    bad[(s + e) // 2] ^= 0xFF
    tampered = ZtocReader(reader.ztoc, lambda a, b: bytes(bad[a:b]))
    with pytest.raises(DigestMismatchError):
        for span in range(reader.zinfo.num_spans):
            tampered.read_spans(span, span)


@pytest.mark.parametrize(
    ("blob", "compression", "error"),
    [
        (b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 100, Compression.GZIP, CompressionError),
        (gzip_blob(b"not a tar at all" * 100), Compression.GZIP, TarFormatError),
        (b"not a tar at all" * 100, Compression.UNCOMPRESSED, TarFormatError),
    ],
)
def test_bad_layers_give_typed_errors(
    blob: bytes, compression: Compression, error: type[Exception]
) -> None:
    with pytest.raises(error):
        build_ztoc([blob], compression, 4096)


def test_truncated_gzip_layer_is_an_error() -> None:
    blob = gzip_blob(random_tar(random.Random(5), max_file_size=50000))
    with pytest.raises((CompressionError, TarFormatError)):
        build_ztoc([blob[: len(blob) // 2]], Compression.GZIP, 4096)


@pytest.mark.slow
def test_real_world_tree_fully_verified(tmp_path: Path) -> None:
    """A real tree of tens of thousands of entries (the interpreter's stdlib and C headers)."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/include")]
    tree = tmp_path / "tree"
    tree.mkdir()
    for i, r in enumerate(roots):
        os.symlink(r, tree / f"r{i}")
    tar = tar_of_tree_following_top(tree)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    assert len(members) > 10000, "the real-world tree should have tens of thousands of entries"
    blob = gzip_blob(tar, 6)
    span_size = 1 << 20
    reader = reader_for(blob, Compression.GZIP, span_size)
    zinfo = reader.zinfo
    assert isinstance(zinfo, GzipZinfo)
    # Every span inflated from only its own bytes, concatenated, is the whole tar.
    parts = []
    for span in range(zinfo.num_spans):
        s, e = zinfo.compressed_bounds(span)
        parts.append(inflate_spans(zinfo, span, span, blob[s:e]))
    usize = reader.ztoc.uncompressed_archive_size
    assert usize == go_archive_end(tar) < len(tar)
    assert b"".join(parts) == tar[:usize] and tar[usize:] == bytes(len(tar) - usize)
    # Every entry's metadata and offsets agree with tarfile; every file's data is at its offset.
    by_name = {clean_path(f.name): f for f in reader.ztoc.files}
    assert len(by_name) == len(members)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in members:
            meta = by_name[clean_path(m.name)]
            assert meta.uncompressed_offset == m.offset_data, m.name
            assert meta.mode == m.mode
            if m.isreg():
                f = t.extractfile(m)
                assert f is not None
                got = tar[
                    meta.uncompressed_offset : meta.uncompressed_offset + meta.uncompressed_size
                ]
                assert got == f.read(), m.name
    # And a sample of files read one by one through verified spans.
    rng = random.Random(11)
    regs = [f for f in reader.ztoc.files if f.type == "reg"]
    for meta in rng.sample(regs, 200):
        assert (
            reader.read_file(meta)
            == tar[meta.uncompressed_offset : meta.uncompressed_offset + meta.uncompressed_size]
        )


def tar_of_tree_following_top(tree: Path) -> bytes:
    """Like tar_of_tree, but the top-level symlinks are followed (so roots can be linked in)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top in sorted(tree.iterdir()):
            real = top.resolve()
            for dirpath, dirnames, filenames in os.walk(real):
                dirnames[:] = sorted(
                    d for d in dirnames if d not in ("__pycache__", "site-packages")
                )
                for name in [*dirnames, *sorted(filenames)]:
                    path = Path(dirpath) / name
                    tar.add(path, arcname=f"{top.name}/{path.relative_to(real)}", recursive=False)
    return buf.getvalue()


def test_format_error_is_value_error() -> None:
    assert issubclass(FormatError, ValueError)
