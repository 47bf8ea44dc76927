"""zTOC: the table of contents plus decompression info of one layer (soci's flatbuffer format).

Wire format: flatbuffers, namespace `ztoc`, root table `Ztoc`, no file identifier; the field
order below is the vtable slot order of soci's schema.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import flatbuffers

from snapshotter.errors import ZtocError
from snapshotter.soci import flatbuf

ZTOC_VERSION = "0.9"
ZERO_MOD_TIME = "0001-01-01T00:00:00Z"
XATTR_PAX_PREFIX = "SCHILY.xattr."
ENTRY_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"})


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
    """A decoded zTOC. `checkpoints` is the raw checkpoint blob (see soci.zinfo)."""

    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    files: list[FileMetadata]
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


def decode_ztoc(data: bytes | bytearray | memoryview) -> Ztoc:
    """Parse and validate a zTOC blob; any malformation raises ZtocError."""
    t = flatbuf.root(data, ZtocError)
    version = t.string(_ZTOC_VERSION) or ""
    build_tool = t.string(_ZTOC_BUILD_TOOL) or ""
    compressed_size = t.scalar(_ZTOC_COMPRESSED, "q", 0)
    uncompressed_size = t.scalar(_ZTOC_UNCOMPRESSED, "q", 0)

    files: list[FileMetadata] = []
    toc = t.table(_ZTOC_TOC)
    if toc is not None:
        for i, ft in enumerate(toc.vector_of_tables(_TOC_METADATA)):
            try:
                files.append(_decode_file(ft))
            except ZtocError as e:
                raise ZtocError(f"file entry {i}: {e}") from e

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
    validate_ztoc(z)
    return z


def _decode_file(t: flatbuf.Table) -> FileMetadata:
    pax: dict[str, str] = {}
    for x in t.vector_of_tables(_FM_XATTRS):
        key = x.string(_XATTR_KEY) or ""
        if key in pax:
            raise ZtocError(f"duplicate xattr/PAX record {key!r}")
        pax[key] = x.string(_XATTR_VALUE) or ""
    if len(pax) > 1:
        pax = dict(sorted(pax.items()))
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
    if not z.version:
        raise ZtocError("zTOC has an empty version")
    if z.compressed_archive_size < 0 or z.uncompressed_archive_size < 0:
        raise ZtocError(
            f"negative archive size (compressed {z.compressed_archive_size}, "
            f"uncompressed {z.uncompressed_archive_size})"
        )
    limit = z.uncompressed_archive_size
    regular: list[tuple[int, int, int]] = []
    for i, f in enumerate(z.files):
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
        if f.type == "reg":
            regular.append((offset, size, i))
        if f.pax_records and "" in f.pax_records:
            raise ZtocError(f"file entry {i} ({f.name!r}) has a PAX record with an empty key")
    regular.sort()
    end = 0
    prev = -1
    for offset, size, i in regular:
        if offset < end:
            raise ZtocError(
                f"file entry {i} ({z.files[i].name!r}) at {offset} overlaps file entry {prev} "
                f"({z.files[prev].name!r}) ending at {end}"
            )
        if offset + size > end:
            end = offset + size
            prev = i
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
