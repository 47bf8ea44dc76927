"""The unpacker's streaming tar reader: Go's rules, bounded meta entries, GNU sparse maps."""

from __future__ import annotations

import io
import tarfile

import pytest

from snapshotter.content.tarstream import TarReader
from snapshotter.errors import TarFormatError
from snapshotter.soci.tarheader import MAX_META_SIZE


def _reader(data: bytes) -> TarReader:
    return TarReader(io.BytesIO(data).read)


def _pax(records: dict[str, str], name: str = "f", size: int = 0, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = size, records
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_entries_stream_and_their_data_is_read_or_skipped() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(3):
            info = tarfile.TarInfo(f"f{i}")
            info.size = 1000 + i
            t.addfile(info, io.BytesIO(bytes([i]) * info.size))
    tar = _reader(buf.getvalue())
    got = []
    for entry in tar:
        got.append((entry.name, entry.size, tar.read_data(10) if entry.name != "f1" else b""))
    assert got == [("f0", 1000, b"\0" * 10), ("f1", 1001, b""), ("f2", 1002, b"\2" * 10)]


def test_a_huge_meta_entry_is_refused_before_it_is_read() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, MAX_META_SIZE + 1
    header = info.tobuf(tarfile.GNU_FORMAT)
    # Only the header is there: the reader must not try to read (or allocate) the payload.
    with pytest.raises(TarFormatError, match="more than"):
        list(_reader(header[:512]))


@pytest.mark.parametrize(
    "records",
    [
        {"GNU.sparse.map": "0,10,5,10", "GNU.sparse.size": "100"},  # overlapping regions
        {"GNU.sparse.map": "90,20", "GNU.sparse.size": "100"},  # past the end
        {"GNU.sparse.map": "0,10,20", "GNU.sparse.size": "100"},  # odd
        {"GNU.sparse.map": "0,5", "GNU.sparse.size": "100", "GNU.sparse.numblocks": "2"},
    ],
)
def test_bad_sparse_maps_are_format_errors(records: dict[str, str]) -> None:
    with pytest.raises(TarFormatError):
        list(_reader(_pax(records, size=10, data=b"x" * 10)))


def test_sparse_data_must_match_the_map() -> None:
    tar = _pax({"GNU.sparse.map": "0,4,50,4", "GNU.sparse.size": "100"}, size=6, data=b"x" * 6)
    with pytest.raises(TarFormatError, match="lists 8 bytes of data, the entry holds 6"):
        list(_reader(tar))


def test_pax_0_1_sparse_entry() -> None:
    tar = _pax({"GNU.sparse.map": "0,4,50,4", "GNU.sparse.size": "100"}, size=8, data=b"abcdwxyz")
    reader = _reader(tar)
    (entry,) = list(reader)
    assert (entry.size, entry.sparse, entry.data_size) == (100, [(0, 4), (50, 4)], 8)
