"""Single-header parsing, PAX records and entry chains (tarfile is the oracle for headers)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tarfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import TarFormatError
from snapshotter.soci.tarheader import (
    MAX_META_SIZE,
    ZERO_BLOCK,
    header_matches,
    parse_header_block,
    parse_pax_records,
    parse_pax_time,
    read_entry,
)


def with_checksum(block: bytes | bytearray, signed: bool = False) -> bytes:
    """Recompute the header checksum (the field counts as 8 spaces)."""
    b = bytearray(block)
    b[148:156] = b" " * 8
    total = sum((c - 256 if c >= 128 else c) for c in b) if signed else sum(b)
    b[148:156] = b"%06o\0 " % total
    return bytes(b)


def patch(block: bytes, start: int, value: bytes) -> bytes:
    b = bytearray(block)
    b[start : start + len(value)] = value
    return with_checksum(b)


def header(fmt: Any = tarfile.GNU_FORMAT, **attrs: object) -> bytes:
    info = tarfile.TarInfo(str(attrs.pop("name", "file")))
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(fmt, "utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [(tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar"), (tarfile.PAX_FORMAT, "ustar")],
)
def test_fields_match_tarfile(fmt: int, expected: str) -> None:
    buf = header(
        fmt,
        name="some/file.txt",
        size=1234,
        mode=0o4755,
        uid=1000,
        gid=100,
        uname="alice",
        gname="users",
        mtime=1_700_000_000,
        type=tarfile.CHRTYPE,
        devmajor=4,
        devminor=64,
        linkname="",
    )
    hdr = parse_header_block(buf, 0)
    ref = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
    assert hdr.format == expected
    assert (hdr.path, hdr.size, hdr.mode, hdr.uid, hdr.gid) == (
        ref.name,
        ref.size,
        ref.mode,
        ref.uid,
        ref.gid,
    )
    assert (hdr.uname, hdr.gname, hdr.mtime) == (ref.uname, ref.gname, ref.mtime)
    assert (hdr.devmajor, hdr.devminor, hdr.typeflag) == (ref.devmajor, ref.devminor, "3")


def test_ustar_prefix_and_gnu_no_prefix() -> None:
    name = "p" * 120 + "/" + "n" * 90
    buf = header(tarfile.USTAR_FORMAT, name=name)
    hdr = parse_header_block(buf, 0)
    assert (hdr.prefix, hdr.name, hdr.path) == ("p" * 120, "n" * 90, name)
    # The same bytes with GNU magic: bytes 345.. are not a prefix there.
    gnu = patch(buf, 257, b"ustar  \0")
    hdr = parse_header_block(gnu, 0)
    assert (hdr.format, hdr.prefix, hdr.path) == ("gnu", "", "n" * 90)
    # v7: no magic, no uname/gname/devices.
    v7 = patch(buf, 257, bytes(8) + b"root".ljust(32, b"\0"))
    hdr = parse_header_block(v7, 0)
    assert (hdr.format, hdr.path, hdr.uname) == ("v7", "n" * 90, "")
    # star: 131-byte prefix, "tar\0" trailer
    star = patch(patch(buf, 345, b"q" * 131 + b"\0" * 24), 508, b"tar\0")
    hdr = parse_header_block(star, 0)
    assert (hdr.format, hdr.path) == ("star", "q" * 131 + "/" + "n" * 90)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"0000644\0", 0o644),
        (b"   644 \0", 0o644),
        (b"644\0\0\0\0\0", 0o644),
        (b"0000644 ", 0o644),
        (b"\0\0\0\0\0\0\0\0", 0),
        (b"        ", 0),
        (b"7777777\0", 0o7777777),
        (b"\x80\0\0\0\0\0\x01\xa4", 0o644),  # base-256
        (b"\xff\xff\xff\xff\xff\xff\xff\xff", -1),  # base-256 negative
        (b"\xc0\0\0\0\0\0\0\0", -(1 << 62)),
    ],
)
def test_numeric_forms(field: bytes, value: int) -> None:
    buf = patch(header(), 100, field)
    assert parse_header_block(buf, 0).mode == value


@given(st.integers(-(1 << 63), (1 << 63) - 1))
@settings(max_examples=200, deadline=None)
def test_base256_uid_mtime(value: int) -> None:
    field = bytearray(value.to_bytes(12, "big", signed=True))
    field[0] = (field[0] & 0x7F) | 0x80 | (0x40 if value < 0 else 0)
    buf = patch(header(), 136, bytes(field))
    assert parse_header_block(buf, 0).mtime == value
    assert tarfile.TarInfo.frombuf(buf, "utf-8", "strict").mtime == value


@pytest.mark.parametrize(
    "field",
    [b"0000 644", b"00006449", b"-0000644", b"+0000644", b"0_00644\0", b"\x01\x02\x03\0\0\0\0\0"],
)
def test_malformed_octal(field: bytes) -> None:
    buf = patch(header(), 100, field)
    with pytest.raises(TarFormatError, match="offset 4096: malformed octal mode"):
        parse_header_block(buf, 4096)


def test_base256_overflow() -> None:
    buf = patch(header(), 124, b"\x80" + b"\xff" * 11)
    with pytest.raises(TarFormatError, match="size overflows int64"):
        parse_header_block(buf, 0)


def test_checksum() -> None:
    buf = bytearray(header(name="é" * 3))  # bytes >= 0x80
    signed = with_checksum(buf, signed=True)
    assert signed != with_checksum(buf)
    assert parse_header_block(signed, 0).name == "é" * 3
    bad = bytearray(with_checksum(buf))
    bad[0] ^= 1
    with pytest.raises(TarFormatError, match="checksum at offset 1024"):
        parse_header_block(bytes(bad), 1024)
    with pytest.raises(TarFormatError, match="checksum"):
        parse_header_block(bytes(range(256)) * 2, 0)
    with pytest.raises(TarFormatError, match="truncated"):
        parse_header_block(bytes(buf[:100]), 0)


def test_non_utf8_strings_round_trip() -> None:
    raw = b"caf\xe9/\xff\xfe"
    buf = patch(header(), 0, raw + b"\0")
    name = parse_header_block(buf, 0).name
    assert name.encode("utf-8", "surrogateescape") == raw


def test_pax_records() -> None:
    data = b"".join(
        [
            b"19 path=some/where\n",
            b"27 SCHILY.xattr.user.a=\xff\x00b\n",
            b"6 k=v\n",
            b"7 k=v2\n",
            b"9 empty=\n",
            b"12 nl=a\nb=c\n",
            b"0010 z=12\n",
        ]
    )
    records = parse_pax_records(data, 0)
    assert records["path"] == "some/where"
    assert records["SCHILY.xattr.user.a"].encode("utf-8", "surrogateescape") == b"\xff\x00b"
    assert records["k"] == "v2"
    assert records["empty"] == ""
    assert records["nl"] == "a\nb=c"
    assert records["z"] == "12"
    assert parse_pax_records(b"", 0) == {}


@pytest.mark.parametrize(
    "data",
    [
        b"5 a=b",
        b"7 a=b\n",
        b"5 a=b\n",
        b"x a=b\n",
        b"-6 a=b\n",
        b"+6 a=b\n",
        b"6a=b\n\n",
        b"6 a-b\n",
        b"5 =b\n",
        b"4 a\n",
        b"2 \n",
        b"0 a=b\n",
        b"99999999999999999999 a=b\n",
        b"9 path=\0\n",
        b"10 p\0a=th\n",
        b"6 a=b\n   ",
        b"6 a=b\n\0",
        b" 6 a=b\n",
    ],
)
def test_pax_records_malformed(data: bytes) -> None:
    with pytest.raises(TarFormatError, match="PAX header at offset 77"):
        parse_pax_records(data, 77)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_pax_records_fuzz(data: bytes) -> None:
    with contextlib.suppress(TarFormatError):
        parse_pax_records(data, 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", (1, 0)),
        ("1.", (1, 0)),
        ("1.5", (1, 500_000_000)),
        ("-1.5", (-2, 500_000_000)),
        ("-0.25", (-1, 750_000_000)),
        ("+3.000000001", (3, 1)),
        ("1.1234567899", (1, 123_456_789)),
        ("-1.0000000005", (-1, 0)),
        ("9223372036854775807", ((1 << 63) - 1, 0)),
    ],
)
def test_pax_time(value: str, expected: tuple[int, int]) -> None:
    assert parse_pax_time(value) == expected


@pytest.mark.parametrize(
    "value", ["", ".5", "1.5e3", "1.-5", "1 ", "0x10", "1_0", "9223372036854775808", "１"]
)
def test_pax_time_malformed(value: str) -> None:
    with pytest.raises(TarFormatError):
        parse_pax_time(value)


def pax_member(records: dict[str, str], fmt: int = tarfile.PAX_FORMAT, **attrs: object) -> bytes:
    info = tarfile.TarInfo(str(attrs.pop("name", "file")))
    for key, value in attrs.items():
        setattr(info, key, value)
    info.pax_headers = records
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    return out.getvalue()


def test_read_entry_pax_chain() -> None:
    data = pax_member(
        {"path": "long/" * 40 + "name", "SCHILY.xattr.user.k": "v", "mtime": "12.5", "uid": "7"},
        size=10,
        uid=3,
        gid=4,
    )
    meta, data_offset = read_entry(data, 0)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ref = tf.getmembers()[0]
    assert data_offset == ref.offset_data == meta.uncompressed_offset
    assert meta.name == ref.name == "long/" * 40 + "name"
    assert (meta.uid, meta.gid, meta.uncompressed_size, meta.type) == (7, 4, 10, "reg")
    assert meta.mod_time == "1970-01-01T00:00:12.5Z"
    assert list(meta.pax_records) == sorted(ref.pax_headers)
    assert meta.xattrs == {"user.k": "v"}
    # read_entry does not need the data, only the headers
    assert read_entry(data[:data_offset], 0) == (meta, data_offset)
    assert header_matches(meta, data[:data_offset], 0)
    # shifted into a larger stream: base says where buf[0] lives
    assert header_matches(meta, b"\0" * 1000 + data, 1000, base=-1000)
    assert not header_matches(meta, data, 0, base=512)


def test_read_entry_gnu_long_names() -> None:
    data = pax_member(
        {}, tarfile.GNU_FORMAT, name="n" * 300, type=tarfile.SYMTYPE, linkname="t" * 200
    )
    meta, data_offset = read_entry(data, 0)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ref = tf.getmembers()[0]
    assert (meta.name, meta.linkname, meta.type) == ("n" * 300, "t" * 200, "symlink")
    assert data_offset == ref.offset_data
    with pytest.raises(TarFormatError, match="truncated"):
        read_entry(data[: data_offset - 1], 0)
    with pytest.raises(TarFormatError, match="truncated"):
        read_entry(data[:700], 0)  # inside the long name payload
    with pytest.raises(TarFormatError, match="end-of-archive"):
        read_entry(ZERO_BLOCK * 2, 0)
    with pytest.raises(TarFormatError):
        read_entry(data, -1)


def test_header_matches_detects_each_field() -> None:
    data = pax_member({}, tarfile.GNU_FORMAT, name="a/b", size=5, mode=0o640, uid=1, gid=2)
    meta, _ = read_entry(data, 0)
    assert header_matches(meta, data, 0)
    changes: list[dict[str, object]] = [
        {"name": "a/c"},
        {"type": "dir"},
        {"uncompressed_size": 6},
        {"mode": 0o644},
        {"uid": 9},
        {"gid": 9},
        {"linkname": "x"},
        {"uncompressed_offset": 1024},
    ]
    for change in changes:
        changed = dataclasses.replace(meta, **change)  # type: ignore[arg-type]
        assert not header_matches(changed, data, 0), change
    corrupt = bytearray(data)
    corrupt[5] ^= 0x20
    assert not header_matches(meta, bytes(corrupt), 0)
    assert not header_matches(meta, data[:100], 0)


def test_oversize_meta_rejected_before_reading() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = MAX_META_SIZE + 1
    buf = info.tobuf(tarfile.GNU_FORMAT)
    with pytest.raises(TarFormatError, match="GNU long name at offset 0 is 1048577 bytes"):
        read_entry(buf, 0)
    info.type = tarfile.XHDTYPE
    with pytest.raises(TarFormatError, match="PAX header"):
        read_entry(info.tobuf(tarfile.GNU_FORMAT), 0)
