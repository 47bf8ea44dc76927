"""Tar header parsing with the semantics of Go's archive/tar, as soci builds its TOC with it.

One 512-byte block is parsed by `parse_header_block`; a chain of meta entries (PAX `x`/`g`,
GNU `L`/`K`) followed by the real header is folded into one `FileMetadata` by `EntryChain`.
`TocBuilder` (soci.toc) streams through a whole archive with these; `read_entry` and
`header_matches` re-read one entry from a buffer so the lazy filesystem can check a zTOC
entry against the layer's real header bytes.

Deliberate differences from Go, all stricter: PAX global headers (`g`) are parsed and
validated but neither applied nor listed (soci rejects them; Go returns them as entries);
meta headers that are not followed by a real entry are an error; sparse files (`S`, PAX
`GNU.sparse.*`) are rejected because their tar data is not the file's content.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from snapshotter.errors import TarFormatError, TimestampError
from snapshotter.soci.rfc3339 import format_rfc3339_nano, parse_rfc3339_nano
from snapshotter.soci.ztoc import FileMetadata

BLOCK_SIZE = 512
MAX_META_SIZE = 1 << 20
"""Largest PAX header or GNU long name/link payload accepted (Go's maxSpecialFileSize)."""

ZERO_BLOCK = bytes(BLOCK_SIZE)

ENTRY_TYPES: dict[str, str] = {
    "0": "reg",
    "\0": "reg",
    "1": "hardlink",
    "2": "symlink",
    "3": "char",
    "4": "block",
    "5": "dir",
    "6": "fifo",
}
META_TYPES = frozenset("xgLK")

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_GO_INT = re.compile(rb"[+-]?[0-9]+", re.ASCII)
_PAX_LENGTH = re.compile(rb"[0-9]{1,19}", re.ASCII)
_PAX_NUL_VALUE_KEYS = frozenset({b"path", b"linkpath", b"uname", b"gname"})
_SPARSE_PREFIX = "GNU.sparse."


@dataclass(slots=True, frozen=True)
class RawHeader:
    """The fields of one tar header block, before PAX/GNU overrides are applied.

    `format` is "v7", "ustar" (magic `ustar\\0`, also PAX), "star" or "gnu". Strings are
    cut at the first NUL and decoded as UTF-8 with surrogateescape.
    """

    name: str
    prefix: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: str
    linkname: str
    uname: str
    gname: str
    devmajor: int
    devminor: int
    format: str

    @property
    def path(self) -> str:
        """The name with the ustar/star prefix joined in, as Go reports it."""
        return f"{self.prefix}/{self.name}" if self.prefix else self.name


def padded_size(size: int) -> int:
    """`size` rounded up to a whole number of tar blocks."""
    return (size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)


def _cut(field: bytes) -> bytes:
    nul = field.find(0)
    return field if nul < 0 else field[:nul]


def _text(field: bytes) -> str:
    if not field[0]:
        return ""
    return _cut(field).decode("utf-8", "surrogateescape")


# Numeric fields and user/group names repeat across the entries of a layer; memoising their
# parse keeps the per-header cost low on layers with many small files.
_NUMERIC_CACHE: dict[bytes, int] = {}
_NAME_CACHE: dict[bytes, str] = {}
_CACHE_LIMIT = 4096


def _cached_text(field: bytes) -> str:
    text = _NAME_CACHE.get(field)
    if text is None:
        text = _text(field)
        if len(_NAME_CACHE) >= _CACHE_LIMIT:
            _NAME_CACHE.clear()
        _NAME_CACHE[field] = text
    return text


def _octal(field: bytes, what: str, offset: int) -> int:
    # Go trims NULs and spaces on both sides, then cuts at the first NUL.
    digits = _cut(field.strip(b" \0"))
    if not digits:
        return 0
    if not digits.isdigit():
        raise TarFormatError(f"tar header at offset {offset}: malformed octal {what} {field!r}")
    try:
        return int(digits, 8)
    except ValueError:
        raise TarFormatError(
            f"tar header at offset {offset}: malformed octal {what} {field!r}"
        ) from None


def _numeric(field: bytes, what: str, offset: int) -> int:
    value = _NUMERIC_CACHE.get(field)
    if value is not None:
        return value
    first = field[0]
    if first & 0x80:
        # GNU base-256: the remaining bits are a big-endian two's complement number.
        value = int.from_bytes(bytes((first & 0x7F,)) + field[1:], "big")
        if first & 0x40:
            value -= 1 << (8 * len(field) - 1)
    else:
        value = _octal(field, what, offset)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise TarFormatError(f"tar header at offset {offset}: {what} overflows int64")
    if len(_NUMERIC_CACHE) >= _CACHE_LIMIT:
        _NUMERIC_CACHE.clear()
    _NUMERIC_CACHE[field] = value
    return value


# name mode uid gid size mtime chksum typeflag linkname magic version uname gname
# devmajor devminor prefix(155) pad(12); star splits prefix(131) atime ctime and ends "tar\0".
_LAYOUT = struct.Struct("100s8s8s8s12s12s8sB100s6s2s32s32s8s8s155s12s")


def parse_header_block(block: bytes, offset: int) -> RawHeader:
    """Parse and checksum one non-zero 512-byte header block found at stream `offset`."""
    if len(block) != BLOCK_SIZE:
        raise TarFormatError(f"truncated tar header at offset {offset}")
    (
        name,
        mode,
        uid,
        gid,
        size,
        mtime,
        chksum,
        typeflag,
        linkname,
        magic,
        version,
        uname,
        gname,
        devmajor,
        devminor,
        prefix,
        _,
    ) = _LAYOUT.unpack(block)
    stored = _octal(chksum, "checksum", offset)
    unsigned = sum(block) - sum(chksum) + 8 * 0x20
    if stored != unsigned:
        # Some old tars summed signed chars; Go accepts either.
        high = sum(1 for c in block if c >= 0x80) - sum(1 for c in chksum if c >= 0x80)
        if stored != unsigned - 256 * high:
            raise TarFormatError(f"bad tar header checksum at offset {offset} (not a tar stream?)")
    if magic == b"ustar\0":
        fmt = "star" if block[508:512] == b"tar\0" else "ustar"
    elif magic == b"ustar " and version == b" \0":
        fmt = "gnu"
    else:
        fmt = "v7"
    if fmt == "v7":
        uname_text = gname_text = prefix_text = ""
        devmajor_value = devminor_value = 0
    else:
        uname_text = _cached_text(uname)
        gname_text = _cached_text(gname)
        devmajor_value = _numeric(devmajor, "devmajor", offset)
        devminor_value = _numeric(devminor, "devminor", offset)
        if fmt == "ustar":
            prefix_text = _text(prefix)
        elif fmt == "star":
            prefix_text = _text(prefix[:131])
        else:
            prefix_text = ""
    return RawHeader(
        name=_text(name),
        prefix=prefix_text,
        mode=_numeric(mode, "mode", offset),
        uid=_numeric(uid, "uid", offset),
        gid=_numeric(gid, "gid", offset),
        size=_numeric(size, "size", offset),
        mtime=_numeric(mtime, "mtime", offset),
        typeflag=chr(typeflag),
        linkname=_text(linkname),
        uname=uname_text,
        gname=gname_text,
        devmajor=devmajor_value,
        devminor=devminor_value,
        format=fmt,
    )


def meta_payload_size(hdr: RawHeader, offset: int) -> int:
    """Validated payload size of a PAX/GNU meta header (bounded by MAX_META_SIZE)."""
    if hdr.size < 0:
        raise TarFormatError(f"tar header at offset {offset}: negative size {hdr.size}")
    if hdr.size > MAX_META_SIZE:
        kind = "PAX header" if hdr.typeflag in "xg" else "GNU long name"
        raise TarFormatError(
            f"{kind} at offset {offset} is {hdr.size} bytes, more than {MAX_META_SIZE}"
        )
    return hdr.size


def parse_pax_records(data: bytes, offset: int) -> dict[str, str]:
    """Parse PAX extended header records ("%d %s=%s\\n", lengths checked exactly).

    Later records override earlier ones with the same key. Keys and values are decoded as
    UTF-8 with surrogateescape.
    """
    records: dict[str, str] = {}
    pos = 0
    end = len(data)
    while pos < end:
        space = data.find(b" ", pos, min(end, pos + 20))
        length_text = data[pos:space] if space > pos else b""
        if not _PAX_LENGTH.fullmatch(length_text):
            raise TarFormatError(f"PAX header at offset {offset}: malformed record length")
        length = int(length_text)
        record_end = pos + length
        if length < 5 or record_end > end or record_end <= space + 1:
            raise TarFormatError(
                f"PAX header at offset {offset}: record length {length} out of bounds"
            )
        if data[record_end - 1] != 0x0A:
            raise TarFormatError(f"PAX header at offset {offset}: record not ended by newline")
        record = data[space + 1 : record_end - 1]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise TarFormatError(f"PAX header at offset {offset}: record without key=value")
        if b"\0" in (value if key in _PAX_NUL_VALUE_KEYS else key):
            raise TarFormatError(f"PAX header at offset {offset}: NUL in record {key!r}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = record_end
    return records


def _pax_int(value: str, key: str, offset: int) -> int:
    raw = value.encode("utf-8", "surrogateescape")
    if not _GO_INT.fullmatch(raw) or len(raw) > 24:
        raise TarFormatError(f"PAX header at offset {offset}: malformed {key} {value[:40]!r}")
    number = int(raw)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise TarFormatError(f"PAX header at offset {offset}: {key} overflows int64")
    return number


def parse_pax_time(value: str, key: str = "mtime", offset: int = 0) -> tuple[int, int]:
    """Parse a PAX time ("-?seconds[.fraction]") into (seconds, nanoseconds) like Go."""
    whole, dot, fraction = value.partition(".")
    seconds = _pax_int(whole, key, offset)
    if not dot or not fraction:
        return seconds, 0
    raw = fraction.encode("utf-8", "surrogateescape")
    if not raw.isdigit():
        raise TarFormatError(f"PAX header at offset {offset}: malformed {key} {value[:40]!r}")
    nanos = int(raw[:9].ljust(9, b"0"))
    if whole.startswith("-"):
        nanos = -nanos
    extra, nanos = divmod(nanos, 1_000_000_000)
    return seconds + extra, nanos


class EntryChain:
    """Collects the meta entries in front of one real tar entry and builds its metadata.

    Feed meta headers with `add_meta` (payload = the meta entry's data), then the real
    header with `finish`. Go's rules: a later `x` replaces an earlier one, the last `L`/`K`
    wins, a GNU long name beats PAX `path`, and empty PAX values keep the header's value.
    """

    __slots__ = ("_long_link", "_long_name", "_pax", "start")

    def __init__(self) -> None:
        self._pax: dict[str, str] | None = None
        self._long_name = ""
        self._long_link = ""
        self.start: int | None = None
        """Offset of the first header of the pending chain, None when nothing is pending."""

    @property
    def pending(self) -> bool:
        """True when meta entries were seen that still await their real entry."""
        return self.start is not None

    def reset(self) -> None:
        """Forget pending meta entries."""
        self._pax = None
        self._long_name = ""
        self._long_link = ""
        self.start = None

    def add_meta(self, hdr: RawHeader, payload: bytes, offset: int) -> None:
        """Apply one meta entry (`x`, `g`, `L`, `K`) whose header was at `offset`."""
        flag = hdr.typeflag
        if flag == "x":
            self._pax = parse_pax_records(payload, offset)
        elif flag == "g":
            # Validated, then dropped with anything pending (Go ends its Next() here).
            parse_pax_records(payload, offset)
            self.reset()
            return
        elif flag == "L":
            self._long_name = _text(payload)
        elif flag == "K":
            self._long_link = _text(payload)
        else:
            raise TarFormatError(f"tar header at offset {offset}: {flag!r} is not a meta entry")
        if self.start is None:
            self.start = offset

    def finish(self, hdr: RawHeader, data_offset: int) -> FileMetadata:
        """Build the metadata of the real entry `hdr` whose data starts at `data_offset`."""
        offset = data_offset - BLOCK_SIZE
        name = hdr.path
        linkname = hdr.linkname
        uname = hdr.uname
        gname = hdr.gname
        uid = hdr.uid
        gid = hdr.gid
        size = hdr.size
        mtime = hdr.mtime
        nanos = 0
        pax = self._pax
        records: dict[str, str] = {}
        if pax:
            for key, value in pax.items():
                if key.startswith(_SPARSE_PREFIX):
                    raise TarFormatError(
                        f"unsupported tar entry: GNU sparse file (PAX {key}) for {name!r}"
                    )
                if not value:
                    continue
                if key == "path":
                    name = value
                elif key == "linkpath":
                    linkname = value
                elif key == "uname":
                    uname = value
                elif key == "gname":
                    gname = value
                elif key == "uid":
                    uid = _pax_int(value, key, offset)
                elif key == "gid":
                    gid = _pax_int(value, key, offset)
                elif key == "size":
                    size = _pax_int(value, key, offset)
                elif key == "mtime":
                    mtime, nanos = parse_pax_time(value, key, offset)
                elif key in ("atime", "ctime"):
                    parse_pax_time(value, key, offset)
            records = dict(
                sorted(pax.items(), key=lambda kv: kv[0].encode("utf-8", "surrogateescape"))
            )
        if self._long_name:
            name = self._long_name
        if self._long_link:
            linkname = self._long_link
        self.reset()
        flag = hdr.typeflag
        kind = ENTRY_TYPES.get(flag)
        if kind is None:
            raise TarFormatError(
                f"unsupported tar entry type {flag!r} for {name!r} at offset {offset}"
            )
        if flag == "\0" and name.endswith("/"):
            kind = "dir"
        if size < 0:
            raise TarFormatError(f"tar entry {name!r} at offset {offset}: negative size {size}")
        if not 0 <= uid <= _UINT32_MAX:
            raise TarFormatError(f"tar entry {name!r} at offset {offset}: uid {uid} not uint32")
        if not 0 <= gid <= _UINT32_MAX:
            raise TarFormatError(f"tar entry {name!r} at offset {offset}: gid {gid} not uint32")
        return FileMetadata(
            name=name,
            type=kind,
            uncompressed_offset=data_offset,
            uncompressed_size=size,
            linkname=linkname,
            mode=hdr.mode,
            uid=uid,
            gid=gid,
            uname=uname,
            gname=gname,
            mod_time=format_rfc3339_nano(mtime, nanos),
            devmajor=hdr.devmajor,
            devminor=hdr.devminor,
            pax_records=records,
        )


def data_length(meta: FileMetadata) -> int:
    """Bytes of data that follow the entry's header in the stream (Go: header-only types 0)."""
    return meta.uncompressed_size if meta.type == "reg" else 0


def read_entry(buf: bytes, start: int) -> tuple[FileMetadata, int]:
    """Parse the header chain beginning at `buf[start]`: (metadata, offset of its data).

    Offsets are positions in `buf`; `buf` need only hold the headers and meta payloads, not
    the entry's data. Raises TarFormatError on malformed or truncated headers, and on an
    end-of-archive block where an entry was expected.
    """
    if start < 0:
        raise TarFormatError(f"tar header offset {start} is negative")
    chain = EntryChain()
    offset = start
    while True:
        block = buf[offset : offset + BLOCK_SIZE]
        if len(block) < BLOCK_SIZE:
            raise TarFormatError(f"truncated tar header at offset {offset}")
        if block == ZERO_BLOCK:
            raise TarFormatError(f"end-of-archive block at offset {offset}, expected an entry")
        hdr = parse_header_block(block, offset)
        if hdr.typeflag not in META_TYPES:
            return chain.finish(hdr, offset + BLOCK_SIZE), offset + BLOCK_SIZE
        size = meta_payload_size(hdr, offset)
        payload = buf[offset + BLOCK_SIZE : offset + BLOCK_SIZE + size]
        if len(payload) < size:
            raise TarFormatError(f"truncated tar meta entry at offset {offset}")
        chain.add_meta(hdr, payload, offset)
        offset += BLOCK_SIZE + padded_size(size)


def header_matches(meta: FileMetadata, buf: bytes, start: int, base: int = 0) -> bool:
    """Whether the header chain at `buf[start]` describes `meta` (see `header_mismatch`)."""
    return header_mismatch(meta, buf, start, base) is None


_COMPARED = ("name", "type", "uncompressed_size", "mode", "uid", "gid", "linkname")


def header_mismatch(meta: FileMetadata, buf: bytes, start: int, base: int = 0) -> str | None:
    """None if the header chain at `buf[start]` describes `meta`, else what differs.

    `base` is the tar stream offset of `buf[0]` (0 when `buf` is the stream from its
    start). Compared: everything a filesystem shows of the entry — name, type, size, mode,
    uid, gid, linkname, the data offset, the device numbers of devices, the mtime (as an
    instant: builders may write other time zones) and the file xattrs (`SCHILY.xattr.*`).
    Malformed or truncated headers do not match.
    """
    try:
        actual, data_offset = read_entry(buf, start)
    except TarFormatError as e:
        return f"no valid header there ({e})"
    if base + data_offset != meta.uncompressed_offset:
        return f"the entry's data starts at {base + data_offset}"
    for name in _COMPARED:
        got, want = getattr(actual, name), getattr(meta, name)
        if got != want:
            return f"{name} {got!r} in the tar, {want!r} in the zTOC"
    if meta.type in ("char", "block") and (actual.devmajor, actual.devminor) != (
        meta.devmajor,
        meta.devminor,
    ):
        return (
            f"device {actual.devmajor}:{actual.devminor} in the tar, "
            f"{meta.devmajor}:{meta.devminor} in the zTOC"
        )
    if _instant(actual.mod_time) != _instant(meta.mod_time):
        return f"mtime {actual.mod_time} in the tar, {meta.mod_time!r} in the zTOC"
    if actual.xattrs != meta.xattrs:
        return f"xattrs {sorted(actual.xattrs)} in the tar, {sorted(meta.xattrs)} in the zTOC"
    return None


def _instant(text: str) -> tuple[int, int] | None:
    try:
        return parse_rfc3339_nano(text)
    except TimestampError:
        return None


def header_starts(files: list[FileMetadata]) -> list[int]:
    """Where each entry's tar header chain starts: the previous entry's end, block-aligned."""
    order = sorted(range(len(files)), key=lambda i: files[i].uncompressed_offset)
    starts = [0] * len(files)
    end = 0
    for i in order:
        f = files[i]
        starts[i] = -(-end // BLOCK_SIZE) * BLOCK_SIZE
        data_size = f.uncompressed_size if f.type == "reg" else 0
        end = max(end, f.uncompressed_offset + data_size)
    return starts
