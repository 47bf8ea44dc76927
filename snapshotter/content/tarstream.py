"""A streaming tar reader for unpacking layers: one entry at a time, nothing kept behind.

It reads entries the way Go's archive/tar (containerd's applier) does — headers parsed by
`soci.tarheader`, PAX `x` records and GNU long names applied to the next entry, PAX global
headers (`g`) skipped — and it understands GNU sparse files, in every format GNU tar writes:
the old GNU `S` entries (with extension blocks) and the PAX formats 0.0 (repeated
`GNU.sparse.offset`/`numbytes` records), 0.1 (`GNU.sparse.map`) and 1.0 (the map at the start
of the entry's data). A sparse entry is handed out with its data regions, so its holes need
never be written.

Memory does not grow with the archive: an entry's metadata lives until the next one is read,
and every meta payload (PAX records, long names, sparse maps) is bounded by MAX_META_SIZE, as
in Go. Malformed input is a TarFormatError.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from snapshotter.errors import TarFormatError
from snapshotter.soci.tarheader import (
    BLOCK_SIZE,
    MAX_META_SIZE,
    ZERO_BLOCK,
    RawHeader,
    padded_size,
    parse_header_block,
    parse_pax_time,
)

KINDS: dict[str, str] = {
    "0": "reg",
    "\0": "reg",
    "7": "reg",  # contiguous file: a regular file everywhere but on the systems that had it
    "S": "reg",  # old GNU sparse
    "1": "hardlink",
    "2": "symlink",
    "3": "char",
    "4": "block",
    "5": "dir",
    "6": "fifo",
}
XATTR_PREFIX = "SCHILY.xattr."
_INT = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_INT64_MAX = (1 << 63) - 1
_MAX_SPARSE_BLOCKS = MAX_META_SIZE // BLOCK_SIZE
"""Most extension blocks of an old GNU sparse map (43 008 entries), like the PAX bound."""


@dataclass(slots=True)
class TarEntry:
    """One real entry, with every PAX/GNU override applied."""

    name: str
    kind: str
    """reg, hardlink, symlink, char, block, dir or fifo."""
    size: int
    """The file's size (of a sparse file: its logical size, holes included)."""
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    offset: int
    """Where the entry's first header starts in the stream (for messages)."""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None
    """Of a sparse file: its data regions (offset, length), ascending and disjoint; the
    entry's data in the stream is these regions' bytes, one after the other."""

    @property
    def data_size(self) -> int:
        """Bytes of data that follow in the stream."""
        if self.kind != "reg":
            return 0
        if self.sparse is None:
            return self.size
        return sum(length for _, length in self.sparse)


def _pax_records(data: bytes, offset: int) -> list[tuple[str, str]]:
    """PAX records in order ("%d %s=%s\\n", lengths checked exactly)."""
    records: list[tuple[str, str]] = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:  # NUL padding after the last record (some writers)
            break
        space = data.find(b" ", pos, min(end, pos + 20))
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise TarFormatError(f"PAX header at offset {offset}: malformed record length")
        record_end = pos + int(length_text)
        if record_end > end or record_end <= space + 1 or data[record_end - 1] != 0x0A:
            raise TarFormatError(f"PAX header at offset {offset}: malformed record")
        key, eq, value = data[space + 1 : record_end - 1].partition(b"=")
        if not eq or not key:
            raise TarFormatError(f"PAX header at offset {offset}: record without key=value")
        records.append(
            (key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )
        pos = record_end
    return records


def _int(text: str, what: str, offset: int) -> int:
    if not _INT.fullmatch(text):
        raise TarFormatError(f"tar entry at offset {offset}: malformed {what} {text[:40]!r}")
    value = int(text)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise TarFormatError(f"tar entry at offset {offset}: {what} overflows int64")
    return value


def _gnu_number(raw: bytes, what: str, offset: int) -> int:
    """A numeric field of a GNU header: octal, or base-256 when the high bit is set."""
    if raw and raw[0] & 0x80:
        value = int.from_bytes(bytes((raw[0] & 0x7F,)) + raw[1:], "big")
        return value - (1 << (8 * len(raw) - 1)) if raw[0] & 0x40 else value
    digits = raw.strip(b" \0").split(b"\0", 1)[0]
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError:
        raise TarFormatError(f"tar entry at offset {offset}: malformed {what} {raw!r}") from None


def _pairs(numbers: list[int], offset: int) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise TarFormatError(f"sparse map at offset {offset} has an odd number of values")
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _check_sparse(regions: list[tuple[int, int]], size: int, offset: int) -> None:
    """Go's validateSparseEntries: non-negative, ascending, disjoint, within the size."""
    end = 0
    for start, length in regions:
        if start < 0 or length < 0 or start < end or start + length > size:
            raise TarFormatError(
                f"sparse map at offset {offset}: region ({start}, {length}) is out of order "
                f"or outside the file's {size} bytes"
            )
        end = start + length


class TarReader:
    """Entries of the tar stream `read(n)` yields (short reads only at its end)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.offset = 0
        """Bytes of the stream consumed so far."""
        self._remaining = 0  # data bytes of the current entry not read yet
        self._padding = 0
        self._map_start = 0  # where a format 1.0 sparse map began

    def _exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        while len(data) < n:
            more = self._read(n - len(data))
            if not more:
                raise TarFormatError(f"tar stream ends inside {what} at offset {self.offset}")
            data += more
        self.offset += n
        return data

    def _skip(self, n: int, what: str) -> None:
        while n:
            step = min(n, 1 << 20)
            self._exact(step, what)
            n -= step

    def read_data(self, n: int) -> bytes:
        """Up to `n` bytes of the current entry's data (b"" once it is all read)."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._exact(n, "an entry's data")
        self._remaining -= n
        return data

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            self._skip(self._remaining + self._padding, "an entry's data")
            self._remaining = self._padding = 0
            entry = self._next()
            if entry is None:
                return
            yield entry

    def _block(self) -> bytes | None:
        """The next 512-byte block, or None at the end of the stream (between blocks)."""
        first = self._read(BLOCK_SIZE)
        if not first:
            return None
        if len(first) < BLOCK_SIZE:
            self.offset += len(first)
            rest = self._exact(BLOCK_SIZE - len(first), "a tar header")
            return first + rest
        self.offset += BLOCK_SIZE
        return first

    def _next(self) -> TarEntry | None:
        pax: list[tuple[str, str]] = []
        long_name = long_link = ""
        start: int | None = None
        while True:
            at = self.offset
            block = self._block()
            if block is None:
                if start is not None:
                    raise TarFormatError(f"tar stream ends after the meta entry at {start}")
                return None
            if block == ZERO_BLOCK:
                # End of archive (one zero block, then a second or the stream's end, as Go).
                if start is not None:
                    raise TarFormatError(f"end-of-archive block at offset {at} after a meta entry")
                second = self._block()
                if second is not None and second != ZERO_BLOCK:
                    raise TarFormatError(f"a zero block then a header at offset {at}")
                return None
            hdr = parse_header_block(block, at)
            flag = hdr.typeflag
            if flag in "xgLK":
                if not 0 <= hdr.size <= MAX_META_SIZE:
                    raise TarFormatError(
                        f"tar meta entry at offset {at} is {hdr.size} bytes, more than "
                        f"{MAX_META_SIZE}"
                    )
                payload = self._exact(padded_size(hdr.size), "a meta entry")[: hdr.size]
                if flag == "g":  # validated and dropped, with anything pending (as Go)
                    _pax_records(payload, at)
                    pax, long_name, long_link, start = [], "", "", None
                    continue
                if flag == "x":
                    pax = _pax_records(payload, at)
                elif flag == "L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    long_link = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                start = at if start is None else start
                continue
            return self._entry(
                hdr, block, pax, long_name, long_link, at if start is None else start
            )

    def _entry(
        self,
        hdr: RawHeader,
        block: bytes,
        pax: list[tuple[str, str]],
        long_name: str,
        long_link: str,
        start: int,
    ) -> TarEntry:
        kind = KINDS.get(hdr.typeflag)
        name = hdr.path
        if kind is None:
            raise TarFormatError(
                f"unsupported tar entry type {hdr.typeflag!r} for {name!r} at offset {start}"
            )
        if hdr.typeflag == "\0" and name.endswith("/"):
            kind = "dir"
        entry = TarEntry(
            name=name,
            kind=kind,
            size=hdr.size,
            mode=hdr.mode,
            uid=hdr.uid,
            gid=hdr.gid,
            mtime_ns=hdr.mtime * 10**9,
            linkname=hdr.linkname,
            devmajor=hdr.devmajor,
            devminor=hdr.devminor,
            offset=start,
        )
        sparse_numbers: list[int] = []
        records: dict[str, str] = {}
        for key, value in pax:
            if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):  # format 0.0, in order
                if (key == "GNU.sparse.offset") != (len(sparse_numbers) % 2 == 0):
                    raise TarFormatError(f"sparse map at offset {start}: records out of order")
                sparse_numbers.append(_int(value, key, start))
                continue
            records[key] = value
        for key, value in records.items():
            if key.startswith(XATTR_PREFIX):
                entry.xattrs[key[len(XATTR_PREFIX) :]] = value.encode("utf-8", "surrogateescape")
            elif not value:
                continue  # an empty PAX value keeps the header's (Go)
            elif key == "path":
                entry.name = value
            elif key == "linkpath":
                entry.linkname = value
            elif key in ("uid", "gid"):
                setattr(entry, key, _int(value, key, start))
            elif key == "size":
                entry.size = _int(value, key, start)
            elif key == "mtime":
                seconds, nanos = parse_pax_time(value, key, start)
                entry.mtime_ns = seconds * 10**9 + nanos
        if long_name:
            entry.name = long_name
        if long_link:
            entry.linkname = long_link
        if entry.size < 0:
            raise TarFormatError(f"tar entry {entry.name!r} at offset {start}: negative size")
        if not (0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32):
            raise TarFormatError(f"tar entry {entry.name!r} at offset {start}: bad uid/gid")
        stored = entry.size if kind == "reg" else 0  # Go: header-only types carry no data
        if hdr.typeflag == "S":
            stored = entry.size
            entry.sparse, entry.size = self._old_gnu_sparse(block, start)
        elif kind == "reg":
            stored = entry.size
            entry.sparse = self._pax_sparse(entry, records, sparse_numbers, start)
            if records.get("GNU.sparse.major") == "1":
                stored -= self.offset - self._map_start
        if entry.sparse is not None:
            _check_sparse(entry.sparse, entry.size, start)
            if entry.data_size != stored:
                raise TarFormatError(
                    f"sparse file {entry.name!r} at offset {start}: its map lists "
                    f"{entry.data_size} bytes of data, the entry holds {stored}"
                )
        self._remaining = stored
        self._padding = padded_size(self.offset + stored) - (self.offset + stored)
        return entry

    def _old_gnu_sparse(self, block: bytes, start: int) -> tuple[list[tuple[int, int]], int]:
        """The map and real size of an old GNU `S` entry (header block, extension blocks)."""
        numbers: list[int] = []

        def take(raw: bytes, entries: int) -> None:
            for i in range(entries):
                chunk = raw[i * 24 : i * 24 + 24]
                if chunk[0] == 0:  # an unused slot ends the list (GNU and BSD tar, Go)
                    return
                numbers.append(_gnu_number(chunk[:12], "sparse offset", start))
                numbers.append(_gnu_number(chunk[12:], "sparse length", start))

        take(block[386:482], 4)
        extended = block[482] != 0
        real_size = _gnu_number(block[483:495], "sparse real size", start)
        blocks = 0
        while extended:
            blocks += 1
            if blocks > _MAX_SPARSE_BLOCKS:
                raise TarFormatError(f"sparse map at offset {start} is longer than {MAX_META_SIZE}")
            ext = self._exact(BLOCK_SIZE, "a sparse map")
            take(ext[:504], 21)
            extended = ext[504] != 0
        return _pairs(numbers, start), real_size

    def _pax_sparse(
        self, entry: TarEntry, records: dict[str, str], numbers: list[int], start: int
    ) -> list[tuple[int, int]] | None:
        """The map of a PAX sparse file (formats 0.0, 0.1, 1.0), or None if it is not one;
        sets its real name and size."""
        major, minor = records.get("GNU.sparse.major", ""), records.get("GNU.sparse.minor", "")
        if (major, minor) == ("1", "0"):
            v1 = True
        elif major == "0" and minor in ("0", "1"):
            v1 = False
        elif major or minor:
            raise TarFormatError(f"unknown GNU sparse format {major}.{minor} at offset {start}")
        elif "GNU.sparse.map" in records or numbers:
            v1 = False
        else:
            return None
        if records.get("GNU.sparse.name"):
            entry.name = records["GNU.sparse.name"]
        real = records.get("GNU.sparse.size") or records.get("GNU.sparse.realsize")
        if real:
            entry.size = _int(real, "GNU.sparse.size", start)
        if v1:
            return self._map_1_0(start)
        if "GNU.sparse.map" in records:
            text = records["GNU.sparse.map"]
            numbers = [_int(v, "GNU.sparse.map", start) for v in text.split(",")] if text else []
        count = records.get("GNU.sparse.numblocks")
        pairs = _pairs(numbers, start)
        if count is not None and _int(count, "GNU.sparse.numblocks", start) != len(pairs):
            raise TarFormatError(f"sparse map at offset {start}: numblocks does not match")
        return pairs

    def _map_1_0(self, start: int) -> list[tuple[int, int]]:
        """Format 1.0: decimal lines at the start of the data (a count, then offset/length
        pairs), padded to a block."""
        self._map_start = self.offset
        buf = b""
        lines: list[bytes] = []
        count: int | None = None
        while count is None or len(lines) < 1 + 2 * count:
            if b"\n" not in buf:
                if self.offset - self._map_start >= MAX_META_SIZE:
                    raise TarFormatError(
                        f"sparse map at offset {start} is longer than {MAX_META_SIZE}"
                    )
                buf += self._exact(BLOCK_SIZE, "a sparse map")
                continue
            line, _, buf = buf.partition(b"\n")
            lines.append(line)
            if count is None:
                count = _int(line.decode("ascii", "replace"), "sparse map size", start)
                if count < 0:
                    raise TarFormatError(f"sparse map at offset {start}: negative size")
        values = [_int(x.decode("ascii", "replace"), "sparse map", start) for x in lines[1:]]
        return _pairs(values, start)
