"""zTOC: the table of contents plus decompression info of one layer (soci's flatbuffer format).

Wire format: flatbuffers, namespace `ztoc`, root table `Ztoc`, no file identifier; the field
order below is the vtable slot order of soci's schema.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import flatbuffers
import numpy as np
import numpy.typing as npt

from snapshotter.errors import TimestampError, ZtocError
from snapshotter.soci import flatbuf
from snapshotter.soci.rfc3339 import parse_rfc3339_nano

log = logging.getLogger(__name__)

ZTOC_VERSION = "0.9"
ZERO_MOD_TIME = "0001-01-01T00:00:00Z"
XATTR_PAX_PREFIX = "SCHILY.xattr."
ENTRY_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"})
TYPE_CODES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")
"""The entry types in the order of `EntryColumns.kind` codes."""
DEFAULT_MAX_ENTRIES = 2_000_000
"""Entries a zTOC may list (`[fuse] max_ztoc_entries`): real layers have 10^4-10^5."""


class ZtocTooLargeError(ZtocError):
    """A zTOC lists more entries than the configured bound."""


class CompressionAlgorithm(enum.IntEnum):
    """`ztoc.CompressionAlgorithm` (a byte enum; the schema's default is GZIP)."""

    GZIP = 1
    UNCOMPRESSED = 2


@dataclass(slots=True)
class FileMetadata:
    """One tar entry as the zTOC records it.

    Strings that came from the tar stream are decoded with `surrogateescape`, so names and
    xattr values that are not UTF-8 round-trip byte for byte.
    """

    name: str
    type: str
    uncompressed_offset: int
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ZERO_MOD_TIME
    devmajor: int = 0
    devminor: int = 0
    pax_records: dict[str, str] = field(default_factory=dict)
    """ALL PAX records of the entry (the zTOC's `xattrs` vector), sorted by key."""

    @property
    def xattrs(self) -> dict[str, str]:
        """The file's extended attributes: the `SCHILY.xattr.<name>` PAX records."""
        n = len(XATTR_PAX_PREFIX)
        return {k[n:]: v for k, v in self.pax_records.items() if k.startswith(XATTR_PAX_PREFIX)}


@dataclass(slots=True)
class Ztoc:
    """A decoded zTOC. `checkpoints` is the raw checkpoint blob (see soci.zinfo).

    `files` is a list when built in memory; `decode_ztoc` gives a `TocEntries`, which reads
    entries from the blob only when asked (see `entry_columns` for all of them at once).
    """

    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    files: Sequence[FileMetadata]
    compression_algorithm: CompressionAlgorithm
    max_span_id: int
    span_digests: list[str]
    checkpoints: bytes


# Vtable slots of soci's schema (field order).
_ZTOC_VERSION, _ZTOC_BUILD_TOOL, _ZTOC_COMPRESSED, _ZTOC_UNCOMPRESSED, _ZTOC_TOC, _ZTOC_CINFO = (
    range(6)
)
_TOC_METADATA = 0
(
    _FM_NAME,
    _FM_TYPE,
    _FM_OFFSET,
    _FM_SIZE,
    _FM_LINKNAME,
    _FM_MODE,
    _FM_UID,
    _FM_GID,
    _FM_UNAME,
    _FM_GNAME,
    _FM_MOD_TIME,
    _FM_DEVMAJOR,
    _FM_DEVMINOR,
    _FM_XATTRS,
) = range(14)
_XATTR_KEY, _XATTR_VALUE = range(2)
_CI_ALGORITHM, _CI_MAX_SPAN_ID, _CI_SPAN_DIGESTS, _CI_CHECKPOINTS = range(4)

_GZIP = CompressionAlgorithm.GZIP.value
_SPAN_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# What the flatbuffers builder raises for a value that does not fit its field.
_ENCODE_ERRORS = (
    struct.error,
    UnicodeEncodeError,
    OverflowError,
    TypeError,
    flatbuffers.builder.BuilderSizeError,
)


def encode_ztoc(z: Ztoc, *, validate: bool = True) -> bytes:
    """Serialize a zTOC to soci's flatbuffer wire format (deterministic for equal input).

    The zTOC is validated first (`validate_ztoc`); `validate=False` exists only so tests can
    produce semantically invalid zTOCs. A value that does not fit its field raises ZtocError.
    """
    if validate:
        validate_ztoc(z)
    initial_size = 1024 + 160 * len(z.files) + len(z.checkpoints)
    b = flatbuffers.Builder(min(initial_size, flatbuffers.Builder.MAX_BUFFER_SIZE))
    file_offsets = []
    for i, f in enumerate(z.files):
        try:
            file_offsets.append(_build_file(b, f))
        except _ENCODE_ERRORS as e:
            raise ZtocError(f"cannot encode file entry {i} ({f.name!r}): {e}") from e
    try:
        files_vector = _build_offset_vector(b, file_offsets)
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(_TOC_METADATA, files_vector, 0)
        toc = b.EndObject()

        digests = [b.CreateString(d, "utf-8", "surrogateescape") for d in z.span_digests]
        digests_vector = _build_offset_vector(b, digests)
        checkpoints = b.CreateByteVector(bytes(z.checkpoints))
        b.StartObject(4)
        b.PrependUOffsetTRelativeSlot(_CI_CHECKPOINTS, checkpoints, 0)
        b.PrependUOffsetTRelativeSlot(_CI_SPAN_DIGESTS, digests_vector, 0)
        b.PrependInt32Slot(_CI_MAX_SPAN_ID, z.max_span_id, 0)
        b.PrependInt8Slot(_CI_ALGORITHM, int(z.compression_algorithm), _GZIP)
        cinfo = b.EndObject()

        version = b.CreateString(z.version, "utf-8", "surrogateescape")
        build_tool = b.CreateString(z.build_tool_identifier, "utf-8", "surrogateescape")
        b.StartObject(6)
        b.PrependInt64Slot(_ZTOC_COMPRESSED, z.compressed_archive_size, 0)
        b.PrependInt64Slot(_ZTOC_UNCOMPRESSED, z.uncompressed_archive_size, 0)
        b.PrependUOffsetTRelativeSlot(_ZTOC_VERSION, version, 0)
        b.PrependUOffsetTRelativeSlot(_ZTOC_BUILD_TOOL, build_tool, 0)
        b.PrependUOffsetTRelativeSlot(_ZTOC_TOC, toc, 0)
        b.PrependUOffsetTRelativeSlot(_ZTOC_CINFO, cinfo, 0)
        b.Finish(b.EndObject())
    except _ENCODE_ERRORS as e:
        raise ZtocError(f"cannot encode zTOC: {e}") from e
    return bytes(b.Output())


def _build_offset_vector(b: Any, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _build_file(b: Any, f: FileMetadata) -> int:
    # Names are unique; the other strings repeat across entries, so they are written once
    # and shared, which speeds up encoding and shrinks the blob (flatbuf caches them too).
    shared = b.CreateSharedString
    xattrs = 0
    if f.pax_records:
        entries = []
        for key, value in sorted(f.pax_records.items()):
            k = shared(key, "utf-8", "surrogateescape")
            v = shared(value, "utf-8", "surrogateescape")
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(_XATTR_VALUE, v, 0)
            b.PrependUOffsetTRelativeSlot(_XATTR_KEY, k, 0)
            entries.append(b.EndObject())
        xattrs = _build_offset_vector(b, entries)
    name = b.CreateString(f.name, "utf-8", "surrogateescape")
    type_ = shared(f.type, "utf-8", "surrogateescape")
    linkname = shared(f.linkname, "utf-8", "surrogateescape")
    uname = shared(f.uname, "utf-8", "surrogateescape")
    gname = shared(f.gname, "utf-8", "surrogateescape")
    mod_time = shared(f.mod_time, "utf-8", "surrogateescape")
    b.StartObject(14)
    # 8-byte fields first, so the builder needs no padding between them.
    b.PrependInt64Slot(_FM_OFFSET, f.uncompressed_offset, 0)
    b.PrependInt64Slot(_FM_SIZE, f.uncompressed_size, 0)
    b.PrependInt64Slot(_FM_MODE, f.mode, 0)
    b.PrependInt64Slot(_FM_DEVMAJOR, f.devmajor, 0)
    b.PrependInt64Slot(_FM_DEVMINOR, f.devminor, 0)
    b.PrependUOffsetTRelativeSlot(_FM_NAME, name, 0)
    b.PrependUOffsetTRelativeSlot(_FM_TYPE, type_, 0)
    b.PrependUOffsetTRelativeSlot(_FM_LINKNAME, linkname, 0)
    b.PrependUint32Slot(_FM_UID, f.uid, 0)
    b.PrependUint32Slot(_FM_GID, f.gid, 0)
    b.PrependUOffsetTRelativeSlot(_FM_UNAME, uname, 0)
    b.PrependUOffsetTRelativeSlot(_FM_GNAME, gname, 0)
    b.PrependUOffsetTRelativeSlot(_FM_MOD_TIME, mod_time, 0)
    if xattrs:
        b.PrependUOffsetTRelativeSlot(_FM_XATTRS, xattrs, 0)
    return int(b.EndObject())


def decode_ztoc(
    data: bytes | bytearray | memoryview, *, max_entries: int = DEFAULT_MAX_ENTRIES
) -> Ztoc:
    """Parse and validate a zTOC blob; any malformation raises ZtocError, more than
    `max_entries` entries ZtocTooLargeError (before anything is allocated for them).

    The entries are read column-wise (numpy), so a zTOC of a million entries decodes in a
    fraction of a second; `files` materializes a `FileMetadata` only when one is asked for.
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)  # entries keep the blob: it must not change under them
    t = flatbuf.root(data, ZtocError)
    version = t.string(_ZTOC_VERSION) or ""
    build_tool = t.string(_ZTOC_BUILD_TOOL) or ""
    compressed_size = t.scalar(_ZTOC_COMPRESSED, "q", 0)
    uncompressed_size = t.scalar(_ZTOC_UNCOMPRESSED, "q", 0)

    files: Sequence[FileMetadata] = []
    toc = t.table(_ZTOC_TOC)
    if toc is not None:
        files = TocEntries._decode(toc, max_entries)

    algorithm_value = _GZIP
    max_span_id = 0
    span_digests: list[str] = []
    checkpoints = b""
    ci = t.table(_ZTOC_CINFO)
    if ci is not None:
        algorithm_value = ci.scalar(_CI_ALGORITHM, "b", algorithm_value)
        max_span_id = ci.scalar(_CI_MAX_SPAN_ID, "i", 0)
        span_digests = list(ci.vector_of_strings(_CI_SPAN_DIGESTS))
        blob = ci.bytes_vector(_CI_CHECKPOINTS)
        if blob is not None:
            checkpoints = bytes(blob)
    try:
        algorithm = CompressionAlgorithm(algorithm_value)
    except ValueError:
        raise ZtocError(f"unknown compression algorithm {algorithm_value}") from None

    z = Ztoc(
        version=version,
        build_tool_identifier=build_tool,
        compressed_archive_size=compressed_size,
        uncompressed_archive_size=uncompressed_size,
        files=files,
        compression_algorithm=algorithm,
        max_span_id=max_span_id,
        span_digests=span_digests,
        checkpoints=checkpoints,
    )
    if isinstance(files, TocEntries):
        _validate_header(z)
        files._validate(uncompressed_size)
        _validate_spans(z)
    else:
        validate_ztoc(z)
    return z


@dataclass(eq=False)
class EntryColumns:
    """Every entry of a zTOC as arrays (what the lazy filesystem keeps, per entry).

    Names and link names are byte strings in `blob` (each followed by a NUL), addressed by
    start and length; `kind` indexes TYPE_CODES; mtimes are nanoseconds (0 where the zTOC's
    text is malformed: `bad_mtimes` lists those entries). Sparse fields are dicts by entry.
    """

    blob: bytes
    name_start: npt.NDArray[Any]
    name_len: npt.NDArray[Any]
    link_start: npt.NDArray[Any]
    link_len: npt.NDArray[Any]
    kind: npt.NDArray[Any]
    offset: npt.NDArray[Any]
    size: npt.NDArray[Any]
    mode: npt.NDArray[Any]
    uid: npt.NDArray[Any]
    gid: npt.NDArray[Any]
    mtime_ns: npt.NDArray[Any]
    devices: dict[int, tuple[int, int]]
    """Entries with device numbers other than 0:0."""
    xattrs: dict[int, dict[str, str]]
    """Entries with file xattrs (`SCHILY.xattr.<name>` PAX records), by name."""
    bad_mtimes: list[int]

    def __len__(self) -> int:
        return len(self.kind)

    def compact(self) -> EntryColumns:
        """The same columns in the smallest integer types that hold their values."""
        out = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and value.dtype == np.int64 and len(value):
                lo, hi = int(value.min()), int(value.max())
                for dt in (np.uint8, np.uint16, np.uint32, np.int32):
                    info = np.iinfo(dt)
                    if info.min <= lo and hi <= info.max:
                        setattr(out, f.name, value.astype(dt))
                        break
        return out

    def name(self, entry: int) -> bytes:
        """The raw tar name of an entry."""
        s = int(self.name_start[entry])
        return self.blob[s : s + int(self.name_len[entry])]

    def linkname(self, entry: int) -> bytes:
        s = int(self.link_start[entry])
        return self.blob[s : s + int(self.link_len[entry])]


_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1


def _mtime_ns(text: str) -> int | None:
    """Nanoseconds since the epoch (clamped to int64, past year 2262), None if malformed."""
    try:
        seconds, nanos = parse_rfc3339_nano(text)
    except TimestampError:
        return None
    return min(max(seconds * 1_000_000_000 + nanos, _NS_MIN), _NS_MAX)


def _gather_strings(
    u8: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], lens: npt.NDArray[np.int64]
) -> tuple[bytes, npt.NDArray[np.int64]]:
    """Copy the strings (each with its NUL) into one blob; where each entry's now is.
    Absent strings (start -1) become empty ones. Strings shared by several entries are
    copied once when copying each would take more than the buffer's size."""
    present = starts >= 0
    sizes = np.where(present, lens + 1, 0)
    if int(sizes.sum()) > len(u8):
        uniq, first, inverse = np.unique(
            np.where(present, starts, -1), return_index=True, return_inverse=True
        )
        blob, where = _copy_strings(u8, uniq, np.where(uniq >= 0, lens[first] + 1, 0))
        return blob, where[inverse.reshape(-1)]
    return _copy_strings(u8, starts, sizes)


def _copy_strings(
    u8: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]
) -> tuple[bytes, npt.NDArray[np.int64]]:
    out_pos = np.zeros(len(starts), np.int64)
    if len(starts) > 1:
        np.cumsum(sizes[:-1], out=out_pos[1:])
    total = int(sizes.sum())
    out = np.zeros(total + 1, np.uint8)  # a final NUL: where empty strings point
    chunk = 1 << 16
    for a in range(0, len(starts), chunk):
        b = min(a + chunk, len(starts))
        seg = sizes[a:b]
        lo = int(out_pos[a])
        hi = lo + int(seg.sum())
        if hi > lo:
            idx = np.repeat(starts[a:b] - out_pos[a:b], seg) + np.arange(lo, hi, dtype=np.int64)
            out[lo:hi] = u8[idx]
    return out.tobytes(), np.where(sizes > 0, out_pos, total)


class TocEntries(Sequence[FileMetadata]):
    """The entries of a decoded zTOC: validated columns over the blob, FileMetadata on demand."""

    def __init__(self, table: flatbuf.Table, positions: npt.NDArray[np.int64]) -> None:
        self._buffer = flatbuf.buffer_of(table)
        self._positions = positions
        self._columns: EntryColumns | None = None
        self._pax: dict[int, dict[str, str]] = {}
        self._uname_gname: tuple[Any, ...] = ()
        self._type_ok: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)

    @classmethod
    def _decode(cls, toc: flatbuf.Table, max_entries: int) -> TocEntries:
        positions = flatbuf.vector_of_table_positions(toc, _TOC_METADATA)
        if len(positions) > max_entries:
            raise ZtocTooLargeError(
                f"zTOC lists {len(positions)} entries, more than the bound of {max_entries}"
            )
        entries = cls(toc, positions)
        try:
            entries._read_columns(flatbuf.TableColumns(entries._buffer, positions))
        except flatbuf.ColumnError as e:
            entries._explain(e.index)
        flatbuf.unlimited(toc)
        return entries

    def _explain(self, i: int) -> None:
        try:
            _decode_file(flatbuf.table_at(self._buffer, int(self._positions[i])))
        except ZtocError as e:
            raise ZtocError(f"file entry {i}: {e}") from e
        raise ZtocError(f"file entry {i} is malformed")

    def _read_columns(self, c: flatbuf.TableColumns) -> None:
        n = c.count
        u8: npt.NDArray[np.uint8] = np.frombuffer(self._buffer.view, np.uint8)
        name_s, name_l = c.strings(_FM_NAME)
        type_s, type_l = c.strings(_FM_TYPE)
        link_s, link_l = c.strings(_FM_LINKNAME)
        self._uname_gname = (c.strings(_FM_UNAME), c.strings(_FM_GNAME))
        mtime_s, mtime_l = c.strings(_FM_MOD_TIME)
        offset = c.scalar(_FM_OFFSET, "q", 0).astype(np.int64)
        size = c.scalar(_FM_SIZE, "q", 0).astype(np.int64)
        mode = c.scalar(_FM_MODE, "q", 0).astype(np.int64)
        uid = c.scalar(_FM_UID, "I", 0).astype(np.int64)
        gid = c.scalar(_FM_GID, "I", 0).astype(np.int64)
        devmajor = c.scalar(_FM_DEVMAJOR, "q", 0).astype(np.int64)
        devminor = c.scalar(_FM_DEVMINOR, "q", 0).astype(np.int64)
        _, xcount = c.vectors(_FM_XATTRS, 4)
        # The PAX records of the few entries that have them, with the scalar reader.
        pax: dict[int, dict[str, str]] = {}
        for i in np.flatnonzero(xcount).tolist():
            try:
                pax[i] = _decode_pax(flatbuf.table_at(self._buffer, int(self._positions[i])))
            except ZtocError as e:
                raise ZtocError(f"file entry {i}: {e}") from e
        self._pax = pax
        # Types: at most 8 bytes, packed into one integer each.
        code = np.zeros(n, np.uint64)
        short = (type_l > 0) & (type_l <= 8)
        for k in range(8):
            m = np.flatnonzero(short & (type_l > k))
            code[m] |= u8[type_s[m] + k].astype(np.uint64) << np.uint64(8 * k)
        kind = np.full(n, 255, np.uint8)
        for value, name in enumerate(TYPE_CODES):
            packed = int.from_bytes(name.encode(), "little")
            kind[short & (code == np.uint64(packed))] = value
        self._type_ok = kind != 255
        # Modification times: parsed once per distinct text.
        mtime_ns = np.zeros(n, np.int64)
        bad: list[int] = []
        texts: dict[bytes, int | None] = {}
        view = self._buffer.view
        uniq, first, inverse = np.unique(mtime_s, return_index=True, return_inverse=True)
        values = np.zeros(len(uniq), np.int64)
        ok = np.ones(len(uniq), np.bool_)
        for j, (st, ln) in enumerate(zip(uniq.tolist(), mtime_l[first].tolist(), strict=True)):
            raw = bytes(view[st : st + ln]) if st >= 0 else b""
            if raw in texts:
                ns = texts[raw]
            else:
                ns = texts[raw] = _mtime_ns(raw.decode("utf-8", "surrogateescape"))
            if ns is None:
                ok[j] = False
            else:
                values[j] = ns
        inverse = inverse.reshape(-1)
        mtime_ns = values[inverse]
        bad = np.flatnonzero(~ok[inverse]).tolist()
        blob, where = _gather_strings(
            u8, np.concatenate([name_s, link_s]), np.concatenate([name_l, link_l])
        )
        devices = {
            i: (int(devmajor[i]), int(devminor[i]))
            for i in np.flatnonzero((devmajor != 0) | (devminor != 0)).tolist()
        }
        n_xattr = len(XATTR_PAX_PREFIX)
        xattrs: dict[int, dict[str, str]] = {}
        for i, records in pax.items():
            found = {k[n_xattr:]: v for k, v in records.items() if k.startswith(XATTR_PAX_PREFIX)}
            if found:
                xattrs[i] = found
        self._columns = EntryColumns(
            blob=blob,
            name_start=where[:n],
            name_len=name_l,
            link_start=where[n:],
            link_len=link_l,
            kind=kind,
            offset=offset,
            size=size,
            mode=mode,
            uid=uid,
            gid=gid,
            mtime_ns=mtime_ns,
            devices=devices,
            xattrs=xattrs,
            bad_mtimes=bad,
        )

    def _validate(self, limit: int) -> None:
        """What `validate_ztoc` checks of the entries, vectorized; the scalar check of the
        first failing entry gives the message."""
        c = self.columns()
        bad = (
            (c.name_len == 0)
            | ~self._type_ok
            | (c.offset < 0)
            | (c.size < 0)
            | (c.offset > limit)
            | (c.size > limit - np.minimum(c.offset, limit))
        )
        for i, records in self._pax.items():
            if "" in records:
                bad[i] = True
        failing = np.flatnonzero(bad)
        if len(failing):
            i = int(failing[0])
            _validate_entry(i, self[i], limit)
            raise ZtocError(f"file entry {i} is invalid")
        reg = np.flatnonzero(c.kind == TYPE_CODES.index("reg"))
        if len(reg) > 1:
            off, size = c.offset[reg], c.size[reg]
            order = np.lexsort((reg, size, off))
            ends = (off + size)[order]
            prev_max = np.maximum.accumulate(ends)[:-1]
            if (off[order][1:] < prev_max).any():
                _validate_overlaps(self, limit)
                raise ZtocError("overlapping file entries")

    def columns(self) -> EntryColumns:
        """The entries as arrays (computed at decode)."""
        assert self._columns is not None
        return self._columns

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, i: int) -> FileMetadata: ...
    @overload
    def __getitem__(self, i: slice) -> list[FileMetadata]: ...
    def __getitem__(self, i: int | slice) -> FileMetadata | list[FileMetadata]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._positions)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return _decode_file(flatbuf.table_at(self._buffer, int(self._positions[i])))

    def __iter__(self) -> Iterator[FileMetadata]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TocEntries({len(self)} entries)"


def entry_columns(files: Sequence[FileMetadata]) -> EntryColumns:
    """The entries as arrays: those of a decoded zTOC, or computed from a list."""
    if isinstance(files, TocEntries):
        return files.columns()
    n = len(files)
    parts: list[bytes] = []
    pos = 0
    name_start, name_len, link_start, link_len = (np.zeros(n, np.int64) for _ in range(4))
    for i, f in enumerate(files):
        for text, starts, lens in (
            (f.name, name_start, name_len),
            (f.linkname, link_start, link_len),
        ):
            raw = text.encode("utf-8", "surrogateescape")
            starts[i], lens[i] = pos, len(raw)
            parts.append(raw + b"\0")
            pos += len(raw) + 1
    kinds = {t: k for k, t in enumerate(TYPE_CODES)}
    mtimes = [_mtime_ns(f.mod_time) for f in files]
    return EntryColumns(
        blob=b"".join(parts) + b"\0",
        name_start=name_start,
        name_len=name_len,
        link_start=link_start,
        link_len=link_len,
        kind=np.array([kinds.get(f.type, 255) for f in files], np.uint8),
        offset=np.array([f.uncompressed_offset for f in files], np.int64),
        size=np.array([f.uncompressed_size for f in files], np.int64),
        mode=np.array([f.mode for f in files], np.int64),
        uid=np.array([f.uid for f in files], np.int64),
        gid=np.array([f.gid for f in files], np.int64),
        mtime_ns=np.array([m or 0 for m in mtimes], np.int64),
        devices={
            i: (f.devmajor, f.devminor) for i, f in enumerate(files) if f.devmajor or f.devminor
        },
        xattrs={i: f.xattrs for i, f in enumerate(files) if f.xattrs},
        bad_mtimes=[i for i, m in enumerate(mtimes) if m is None],
    )


def _decode_pax(t: flatbuf.Table) -> dict[str, str]:
    pax: dict[str, str] = {}
    for x in t.vector_of_tables(_FM_XATTRS):
        key = x.string(_XATTR_KEY) or ""
        if key in pax:
            raise ZtocError(f"duplicate xattr/PAX record {key!r}")
        pax[key] = x.string(_XATTR_VALUE) or ""
    if len(pax) > 1:
        pax = dict(sorted(pax.items()))
    return pax


def _decode_file(t: flatbuf.Table) -> FileMetadata:
    pax = _decode_pax(t)
    return FileMetadata(
        name=t.string(_FM_NAME) or "",
        type=t.string(_FM_TYPE) or "",
        uncompressed_offset=t.scalar(_FM_OFFSET, "q", 0),
        uncompressed_size=t.scalar(_FM_SIZE, "q", 0),
        linkname=t.string(_FM_LINKNAME) or "",
        mode=t.scalar(_FM_MODE, "q", 0),
        uid=t.scalar(_FM_UID, "I", 0),
        gid=t.scalar(_FM_GID, "I", 0),
        uname=t.string(_FM_UNAME) or "",
        gname=t.string(_FM_GNAME) or "",
        mod_time=t.string(_FM_MOD_TIME) or "",
        devmajor=t.scalar(_FM_DEVMAJOR, "q", 0),
        devminor=t.scalar(_FM_DEVMINOR, "q", 0),
        pax_records=pax,
    )


def validate_ztoc(z: Ztoc) -> None:
    """Check a zTOC's internal consistency; raise ZtocError naming the first problem.

    The checkpoint blob is not checked here (see soci.zinfo).
    """
    _validate_header(z)
    limit = z.uncompressed_archive_size
    for i, f in enumerate(z.files):
        _validate_entry(i, f, limit)
    _validate_overlaps(z.files, limit)
    _validate_spans(z)


def _validate_header(z: Ztoc) -> None:
    if not z.version:
        raise ZtocError("zTOC has an empty version")
    if z.compressed_archive_size < 0 or z.uncompressed_archive_size < 0:
        raise ZtocError(
            f"negative archive size (compressed {z.compressed_archive_size}, "
            f"uncompressed {z.uncompressed_archive_size})"
        )


def _validate_entry(i: int, f: FileMetadata, limit: int) -> None:
    if not f.name:
        raise ZtocError(f"file entry {i} has an empty name")
    if f.type not in ENTRY_TYPES:
        raise ZtocError(f"file entry {i} ({f.name!r}) has unknown type {f.type!r}")
    offset = f.uncompressed_offset
    size = f.uncompressed_size
    if offset < 0 or size < 0 or offset + size > limit:
        raise ZtocError(
            f"file entry {i} ({f.name!r}) range [{offset}, {offset}+{size}) is outside "
            f"the uncompressed archive of {limit} bytes"
        )
    if f.pax_records and "" in f.pax_records:
        raise ZtocError(f"file entry {i} ({f.name!r}) has a PAX record with an empty key")


def _validate_overlaps(files: Sequence[FileMetadata], limit: int) -> None:
    regular = sorted(
        (f.uncompressed_offset, f.uncompressed_size, i)
        for i, f in enumerate(files)
        if f.type == "reg"
    )
    end = 0
    prev = -1
    for offset, size, i in regular:
        if offset < end:
            raise ZtocError(
                f"file entry {i} ({files[i].name!r}) at {offset} overlaps file entry {prev} "
                f"({files[prev].name!r}) ending at {end}"
            )
        if offset + size > end:
            end = offset + size
            prev = i


def _validate_spans(z: Ztoc) -> None:
    if z.max_span_id < 0:
        raise ZtocError(f"negative max_span_id {z.max_span_id}")
    if z.max_span_id != len(z.span_digests) - 1:
        raise ZtocError(
            f"max_span_id {z.max_span_id} does not match {len(z.span_digests)} span digests"
        )
    for i, d in enumerate(z.span_digests):
        if not _SPAN_DIGEST.fullmatch(d):
            raise ZtocError(f"span digest {i} is not sha256:<64 lowercase hex>: {d[:80]!r}")
    try:
        CompressionAlgorithm(z.compression_algorithm)
    except ValueError:
        raise ZtocError(f"unknown compression algorithm {z.compression_algorithm!r}") from None


def ztoc_digest(blob: bytes | bytearray | memoryview) -> str:
    """The content digest of a zTOC blob: "sha256:<hex>"."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()
