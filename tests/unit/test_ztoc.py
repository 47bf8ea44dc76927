"""zTOC codec: round trips, validation, and hostile input (only ZtocError may escape)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import random
import struct
import tracemalloc
from dataclasses import replace

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.errors import CheckpointError, FormatError, ZtocError
from snapshotter.soci import flatbuf
from snapshotter.soci.ztoc import (
    ENTRY_TYPES,
    CompressionAlgorithm,
    FileMetadata,
    TocEntries,
    Ztoc,
    ZtocTooLargeError,
    decode_ztoc,
    encode_ztoc,
    entry_columns,
    validate_ztoc,
    ztoc_digest,
)

INT64_MAX = 2**63 - 1
INT64 = st.integers(-(2**63), INT64_MAX)

# Text that came from a tar stream: valid unicode, or arbitrary bytes via surrogateescape.
_unicode = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_raw = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
tar_text = st.one_of(_unicode, _raw)
tar_name = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12),
    st.binary(min_size=1, max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
span_digest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@st.composite
def ztocs(draw: st.DrawFn, max_files: int = 8) -> Ztoc:
    """Valid zTOCs: entries laid out without overlap, stored in any order."""
    n = draw(st.integers(0, max_files))
    limit = draw(st.sampled_from([0, 600, 2**20, 2**58]))
    offset = 0
    files = []
    for _ in range(n):
        offset += draw(st.integers(0, limit))
        size = draw(st.integers(0, limit))
        files.append(
            FileMetadata(
                name=draw(tar_name),
                type=draw(st.sampled_from(sorted(ENTRY_TYPES))),
                uncompressed_offset=offset,
                uncompressed_size=size,
                linkname=draw(tar_text),
                mode=draw(INT64),
                uid=draw(st.integers(0, 2**32 - 1)),
                gid=draw(st.integers(0, 2**32 - 1)),
                uname=draw(tar_text),
                gname=draw(tar_text),
                mod_time=draw(st.sampled_from(["0001-01-01T00:00:00Z", "2024-05-06T07:08:09.5Z"])),
                devmajor=draw(INT64),
                devminor=draw(INT64),
                pax_records=dict(
                    sorted(draw(st.dictionaries(tar_name, tar_text, max_size=3)).items())
                ),
            )
        )
        offset += size
    total = offset + draw(st.integers(0, limit))
    if draw(st.booleans()):
        files = draw(st.permutations(files))
    nspans = draw(st.integers(1, 4))
    return Ztoc(
        version=draw(st.one_of(st.just("0.9"), tar_name)),
        build_tool_identifier=draw(tar_text),
        compressed_archive_size=draw(st.integers(0, INT64_MAX)),
        uncompressed_archive_size=total,
        files=list(files),
        compression_algorithm=draw(st.sampled_from(list(CompressionAlgorithm))),
        max_span_id=nspans - 1,
        span_digests=draw(st.lists(span_digest, min_size=nspans, max_size=nspans)),
        checkpoints=draw(st.binary(max_size=64)),
    )


def sample_ztoc() -> Ztoc:
    """A small hand-written zTOC covering every field."""
    return Ztoc(
        version="0.9",
        build_tool_identifier="pysoci test",
        compressed_archive_size=4321,
        uncompressed_archive_size=10240,
        files=[
            FileMetadata("etc/", "dir", 512, 0, mode=0o755, mod_time="2024-01-01T00:00:00Z"),
            FileMetadata(
                "etc/passwd",
                "reg",
                1024,
                700,
                mode=0o644,
                uid=1000,
                gid=1000,
                uname="user",
                gname="group",
                pax_records={"SCHILY.xattr.user.k": "v\x00w", "mtime": "1.5"},
            ),
            FileMetadata("etc/link", "symlink", 2048, 0, linkname="passwd"),
            FileMetadata("dev/null", "char", 2560, 0, devmajor=1, devminor=3),
        ],
        compression_algorithm=CompressionAlgorithm.GZIP,
        max_span_id=1,
        span_digests=["sha256:" + "ab" * 32, "sha256:" + "0f" * 32],
        checkpoints=bytes(range(40)),
    )


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ztocs())
def test_round_trip(z: Ztoc) -> None:
    blob = encode_ztoc(z)
    assert decode_ztoc(blob) == z
    assert decode_ztoc(memoryview(blob)) == z
    assert decode_ztoc(bytearray(blob)) == z
    assert encode_ztoc(copy.deepcopy(z)) == blob  # deterministic


def test_round_trip_sample_and_edges() -> None:
    z = sample_ztoc()
    z.files.append(
        FileMetadata(
            b"caf\xc3\xa9/\xff\xfe".decode("utf-8", "surrogateescape"),
            "reg",
            2**62,
            2**20,
            uid=2**32 - 1,
            gid=2**32 - 1,
            mode=-1,
            pax_records={
                "SCHILY.xattr.security.capability": b"\x01\x00\xff".decode(
                    "utf-8", "surrogateescape"
                )
            },
        )
    )
    z.uncompressed_archive_size = INT64_MAX
    z.compression_algorithm = CompressionAlgorithm.UNCOMPRESSED
    back = decode_ztoc(encode_ztoc(z))
    assert back == z
    assert back.files[-1].name.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9/\xff\xfe"
    assert back.files[1].xattrs == {"user.k": "v\x00w"}
    assert list(back.files[1].pax_records) == ["SCHILY.xattr.user.k", "mtime"]


def test_xattrs_written_sorted_by_key() -> None:
    z = sample_ztoc()
    z.files[1].pax_records = {"b": "2", "a": "1", "SCHILY.xattr.z": "3"}
    root = flatbuf.root(encode_ztoc(z), ZtocError)
    toc = root.table(4)
    assert toc is not None
    keys = [x.string(0) for x in toc.vector_of_tables(0)[1].vector_of_tables(13)]
    assert keys == ["SCHILY.xattr.z", "a", "b"]


def test_gzip_default_omitted_uncompressed_written() -> None:
    z = sample_ztoc()
    gz = flatbuf.root(encode_ztoc(z), ZtocError).table(5)
    assert gz is not None
    assert gz.scalar(0, "b", -99) == -99  # absent: the schema default applies
    z.compression_algorithm = CompressionAlgorithm.UNCOMPRESSED
    un = flatbuf.root(encode_ztoc(z), ZtocError).table(5)
    assert un is not None
    assert un.scalar(0, "b", -99) == 2


def test_ztoc_digest() -> None:
    blob = encode_ztoc(sample_ztoc())
    assert ztoc_digest(blob) == "sha256:" + hashlib.sha256(blob).hexdigest()


# --- an independent raw builder, for zTOCs that encode_ztoc refuses to write ----------------


def raw_ztoc(
    files: list[dict[str, object]],
    *,
    version: str | None = "0.9",
    uncompressed: int = 1 << 20,
    algorithm: int | None = None,
    max_span_id: int = 0,
    digests: list[str] | None = None,
    checkpoints: bytes = b"",
) -> tuple[bytes, dict[str, int]]:
    """Build a zTOC with the flatbuffers runtime directly; return it and object positions.

    `files` entries map schema field names to values; the returned positions (absolute
    offsets in the blob of length-prefixed objects) let tests corrupt lengths in place.
    """
    b = flatbuffers.Builder(256)
    ends: dict[str, int] = {}
    file_offs = []
    slots = {
        "name": 0, "type": 1, "uncompressed_offset": 2, "uncompressed_size": 3, "linkname": 4,
        "mode": 5, "uid": 6, "gid": 7, "uname": 8, "gname": 9, "mod_time": 10, "devmajor": 11,
        "devminor": 12,
    }  # fmt: skip
    for i, f in enumerate(files):
        strings = {k: b.CreateString(v) for k, v in f.items() if isinstance(v, str)}
        if "name" in strings:
            ends[f"name{i}"] = strings["name"]
        xattrs = None
        if "xattrs" in f:
            pairs = f["xattrs"]
            assert isinstance(pairs, list)
            xoffs = []
            for k, v in pairs:
                ko, vo = b.CreateString(k), b.CreateString(v)
                b.StartObject(2)
                b.PrependUOffsetTRelativeSlot(0, ko, 0)
                b.PrependUOffsetTRelativeSlot(1, vo, 0)
                xoffs.append(b.EndObject())
            b.StartVector(4, len(xoffs), 4)
            for o in reversed(xoffs):
                b.PrependUOffsetTRelative(o)
            xattrs = ends[f"xattrs{i}"] = b.EndVector()
        b.StartObject(14)
        for k, v in f.items():
            if k in strings:
                b.PrependUOffsetTRelativeSlot(slots[k], strings[k], 0)
            elif k in ("uid", "gid"):
                b.PrependUint32Slot(slots[k], v, 0)
            elif k != "xattrs":
                b.PrependInt64Slot(slots[k], v, 0)
        if xattrs is not None:
            b.PrependUOffsetTRelativeSlot(13, xattrs, 0)
        file_offs.append(b.EndObject())
    b.StartVector(4, len(file_offs), 4)
    for o in reversed(file_offs):
        b.PrependUOffsetTRelative(o)
    files_vec = ends["files"] = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, files_vec, 0)
    toc = b.EndObject()
    if digests is None:
        digests = ["sha256:" + "00" * 32] * (max_span_id + 1)
    dig = [b.CreateString(d) for d in digests]
    b.StartVector(4, len(dig), 4)
    for o in reversed(dig):
        b.PrependUOffsetTRelative(o)
    dig_vec = ends["digests"] = b.EndVector()
    cps = ends["checkpoints"] = b.CreateByteVector(checkpoints)
    b.StartObject(4)
    if algorithm is not None:
        b.PrependInt8Slot(0, algorithm, 1)
    b.PrependInt32Slot(1, max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, dig_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, cps, 0)
    ci = b.EndObject()
    ver = b.CreateString(version) if version is not None else None
    b.StartObject(6)
    if ver is not None:
        b.PrependUOffsetTRelativeSlot(0, ver, 0)
    b.PrependInt64Slot(3, uncompressed, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependUOffsetTRelativeSlot(5, ci, 0)
    b.Finish(b.EndObject())
    blob = bytes(b.Output())
    return blob, {k: len(blob) - v for k, v in ends.items()}


def reg(name: str, offset: int, size: int, **kw: object) -> dict[str, object]:
    f: dict[str, object] = {"name": name, "type": "reg"}
    return f | {"uncompressed_offset": offset, "uncompressed_size": size} | kw


def test_raw_builder_agrees_with_decoder() -> None:
    blob, _ = raw_ztoc(
        [reg("a", 512, 10, uid=7, xattrs=[("k", "v")]), {"name": "d", "type": "dir"}],
        algorithm=2,
        max_span_id=1,
    )
    z = decode_ztoc(blob)
    assert z.compression_algorithm is CompressionAlgorithm.UNCOMPRESSED
    assert z.files == [
        FileMetadata("a", "reg", 512, 10, uid=7, mod_time="", pax_records={"k": "v"}),
        FileMetadata("d", "dir", 0, 0, mod_time=""),
    ]
    assert z.span_digests == ["sha256:" + "00" * 32] * 2


# --- semantic validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "kwargs", "match"),
    [
        ([reg("a", 512, 100), reg("b", 600, 10)], {}, "overlaps"),
        ([reg("a", 512, 100), reg("b", 0, 1024)], {}, "overlaps"),
        ([reg("a", -512, 10)], {}, "outside"),
        ([reg("a", 512, -1)], {}, "outside"),
        ([reg("a", 1000, 100)], {"uncompressed": 1099}, "outside"),
        ([reg("a", 2**62, 2**62)], {"uncompressed": INT64_MAX}, "outside"),
        ([{"name": "x", "type": "socket"}], {}, "unknown type 'socket'"),
        ([{"type": "reg"}], {}, "empty name"),
        ([reg("a", 0, 0, xattrs=[("k", "1"), ("k", "2")])], {}, "duplicate"),
        ([], {"max_span_id": 1, "digests": ["sha256:" + "00" * 32]}, "max_span_id"),
        ([], {"max_span_id": -1, "digests": []}, "max_span_id"),
        ([], {"digests": ["sha256:" + "AB" * 32]}, "span digest 0"),
        ([], {"digests": ["sha512:" + "ab" * 32]}, "span digest 0"),
        ([], {"algorithm": 3}, "unknown compression algorithm 3"),
        ([], {"algorithm": 0}, "unknown compression algorithm 0"),
        ([], {"algorithm": -1}, "unknown compression algorithm -1"),
        ([], {"version": None}, "empty version"),
        ([], {"uncompressed": -1}, "negative archive size"),
    ],
)
def test_decode_rejects_inconsistent(
    files: list[dict[str, object]], kwargs: dict[str, object], match: str
) -> None:
    blob, _ = raw_ztoc(files, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ZtocError, match=match):
        decode_ztoc(blob)


def test_overlap_rules() -> None:
    z = sample_ztoc()
    z.files = [
        FileMetadata("empty1", "reg", 512, 0),
        FileMetadata("empty2", "reg", 512, 0),
        FileMetadata("a", "reg", 512, 100),
        FileMetadata("b", "reg", 1024, 0),
        FileMetadata("hard", "hardlink", 1024, 0, linkname="a"),
        FileMetadata("c", "reg", 1024, 9216),
    ]
    validate_ztoc(z)
    assert decode_ztoc(encode_ztoc(z)).files == z.files
    z.files.append(FileMetadata("inside", "reg", 1100, 0))
    with pytest.raises(ZtocError, match=r"'inside'.*overlaps.*'c'"):
        validate_ztoc(z)


def test_encode_refuses_invalid_and_unrepresentable() -> None:
    bad = replace(sample_ztoc(), max_span_id=5)
    with pytest.raises(ZtocError, match="max_span_id"):
        encode_ztoc(bad)
    decode_blob = encode_ztoc(bad, validate=False)
    with pytest.raises(ZtocError, match="max_span_id"):
        decode_ztoc(decode_blob)
    z = sample_ztoc()
    z.files[1].uid = 2**32
    with pytest.raises(ZtocError, match="file entry 1"):
        encode_ztoc(z)
    z = sample_ztoc()
    z.files[0].name = "\ud800"  # a lone surrogate that is not a surrogateescape byte
    with pytest.raises(ZtocError, match="file entry 0"):
        encode_ztoc(z)


# --- malformed flatbuffers ----------------------------------------------------------------


def test_every_truncation_fails() -> None:
    z = sample_ztoc()
    blob = encode_ztoc(z)
    # The blob ends with the first string written ("etc/\0") plus alignment padding;
    # cutting only padding leaves a valid zTOC.
    needed = len(blob.rstrip(b"\0")) + 1
    assert blob[needed - 5 : needed] == b"etc/\0"
    for n in range(needed):
        with pytest.raises(ZtocError):
            decode_ztoc(blob[:n])
    for n in range(needed, len(blob) + 1):
        assert decode_ztoc(blob[:n]) == z


@pytest.mark.parametrize("what", ["files", "digests", "checkpoints", "name0", "xattrs0"])
@pytest.mark.parametrize("length", [2**31, 2**32 - 1, 2**20])
def test_huge_length_fails_fast_without_allocating(what: str, length: int) -> None:
    blob, pos = raw_ztoc(
        [reg("file", 0, 10, xattrs=[("k", "v")])], max_span_id=1, checkpoints=b"xyz"
    )
    bad = bytearray(blob)
    struct.pack_into("<I", bad, pos[what], length)
    tracemalloc.start()
    try:
        with pytest.raises(ZtocError, match="out of bounds"):
            decode_ztoc(bytes(bad))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def handmade(*words: tuple[str, int]) -> bytes:
    return b"".join(struct.pack("<" + fmt, v) for fmt, v in words)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (handmade(("I", 4)), "too short"),
        (handmade(("I", 4), ("i", 0)), "vtable size 0"),  # vtable == table
        (handmade(("I", 1000), ("I", 0)), "table at 1000"),
        (handmade(("I", 4), ("i", -100)), "vtable of table at 4"),  # past the end
        (handmade(("I", 4), ("i", 100)), "vtable of table at 4"),  # before the start
        (handmade(("I", 4), ("i", 4), ("I", 0)), "table size 0"),  # vtable = root offset
        (handmade(("I", 8), ("H", 3), ("H", 4), ("i", 4)), "vtable size 3"),  # odd
        (handmade(("I", 8), ("H", 4), ("H", 2), ("i", 4)), "table size 2"),
        (handmade(("I", 8), ("H", 4), ("H", 64), ("i", 4)), "size 64 is out of bounds"),
        # version field whose uoffset lies beyond the table's declared size
        (handmade(("I", 12), ("H", 6), ("H", 4), ("H", 4), ("H", 0), ("i", 8)), "outside"),
        # version string pointing past the end
        (
            handmade(("I", 12), ("H", 6), ("H", 8), ("H", 4), ("H", 0), ("i", 8), ("I", 100)),
            "string at 116",
        ),
        # version string whose length runs past the end
        (
            handmade(
                ("I", 12), ("H", 6), ("H", 8), ("H", 4), ("H", 0), ("i", 8), ("I", 4), ("I", 5)
            ),
            "string of length 5",
        ),
        # version string without its NUL terminator
        (
            handmade(
                *[("I", 12), ("H", 6), ("H", 8), ("H", 4), ("H", 0), ("i", 8), ("I", 4)],
                *[("I", 3), ("I", 0x41414141)],
            ),
            "NUL",
        ),
    ],
)
def test_handmade_malformed(blob: bytes, match: str) -> None:
    with pytest.raises(ZtocError, match=match):
        decode_ztoc(blob)


def _ztoc_sharing_one_file_table(n: int, xattrs: int, name: str) -> bytes:
    """n file entries that all point at one table whose xattrs vector has `xattrs` entries."""
    b = flatbuffers.Builder(1024)
    entries = []
    for i in range(xattrs):
        k = b.CreateString(f"k{i}")
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        entries.append(b.EndObject())
    b.StartVector(4, xattrs, 4)
    for x in reversed(entries):
        b.PrependUOffsetTRelative(x)
    xv = b.EndVector()
    name_off = b.CreateString(name)
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(0, name_off, 0)
    b.PrependUOffsetTRelativeSlot(13, xv, 0)
    f = b.EndObject()
    b.StartVector(4, n, 4)
    for _ in range(n):
        b.PrependUOffsetTRelative(f)
    fv = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, fv, 0)
    toc = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_shared_tables_cannot_amplify_work() -> None:
    """20000 entries x 20000 xattrs through shared offsets: rejected by the decode budget
    (work bounded by the blob's size), not decoded 4e8 times."""
    blob = _ztoc_sharing_one_file_table(20000, 20000, "f")
    assert len(blob) < 2_000_000
    with pytest.raises(ZtocError, match="budget"):
        decode_ztoc(blob)
    with pytest.raises(ZtocError, match="budget"):
        toc = flatbuf.root(blob, ZtocError).table(4)
        assert toc is not None
        for t in toc.vector_of_tables(0):
            t.vector_of_tables(13)


def test_shared_strings_cost_nothing_extra() -> None:
    """Many references to one long string decode once (cached), and sharing is legal."""
    blob = _ztoc_sharing_one_file_table(20000, 0, "n" * 100_000)
    with pytest.raises(ZtocError, match="empty version"):
        decode_ztoc(blob)
    toc = flatbuf.root(blob, ZtocError).table(4)
    assert toc is not None
    names = [t.string(0) for t in toc.vector_of_tables(0)]
    assert len(names) == 20000
    assert all(x is names[0] for x in names)


def test_shared_strings_from_other_builders_are_accepted() -> None:
    """A builder that deduplicates strings (flatc's CreateSharedString) is legitimate."""
    z = sample_ztoc()
    n = 5000
    z.files = [
        FileMetadata(f"f{i}", "reg", 512 * (i + 1), 10, uname="u" * 40, gname="g" * 40)
        for i in range(n)
    ]
    z.uncompressed_archive_size = 512 * (n + 1)
    blob = encode_ztoc(z)  # encode_ztoc itself shares repeated strings
    assert len(blob) < n * 120
    assert decode_ztoc(blob) == z


def test_bit_flips() -> None:
    blob = encode_ztoc(sample_ztoc())
    rng = random.Random(1234)
    rejected = 0
    for _ in range(3000):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        try:
            z = decode_ztoc(bytes(bad))
        except ZtocError:
            rejected += 1
        else:
            validate_ztoc(z)
    assert rejected > 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ZtocError):
        validate_ztoc(decode_ztoc(data))


_SAMPLE_BLOB = encode_ztoc(sample_ztoc())


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_SAMPLE_BLOB) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(_SAMPLE_BLOB)),
    st.binary(max_size=16),
)
def test_fuzz_mutations(edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    bad = bytearray(_SAMPLE_BLOB)
    for pos, value in edits:
        bad[pos] = value
    data = bytes(bad[:cut]) + tail
    with contextlib.suppress(ZtocError):
        validate_ztoc(decode_ztoc(data))


def test_large_ztoc_round_trip() -> None:
    # How fast is bench/'s (make bench-lazyfs): here, that 20000 entries come back the same.
    n = 20000
    files = [FileMetadata(f"dir/file{i}", "reg", 512 + 1024 * i, 500) for i in range(n)]
    z = replace(sample_ztoc(), files=files, uncompressed_archive_size=1024 * n + 512)
    assert decode_ztoc(encode_ztoc(z)) == z


# --- the flatbuffer reader itself -----------------------------------------------------------


def test_flatbuf_reader_views_and_error_class() -> None:
    blob = encode_ztoc(sample_ztoc())
    ci = flatbuf.root(blob, CheckpointError).table(5)
    assert ci is not None
    view = ci.bytes_vector(3)
    assert view is not None
    assert view.obj is blob  # zero-copy
    assert bytes(view) == bytes(range(40))
    assert ci.bytes_vector(9) is None  # slot past the (trimmed) vtable
    assert ci.vector_of_strings(2) == ["sha256:" + "ab" * 32, "sha256:" + "0f" * 32]
    assert ci.scalar(1, "i", 7) == 1
    with pytest.raises(CheckpointError):  # the caller's class, not ZtocError
        flatbuf.root(blob[:100], CheckpointError).table(5)
    with pytest.raises(CheckpointError):
        flatbuf.root(b"\xff" * 16, CheckpointError)


def test_entry_bound_is_a_typed_error_before_decoding_entries() -> None:
    blob = encode_ztoc(sample_ztoc())
    assert len(decode_ztoc(blob, max_entries=4).files) == 4
    with pytest.raises(ZtocTooLargeError, match="4 entries, more than the bound of 3"):
        decode_ztoc(blob, max_entries=3)
    assert issubclass(ZtocTooLargeError, FormatError)  # the caller unpacks such layers


def test_decoded_entries_are_columns_and_materialize_on_demand() -> None:
    z = sample_ztoc()
    back = decode_ztoc(encode_ztoc(z))
    assert isinstance(back.files, TocEntries) and back.files == z.files
    c = entry_columns(back.files)
    assert c.name(1) == b"etc/passwd" and c.linkname(2) == b"passwd"
    assert c.uid.tolist() == [0, 1000, 0, 0] and c.devices == {3: (1, 3)}
    assert c.xattrs == {1: {"user.k": "v\x00w"}}
    assert c.mtime_ns[0] == 1704067200 * 10**9
    assert entry_columns(z.files).name(1) == c.name(1)  # the same from a list
