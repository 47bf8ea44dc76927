"""Tar stream → TOC, checked against Python's tarfile reading the same archives.

Archives come from tarfile (GNU, PAX, USTAR) and from the GNU tar binary (gnu, posix, ustar,
v7). Known deliberate differences from tarfile: tarfile strips the trailing "/" of directory
names (we keep the raw name), reads uname/gname/devices from v7 headers (Go does not) and
applies PAX global headers (Go does not).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import gzip
import io
import math
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snapshotter.errors import TarFormatError
from snapshotter.soci.rfc3339 import parse_rfc3339_nano
from snapshotter.soci.tarheader import header_matches
from snapshotter.soci.toc import TocBuilder, build_toc
from snapshotter.soci.ztoc import FileMetadata

TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}
KIND_TO_TYPE = {
    "reg": tarfile.REGTYPE,
    "hardlink": tarfile.LNKTYPE,
    "symlink": tarfile.SYMTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "dir": tarfile.DIRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


# ---------------------------------------------------------------- oracle


def oracle_members(data: bytes) -> list[tarfile.TarInfo]:
    if not data:
        return []  # tarfile calls an empty stream an error; Go and we an empty archive
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tf:
        return tf.getmembers()


def oracle_time(member: tarfile.TarInfo) -> tuple[int, int]:
    text = member.pax_headers.get("mtime")
    if not text:
        return int(member.mtime), 0
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        value = decimal.Decimal(text).quantize(decimal.Decimal("1e-9"), decimal.ROUND_DOWN)
        seconds = math.floor(value)
        return seconds, int((value - seconds) * 10**9)


def assert_matches_oracle(data: bytes, toc: list[FileMetadata], v7: bool = False) -> None:
    members = oracle_members(data)
    assert len(toc) == len(members)
    for ours, ref in zip(toc, members, strict=True):
        kind = TYPES[ref.type]
        assert ours.type == kind, ref.name
        assert (ours.name.rstrip("/") if kind == "dir" else ours.name) == ref.name
        assert ours.uncompressed_offset == ref.offset_data, ref.name
        assert ours.uncompressed_size == ref.size, ref.name
        assert (ours.mode, ours.uid, ours.gid, ours.linkname) == (
            ref.mode,
            ref.uid,
            ref.gid,
            ref.linkname,
        ), ref.name
        if v7:
            assert (ours.uname, ours.gname, ours.devmajor, ours.devminor) == ("", "", 0, 0)
        else:
            assert (ours.uname, ours.gname, ours.devmajor, ours.devminor) == (
                ref.uname,
                ref.gname,
                ref.devmajor,
                ref.devminor,
            ), ref.name
        assert ours.pax_records == ref.pax_headers, ref.name
        keys = [k.encode("utf-8", "surrogateescape") for k in ours.pax_records]
        assert keys == sorted(keys)
        assert parse_rfc3339_nano(ours.mod_time) == oracle_time(ref), ref.name
        # every entry can be re-verified from the header bytes (what the lazy fs does)
        assert header_matches(ours, data, ref.offset), ref.name


def chunked(data: bytes, sizes: list[int]) -> Iterator[bytes | memoryview]:
    """Split `data` with sizes cycled; alternate bytes and memoryviews of a reused buffer."""
    pos = 0
    i = 0
    scratch = bytearray(max(sizes))
    while pos < len(data):
        size = sizes[i % len(sizes)]
        piece = data[pos : pos + size]
        if i % 2:
            scratch[: len(piece)] = piece
            yield memoryview(scratch)[: len(piece)]
            scratch[: len(piece)] = b"\xaa" * len(piece)  # caller reuses its buffer
        else:
            yield piece
        pos += size
        i += 1


# ---------------------------------------------------------------- archive builders


def make_tar(specs: list[dict[str, Any]], fmt: int, trailer: str = "full") -> bytes:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for spec in specs:
            spec = dict(spec)
            info = tarfile.TarInfo(spec.pop("name"))
            kind = spec.pop("kind", "reg")
            info.type = KIND_TO_TYPE[kind]
            content = spec.pop("content", b"")
            info.pax_headers = spec.pop("pax", {})
            for key, value in spec.items():
                setattr(info, key, value)
            if kind == "reg":
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
            else:
                tf.addfile(info)
    data = out.getvalue()
    if trailer == "full":
        return data
    end = len(data.rstrip(b"\0"))
    end = (end + 511) // 512 * 512
    return data[: end + {"none": 0, "one": 512, "two": 1024}[trailer]]


def all_kinds(long_names: bool = True) -> list[dict[str, Any]]:
    long_dir = "d" * 60 + "/" + "e" * 70 if long_names else "dd"
    return [
        {"name": "./", "kind": "dir", "mode": 0o755},
        {"name": "usr/bin/", "kind": "dir", "mode": 0o1777},
        {"name": "usr/bin/tool", "content": os.urandom(1500), "mode": 0o4755, "uid": 1000},
        {"name": "empty", "content": b"", "mode": 0o600, "gid": 42},
        {"name": "exact", "content": b"x" * 1024},
        {"name": "sym", "kind": "symlink", "linkname": "usr/bin/tool"},
        {"name": "hard", "kind": "hardlink", "linkname": "usr/bin/tool"},
        {"name": "dev/null", "kind": "char", "devmajor": 1, "devminor": 3, "mode": 0o666},
        {"name": "dev/loop0", "kind": "block", "devmajor": 7, "devminor": 0},
        {"name": "pipe", "kind": "fifo"},
        {"name": f"{long_dir}/file", "content": b"long", "uname": "alice", "gname": "staff"},
        {"name": "caf\xe9-ü", "content": b"utf8"},
        {"name": "mtime", "content": b"", "mtime": 1_700_000_000},
    ]


# ---------------------------------------------------------------- tarfile archives


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tarfile_archives_all_kinds(fmt: int) -> None:
    data = make_tar(all_kinds(), fmt)
    toc = build_toc([data])
    assert_matches_oracle(data, toc)
    by_name = {m.name: m for m in toc}
    assert by_name["usr/bin/"].type == "dir"  # raw name kept, not cleaned
    assert by_name["./"].type == "dir"
    assert by_name["usr/bin/tool"].mode == 0o4755
    assert by_name["usr/bin/"].mode == 0o1777
    assert by_name["mtime"].mod_time == "2023-11-14T22:13:20Z"
    assert by_name["caf\xe9-ü"].uncompressed_size == 4


def test_ustar_prefix_split() -> None:
    name = "p" * 150 + "/" + "n" * 99
    data = make_tar([{"name": name, "content": b"abc"}], tarfile.USTAR_FORMAT)
    assert data[345:495] == b"p" * 150  # really stored in the prefix field
    [meta] = build_toc([data])
    assert meta.name == name
    assert meta.pax_records == {}


def test_gnu_base256_and_extreme_times() -> None:
    specs = [
        {"name": "bigid", "content": b"a", "uid": 2_097_152, "gid": 4_294_967_295},
        {"name": "neg", "content": b"b", "mtime": -1},
        {"name": "old", "content": b"c", "mtime": -62_135_596_800},
        {"name": "future", "content": b"d", "mtime": 8**11 + 5},
        {"name": "far", "content": b"e", "mtime": 400_000_000_000},
    ]
    data = make_tar(specs, tarfile.GNU_FORMAT)
    assert data[108] & 0x80  # base-256 uid
    toc = build_toc([data])
    assert_matches_oracle(data, toc)
    times = [m.mod_time for m in toc]
    future = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=8**11 + 5)
    assert times[:4] == [
        "1970-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        future.strftime("%Y-%m-%dT%H:%M:%SZ"),
    ]
    assert times[4].startswith("14645-")  # year beyond 9999 formats without crashing


def test_pax_subsecond_negative_times_and_xattrs() -> None:
    specs: list[dict[str, Any]] = [
        {"name": "a", "content": b"1", "mtime": 1.5},
        {"name": "b", "content": b"2", "pax": {"mtime": "-1.25"}},
        {"name": "c", "content": b"3", "pax": {"mtime": "1700000000.123456789123"}},
        {
            "name": "x",
            "content": b"4",
            "pax": {
                "SCHILY.xattr.user.bin": "\udcff\x00\udc80",
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                "zzz.vendor": "1",
                "SCHILY.xattr.trusted.overlay.opaque": "y",
            },
        },
        {"name": "big-uid", "content": b"5", "uid": 4_294_967_295},
    ]
    data = make_tar(specs, tarfile.PAX_FORMAT)
    toc = build_toc([data])
    assert_matches_oracle(data, toc)
    a, b, c, x, big = toc
    assert a.mod_time == "1970-01-01T00:00:01.5Z"
    assert b.mod_time == "1969-12-31T23:59:58.75Z"
    assert c.mod_time == "2023-11-14T22:13:20.123456789Z"
    assert x.xattrs["user.bin"].encode("utf-8", "surrogateescape") == b"\xff\x00\x80"
    assert list(x.pax_records) == sorted(x.pax_records)
    assert big.uid == 4_294_967_295


@pytest.mark.parametrize("trailer", ["none", "one", "two", "full"])
def test_end_of_archive_forms(trailer: str) -> None:
    data = make_tar(all_kinds(), tarfile.GNU_FORMAT, trailer)
    builder = TocBuilder()
    builder.feed(data)
    assert_matches_oracle(data, builder.finish())
    assert builder.at_end == (trailer in ("two", "full"))
    assert builder.bytes_consumed == len(data)
    # Where Go's archive/tar stops reading (soci's uncompressed archive size): past the two
    # zero blocks, never into the record padding; the stream's end when it comes first.
    last_end = len(make_tar(all_kinds(), tarfile.GNU_FORMAT, "none"))
    want = {"none": last_end, "one": last_end + 512, "two": last_end + 1024}
    assert builder.archive_end == want.get(trailer, last_end + 1024)
    assert trailer != "full" or builder.archive_end < len(data)


def test_data_after_end_marker_is_ignored() -> None:
    data = make_tar(all_kinds(), tarfile.GNU_FORMAT, "two")
    builder = TocBuilder()
    builder.feed(data + b"garbage that is not tar" * 100)
    builder.feed(os.urandom(5000))
    toc = builder.finish()
    assert toc == build_toc([data])
    assert builder.end_offset == builder.archive_end == len(data)
    assert builder.entries == len(toc)


# ---------------------------------------------------------------- Go semantics tarfile lacks


def meta_entry(flag: bytes, payload: bytes, name: str = "././@PaxHeader") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = flag
    info.size = len(payload)
    return info.tobuf(tarfile.GNU_FORMAT) + payload + bytes(-len(payload) % 512)


def pax_payload(records: dict[str, str]) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" " + key.encode() + b"=" + value.encode("utf-8", "surrogateescape") + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def real_entry(name: str, data: bytes = b"", **attrs: Any) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


END = bytes(1024)


def test_later_pax_header_replaces_earlier_and_global_is_not_applied() -> None:
    data = (
        meta_entry(b"x", pax_payload({"path": "first", "uname": "u1"}))
        + meta_entry(b"x", pax_payload({"gname": "g2"}))
        + real_entry("f1", b"abc", uname="hu", gname="hg")
        + meta_entry(b"g", pax_payload({"uname": "global", "comment": "hi"}))
        + real_entry("f2", b"", uname="hu")
        + END
    )
    f1, f2 = build_toc([data])
    assert (f1.name, f1.uname, f1.gname, f1.pax_records) == ("f1", "hu", "g2", {"gname": "g2"})
    assert (f2.name, f2.uname, f2.pax_records) == ("f2", "hu", {})


def test_global_header_discards_pending_meta_and_is_validated() -> None:
    data = (
        meta_entry(b"L", b"lost-name\0")
        + meta_entry(b"g", pax_payload({"a": "b"}))
        + real_entry("kept")
        + END
    )
    assert [m.name for m in build_toc([data])] == ["kept"]
    bad = meta_entry(b"g", b"7 a=b\n") + real_entry("kept") + END
    with pytest.raises(TarFormatError, match="PAX header at offset 0"):
        build_toc([bad])


def test_gnu_long_name_beats_pax_path_and_empty_values_keep_header() -> None:
    data = (
        meta_entry(b"x", pax_payload({"path": "pax-name", "uname": "", "linkpath": "pl"}))
        + meta_entry(b"L", b"gnu-name\0ignored")
        + meta_entry(b"K", b"gnu-link\0")
        + real_entry("hdr-name", type=tarfile.SYMTYPE, linkname="hl", uname="hu")
        + END
    )
    [meta] = build_toc([data])
    assert (meta.name, meta.linkname, meta.uname) == ("gnu-name", "gnu-link", "hu")
    assert meta.pax_records == {"linkpath": "pl", "path": "pax-name", "uname": ""}
    # an empty long name does not override
    data = meta_entry(b"L", b"\0") + real_entry("hdr-name") + END
    assert build_toc([data])[0].name == "hdr-name"


def test_areg_with_slash_is_dir_and_header_only_types_have_no_data() -> None:
    data = (
        real_entry("olddir/", type=tarfile.AREGTYPE)
        + real_entry("oldfile", b"zz", type=tarfile.AREGTYPE)
        # header-only types with a size field: Go skips no data but reports the size
        + real_entry("hl", type=tarfile.LNKTYPE, linkname="oldfile", size=700)
        + real_entry("after", b"q")
        + END
    )
    olddir, oldfile, hl, after = build_toc([data])
    assert (olddir.type, olddir.name, oldfile.type) == ("dir", "olddir/", "reg")
    assert (hl.type, hl.uncompressed_size, hl.uncompressed_offset) == ("hardlink", 700, 2048)
    assert after.uncompressed_offset == 2560


def test_pax_size_overrides_header_size() -> None:
    payload = b"p" * 700
    data = (
        meta_entry(b"x", pax_payload({"size": "700"}))
        + real_entry("f", size=0)[:512]
        + payload
        + bytes(324)
        + real_entry("g", b"1")
        + END
    )
    f, g = build_toc([data])
    assert (f.uncompressed_size, f.uncompressed_offset) == (700, 1536)
    assert g.uncompressed_offset == 1536 + 1024 + 512


def test_offsets_sorted_and_monotonic() -> None:
    toc = build_toc([make_tar(all_kinds(), tarfile.PAX_FORMAT)])
    offsets = [m.uncompressed_offset for m in toc]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(o % 512 == 0 for o in offsets)


# ---------------------------------------------------------------- GNU tar binary


def build_tree(root: Path) -> bool:
    """Fill `root` with every kind of entry; True when the user xattr could be set."""
    (root / "dir/sub/deeper").mkdir(parents=True)
    (root / "dir/sub/deeper/file").write_bytes(b"deep")
    (root / "small.txt").write_bytes(b"s" * 100)
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(random.Random(1).randbytes(70_000))
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.symlink("small.txt", root / "link")
    os.link(root / "small.txt", root / "hard")
    os.utime(root / "small.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "empty", ns=(-5_000_000_000, -5_000_000_000))
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "loop", 0o660 | 0o060000, os.makedev(7, 0))
    try:
        os.setxattr(root / "small.txt", "user.pysoci", b"\x00\xffvalue")
    except OSError:
        return False
    return True


def build_long_tree(root: Path) -> None:
    (root / ("d" * 60) / ("e" * 60)).mkdir(parents=True)
    (root / ("d" * 60) / ("e" * 60) / ("f" * 90)).write_bytes(b"long")
    (root / ("n" * 100)).write_bytes(b"hundred")
    os.symlink("t" * 150, root / "longlink")
    with open(os.fsencode(root) + b"/caf\xe9-\xff", "wb") as f:
        f.write(b"latin1 name")


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar", "v7", "oldgnu"])
def test_gnu_tar_binary(tmp_path: Path, fmt: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    has_xattr = build_tree(tree)
    build_long_tree(tree)
    out = tmp_path / "out.tar"
    proc = subprocess.run(
        # --xattrs would silently switch any format to posix
        ["tar", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(tree), "."]
        + (["--xattrs"] if fmt == "posix" else []),
        capture_output=True,
        check=False,
    )
    assert proc.returncode in (0, 2), proc.stderr  # 2: some entries not representable
    data = out.read_bytes()
    magic = {
        "gnu": b"ustar  \0",
        "oldgnu": b"ustar  \0",
        "posix": b"ustar\x0000",
        "ustar": b"ustar\x0000",
    }
    assert data[257:265] == magic.get(fmt, bytes(8))
    toc = build_toc(chunked(data, [1000, 7, 512, 1 << 20]))
    assert_matches_oracle(data, toc, v7=fmt == "v7")
    names = {m.name for m in toc}
    assert "./dir/sub/deeper/file" in names
    assert "./dir/" in names or fmt == "v7"
    if fmt in ("gnu", "posix", "oldgnu"):
        assert "./" + "d" * 60 + "/" + "e" * 60 + "/" + "f" * 90 in names
        assert any(m.linkname == "t" * 150 for m in toc)
        assert any(m.name.encode("utf-8", "surrogateescape").endswith(b"caf\xe9-\xff") for m in toc)
    if fmt == "posix":
        # small.txt and hard are one inode: whichever comes first carries the data
        small = next(m for m in toc if m.name in ("./hard", "./small.txt") and m.type == "reg")
        assert small.mod_time == "2020-09-13T12:26:40.123456789Z"
        if has_xattr:
            assert small.xattrs["user.pysoci"].encode("utf-8", "surrogateescape") == (
                b"\x00\xffvalue"
            )


# ---------------------------------------------------------------- property: trees × chunkings

name_part = st.text(alphabet="abcé_-.\udcff", min_size=1, max_size=14).filter(
    lambda s: s not in (".", "..")
)


@st.composite
def tree_specs(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int]:
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    ustar = fmt == tarfile.USTAR_FORMAT
    specs: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 8))):
        parts = draw(st.lists(name_part, min_size=1, max_size=3 if ustar else 12))
        name = "/".join(parts)
        if ustar:
            name = name.replace("\udcff", "x")[:99]
        kind = draw(st.sampled_from(list(KIND_TO_TYPE)))
        spec: dict[str, Any] = {
            "name": name + ("/" if kind == "dir" and draw(st.booleans()) else ""),
            "kind": kind,
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.integers(0, 2_097_151 if ustar else 4_294_967_295)),
            "gid": draw(st.integers(0, 2_097_151)),
            "uname": draw(st.sampled_from(["", "root", "user"])),
            "mtime": draw(st.integers(0 if ustar else -(10**10), 8**11 - 1)),
        }
        if kind == "reg":
            spec["content"] = draw(st.binary(max_size=1500))
        if kind in ("symlink", "hardlink"):
            spec["linkname"] = draw(st.text(alphabet="xyz/", max_size=99 if ustar else 150))
        if kind in ("char", "block"):
            spec["devmajor"] = draw(st.integers(0, 2_097_151))
            spec["devminor"] = draw(st.integers(0, 2_097_151))
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            spec["pax"] = {
                "SCHILY.xattr.user." + draw(name_part.map(lambda s: s.replace("\udcff", "y"))): (
                    draw(st.text(max_size=20))
                )
            }
            if draw(st.booleans()):
                spec["mtime"] = draw(st.integers(-(10**9), 10**10)) / 1000
        specs.append(spec)
    return specs, fmt


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree_specs(),
    st.lists(st.integers(1, 2048) | st.just(1 << 20), min_size=1, max_size=8),
    st.sampled_from(["none", "one", "two", "full"]),
)
def test_random_trees_and_chunkings(
    tree: tuple[list[dict[str, Any]], int], sizes: list[int], trailer: str
) -> None:
    specs, fmt = tree
    try:
        data = make_tar(specs, fmt, trailer)
    except (ValueError, UnicodeError):
        assume(False)  # not representable in this format (tarfile refuses)
        return
    whole = build_toc([data])
    assert_matches_oracle(data, whole)
    assert build_toc(chunked(data, sizes)) == whole


def test_one_byte_chunks() -> None:
    data = make_tar(all_kinds(), tarfile.PAX_FORMAT)
    builder = TocBuilder()
    view = memoryview(data)
    for i in range(len(data)):
        builder.feed(view[i : i + 1])
    assert builder.finish() == build_toc([data])


# ---------------------------------------------------------------- bad input


def good_archive() -> bytes:
    return make_tar(
        [
            {"name": "a", "content": b"x" * 600},
            {"name": "b" * 120, "content": b"y" * 100, "pax": {"SCHILY.xattr.user.k": "v"}},
        ],
        tarfile.PAX_FORMAT,
    )


@pytest.mark.parametrize("flag", ["7", "S", "V", "M", "N", "D", "A", "Z", "I", "\x01", "9"])
def test_unsupported_typeflags(flag: str) -> None:
    info = tarfile.TarInfo("weird-entry")
    info.type = flag.encode("latin-1")
    data = real_entry("ok", b"1") + info.tobuf(tarfile.GNU_FORMAT) + END
    with pytest.raises(TarFormatError, match="unsupported tar entry type") as exc:
        build_toc([data])
    assert repr(flag) in str(exc.value)
    assert "weird-entry" in str(exc.value)


def test_pax_sparse_rejected() -> None:
    data = meta_entry(b"x", pax_payload({"GNU.sparse.major": "1"})) + real_entry("s") + END
    with pytest.raises(TarFormatError, match="sparse"):
        build_toc([data])


def test_bad_checksum_names_offset() -> None:
    data = bytearray(real_entry("a", b"1") + real_entry("b") + END)
    data[1024 + 3] ^= 0x01
    with pytest.raises(TarFormatError, match="checksum at offset 1024"):
        build_toc([bytes(data)])


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(4096),
        gzip.compress(make_tar(all_kinds(), tarfile.GNU_FORMAT)),
        b"\x1f\x8b" + bytes(510),
        b"not a tar",
        bytes(512) + b"\x01" + bytes(511),  # zero block then a non-zero block
    ],
)
def test_non_tar_bytes(data: bytes) -> None:
    with pytest.raises(TarFormatError):
        build_toc([data])


def test_truncations() -> None:
    data = good_archive()
    members = oracle_members(data)
    a, b = members
    cuts = {
        "in first header": 100,
        "in data": a.offset_data + 300,
        "in padding": a.offset_data + 600,
        "in PAX header block": b.offset + 10,
        "in PAX data": b.offset + 512 + 5,
        "in PAX padding": b.offset + 512 + 100,
        "in real header after PAX": b.offset_data - 1,
        "after PAX entry before real header": b.offset_data - 512,
        "in second zero block": b.offset_data + 512 + 600,
    }
    for label, cut in cuts.items():
        for chunk in (1 << 20, 100):
            with pytest.raises(TarFormatError, match="truncated") as exc:
                build_toc(chunked(data[:cut], [chunk]))
            assert exc.value is not None, label
    # exact boundaries are fine
    assert len(build_toc([data[: a.offset_data + 1024]])) == 1
    assert len(build_toc([data[: b.offset_data + 512]])) == 2
    assert build_toc([b""]) == []


def test_oversize_pax_header_rejected_from_its_header_alone() -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = (1 << 20) + 1
    builder = TocBuilder()
    with pytest.raises(TarFormatError, match="PAX header at offset 0 is 1048577 bytes"):
        builder.feed(info.tobuf(tarfile.GNU_FORMAT))
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 1 << 40
    with pytest.raises(TarFormatError, match="GNU long name"):
        build_toc([info.tobuf(tarfile.GNU_FORMAT)])
    # exactly 1 MiB is accepted
    ok = meta_entry(b"L", b"n" * (1 << 20)) + real_entry("x") + END
    assert build_toc([ok])[0].name == "n" * (1 << 20)


@pytest.mark.parametrize(
    "payload",
    [b"99 path=x\n", b"5 a=b\n", b"6 ab\n\n", b"x path=y\n", b"11 path=y\n", b"6 a=b"],
)
def test_malformed_pax_records(payload: bytes) -> None:
    data = meta_entry(b"x", payload) + real_entry("f") + END
    with pytest.raises(TarFormatError, match="PAX header at offset 0"):
        build_toc([data])


@pytest.mark.parametrize(
    "records",
    [
        {"uid": "4294967296"},
        {"gid": "-1"},
        {"uid": "1e3"},
        {"size": "-5"},
        {"size": "12x"},
        {"mtime": "abc"},
        {"atime": "1.2.3"},
        {"uid": "99999999999999999999"},
    ],
)
def test_bad_pax_numbers(records: dict[str, str]) -> None:
    data = meta_entry(b"x", pax_payload(records)) + real_entry("f") + END
    with pytest.raises(TarFormatError):
        build_toc([data])


def test_uid_out_of_uint32_in_header() -> None:
    data = make_tar([{"name": "f", "content": b"", "uid": 1 << 32}], tarfile.GNU_FORMAT)
    with pytest.raises(TarFormatError, match="uid 4294967296 not uint32"):
        build_toc([data])
    data = make_tar([{"name": "f", "content": b"", "gid": 1 << 40}], tarfile.GNU_FORMAT)
    with pytest.raises(TarFormatError, match="gid"):
        build_toc([data])


def test_meta_without_entry() -> None:
    with pytest.raises(TarFormatError, match="not followed by an entry"):
        build_toc([meta_entry(b"x", pax_payload({"path": "p"})) + END])
    with pytest.raises(TarFormatError, match="not followed by an entry"):
        build_toc([meta_entry(b"L", b"name\0")])


def test_feed_after_finish_is_a_bug() -> None:
    builder = TocBuilder()
    builder.finish()
    with pytest.raises(RuntimeError):
        builder.feed(b"")


# ---------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(TarFormatError):
        build_toc([data])


def fix_checksum(buf: bytearray, offset: int) -> None:
    block = buf[offset : offset + 512]
    block[148:156] = b" " * 8
    buf[offset + 148 : offset + 156] = b"%06o\0 " % sum(block)


FUZZ_PAX_ENTRY = {"name": "x", "content": b"1", "pax": {"SCHILY.xattr.user.a": "b", "mtime": "1.5"}}
FUZZ_BASE = make_tar(
    [*all_kinds(), FUZZ_PAX_ENTRY],
    tarfile.PAX_FORMAT,
    "two",
) + make_tar(all_kinds(), tarfile.GNU_FORMAT, "two")
FUZZ_HEADERS = sorted(
    {m.offset for m in oracle_members(FUZZ_BASE)}
    | {m.offset_data - 512 for m in oracle_members(FUZZ_BASE)}
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(FUZZ_HEADERS), st.integers(0, 511), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.integers(0, len(FUZZ_BASE)),
)
def test_fuzz_mutated_archives(mutations: list[tuple[int, int, int]], fix: bool, cut: int) -> None:
    buf = bytearray(FUZZ_BASE)
    for header_offset, pos, value in mutations:
        buf[header_offset + pos] = value
    if fix:
        for header_offset, _, _ in mutations:
            fix_checksum(buf, header_offset)
    for data in (bytes(buf), bytes(buf[:cut])):
        try:
            toc = build_toc(chunked(data, [333, 1 << 20]))
        except TarFormatError:
            continue
        for meta in toc:
            assert meta.type in KIND_TO_TYPE
            assert 0 <= meta.uid < 1 << 32 and meta.uncompressed_size >= 0
            parse_rfc3339_nano(meta.mod_time)
