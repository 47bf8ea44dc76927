"""Checkpoint ("zinfo") blobs of a zTOC and the span arithmetic built on them.

gzip layers: a little-endian blob `int32 count, int64 span_size` followed by `count`
checkpoints `int64 in, int64 out, uint8 bits, uint8[32768] window` (a legacy layout omits
checkpoint 0). Span i covers uncompressed [out_i, out_{i+1}) and compressed
[in_i - (1 if bits_i else 0), in_{i+1}).

Uncompressed tar layers: a flatbuffer `zinfo.TarZinfo{version, span_size, size}` (size = the
blob's) and fixed spans `[i*span_size, (i+1)*span_size)`; the last one ends at the blob's end in
the compressed view and at the zTOC's uncompressed size in the uncompressed view, as in soci.

The zTOC's uncompressed size is, for soci's reader, only the end of the last span's
uncompressed bytes (awslabs/soci-snapshotter v0.16.1 fs/span-manager/span_manager.go:
`EndUncompressedOffset(maxSpan, UncompressedArchiveSize)`). soci writes where Go's archive/tar
stops reading (ztoc/toc_builder.go: just past the end-of-archive blocks, not the record padding
after them), and so does pysoci's builder now; earlier pysoci zTOCs hold the whole stream. Any
value from the last span's start to the stream's end serves the same files: both are read.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import flatbuffers

from snapshotter.errors import CheckpointError
from snapshotter.soci.ztoc import CompressionAlgorithm

WINDOW_SIZE: Final = 32768
CHECKPOINT_SIZE: Final = 8 + 8 + 1 + WINDOW_SIZE
HEADER_SIZE: Final = 4 + 8
TAR_ZINFO_VERSION: Final = 2
LEGACY_FIRST_IN: Final = 10
"""`in` of the implicit checkpoint 0 of a legacy blob (a minimal 10-byte gzip header)."""

_HEADER: Final = struct.Struct("<iq")
_CHECKPOINT_FIXED: Final = struct.Struct("<qqB")
_ZERO_WINDOW: Final = bytes(WINDOW_SIZE)

Blob = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A point where inflation can restart: zran's `in`, `out`, `bits` and window."""

    compressed_offset: int
    uncompressed_offset: int
    bits: int
    window: bytes


def _check_span_id(span: int, num_spans: int) -> None:
    if not 0 <= span < num_spans:
        raise CheckpointError(f"span {span} out of range (the layer has {num_spans} spans)")


def _spans_for_range(zinfo: GzipZinfo | TarZinfo, offset: int, length: int) -> range:
    if offset < 0 or length < 0:
        raise CheckpointError(f"invalid range: offset {offset}, length {length}")
    if length == 0:
        return range(0)
    end = offset + length
    if end > zinfo.uncompressed_size:
        raise CheckpointError(
            f"range [{offset}, {end}) beyond the uncompressed size {zinfo.uncompressed_size}"
        )
    return range(zinfo.span_of(offset), zinfo.span_of(end - 1) + 1)


class GzipZinfo:
    """Decoded gzip checkpoints; windows stay in the blob until asked for."""

    __slots__ = (
        "_bits",
        "_blob",
        "_first_stored",
        "_in",
        "_out",
        "compressed_size",
        "span_size",
        "uncompressed_size",
    )

    def __init__(
        self,
        blob: Blob,
        span_size: int,
        ins: array[int],
        outs: array[int],
        bits: bytes,
        *,
        legacy: bool,
        compressed_size: int,
        uncompressed_size: int,
    ) -> None:
        self._blob = blob
        self.span_size = span_size
        self._in = ins
        self._out = outs
        self._bits = bits
        # Index (in the checkpoint list) of the first checkpoint stored in the blob.
        self._first_stored = 1 if legacy else 0
        self.compressed_size = compressed_size
        self.uncompressed_size = uncompressed_size

    @property
    def num_spans(self) -> int:
        """Number of spans (== number of checkpoints == max_span_id + 1)."""
        return len(self._out)

    @property
    def max_span_id(self) -> int:
        """The zTOC's `max_span_id`."""
        return len(self._out) - 1

    @property
    def legacy(self) -> bool:
        """Whether the blob omitted checkpoint 0."""
        return self._first_stored == 1

    def window(self, i: int) -> bytes:
        """The 32 KiB dictionary of checkpoint i."""
        _check_span_id(i, self.num_spans)
        k = i - self._first_stored
        if k < 0:
            return _ZERO_WINDOW
        start = HEADER_SIZE + k * CHECKPOINT_SIZE + _CHECKPOINT_FIXED.size
        return bytes(self._blob[start : start + WINDOW_SIZE])

    def checkpoint(self, i: int) -> Checkpoint:
        """Checkpoint i (a copy of its window included)."""
        _check_span_id(i, self.num_spans)
        return Checkpoint(self._in[i], self._out[i], self._bits[i], self.window(i))

    def checkpoints(self) -> Iterable[Checkpoint]:
        """All checkpoints in order (windows copied one at a time)."""
        for i in range(self.num_spans):
            yield self.checkpoint(i)

    def bits(self, i: int) -> int:
        """Unused bits of byte `in_i - 1` that belong to span i."""
        _check_span_id(i, self.num_spans)
        return self._bits[i]

    def span_of(self, uncompressed_offset: int) -> int:
        """The span holding `uncompressed_offset`."""
        if not 0 <= uncompressed_offset < self.uncompressed_size:
            raise CheckpointError(
                f"offset {uncompressed_offset} outside the layer "
                f"(uncompressed size {self.uncompressed_size})"
            )
        return bisect.bisect_right(self._out, uncompressed_offset) - 1

    def uncompressed_bounds(self, span: int) -> tuple[int, int]:
        """[start, end) of span in the uncompressed stream."""
        _check_span_id(span, self.num_spans)
        end = self._out[span + 1] if span + 1 < len(self._out) else self.uncompressed_size
        return self._out[span], end

    def compressed_bounds(self, span: int) -> tuple[int, int]:
        """[start, end) of span in the compressed blob (spans overlap by one byte if bits)."""
        _check_span_id(span, self.num_spans)
        start = self._in[span] - (1 if self._bits[span] else 0)
        end = self._in[span + 1] if span + 1 < len(self._in) else self.compressed_size
        return start, end

    def spans_for_range(self, offset: int, length: int) -> range:
        """The spans covering uncompressed [offset, offset+length)."""
        return _spans_for_range(self, offset, length)


def encode_gzip_zinfo(span_size: int, checkpoints: Iterable[Checkpoint]) -> bytes:
    """Serialize checkpoints in the current layout (checkpoint 0 included)."""
    parts = [b""]
    count = 0
    for cp in checkpoints:
        if len(cp.window) != WINDOW_SIZE:
            raise CheckpointError(f"checkpoint window of {len(cp.window)} bytes")
        parts.append(_CHECKPOINT_FIXED.pack(cp.compressed_offset, cp.uncompressed_offset, cp.bits))
        parts.append(cp.window)
        count += 1
    parts[0] = _HEADER.pack(count, span_size)
    return b"".join(parts)


def decode_gzip_zinfo(blob: Blob, *, compressed_size: int, uncompressed_size: int) -> GzipZinfo:
    """Parse and validate a gzip checkpoint blob (current or legacy layout)."""
    if len(blob) < HEADER_SIZE:
        raise CheckpointError(f"checkpoint blob of {len(blob)} bytes is shorter than its header")
    count, span_size = _HEADER.unpack_from(blob, 0)
    if count < 1:
        raise CheckpointError(f"checkpoint count {count} < 1")
    if span_size <= 0:
        raise CheckpointError(f"span size {span_size} <= 0")
    stored = (len(blob) - HEADER_SIZE) // CHECKPOINT_SIZE
    if (len(blob) - HEADER_SIZE) % CHECKPOINT_SIZE != 0 or stored not in (count, count - 1):
        raise CheckpointError(
            f"checkpoint blob of {len(blob)} bytes does not hold {count} checkpoints"
        )
    legacy = stored == count - 1
    # Allocation below is bounded by the blob's real length (checked above).
    ins: array[int] = array("q")
    outs: array[int] = array("q")
    bits = bytearray()
    if legacy:
        ins.append(LEGACY_FIRST_IN)
        outs.append(0)
        bits.append(0)
    offset = HEADER_SIZE
    for _ in range(stored):
        cin, cout, cbits = _CHECKPOINT_FIXED.unpack_from(blob, offset)
        ins.append(cin)
        outs.append(cout)
        bits.append(cbits)
        offset += CHECKPOINT_SIZE
    _validate_checkpoints(ins, outs, bits, compressed_size, uncompressed_size)
    return GzipZinfo(
        blob,
        span_size,
        ins,
        outs,
        bytes(bits),
        legacy=legacy,
        compressed_size=compressed_size,
        uncompressed_size=uncompressed_size,
    )


def _validate_checkpoints(
    ins: array[int],
    outs: array[int],
    bits: bytearray,
    compressed_size: int,
    uncompressed_size: int,
) -> None:
    if compressed_size < 0 or uncompressed_size < 0:
        raise CheckpointError("negative layer size")
    if outs[0] != 0:
        raise CheckpointError(f"checkpoint 0 is at uncompressed offset {outs[0]}, not 0")
    prev_in = prev_out = -1
    for i, (cin, cout, cbits) in enumerate(zip(ins, outs, bits, strict=True)):
        if cbits > 7:
            raise CheckpointError(f"checkpoint {i}: bits {cbits} > 7")
        if cin < 0 or cout < 0:
            raise CheckpointError(f"checkpoint {i}: negative offset")
        if cbits and cin < 1:
            raise CheckpointError(f"checkpoint {i}: bits set at compressed offset 0")
        # Equal offsets are valid: soci records a checkpoint at every block end while its
        # output is still 0, so a stream that opens with empty blocks has several at 0.
        if cout < prev_out:
            raise CheckpointError(f"checkpoint {i}: uncompressed offset {cout} decreasing")
        if cin < prev_in:
            raise CheckpointError(f"checkpoint {i}: compressed offset {cin} decreasing")
        if cin > compressed_size:
            raise CheckpointError(
                f"checkpoint {i}: compressed offset {cin} beyond the layer size {compressed_size}"
            )
        if cout > uncompressed_size:
            raise CheckpointError(
                f"checkpoint {i}: uncompressed offset {cout} beyond the uncompressed size "
                f"{uncompressed_size}"
            )
        prev_in, prev_out = cin, cout


class TarZinfo:
    """Fixed-size spans of an uncompressed tar layer of `size` bytes, whose archive (the
    uncompressed view) ends at `uncompressed_size` (default: `size`)."""

    __slots__ = ("_usize", "size", "span_size", "version")

    def __init__(
        self, version: int, span_size: int, size: int, uncompressed_size: int | None = None
    ) -> None:
        if span_size <= 0:
            raise CheckpointError(f"span size {span_size} <= 0")
        if size < 0:
            raise CheckpointError(f"negative tar size {size}")
        self.version = version
        self.span_size = span_size
        self.size = size
        usize = size if uncompressed_size is None else uncompressed_size
        last_start = max(self.num_spans - 1, 0) * span_size
        if not last_start <= usize <= size:
            raise CheckpointError(
                f"uncompressed size {usize} of a {size}-byte tar layer is outside its last span "
                f"[{last_start}, {size}]"
            )
        self._usize = usize

    @property
    def compressed_size(self) -> int:
        """The blob's size (the tar's, padding included)."""
        return self.size

    @property
    def uncompressed_size(self) -> int:
        """Where the archive ends (at most the tar's size)."""
        return self._usize

    @property
    def num_spans(self) -> int:
        """Number of spans (ceil(size / span_size))."""
        return -(-self.size // self.span_size)

    @property
    def max_span_id(self) -> int:
        """The zTOC's `max_span_id` (soci's rule; -1 for an empty layer)."""
        return self.num_spans - 1

    def span_of(self, uncompressed_offset: int) -> int:
        """The span holding `uncompressed_offset`."""
        if not 0 <= uncompressed_offset < self._usize:
            raise CheckpointError(
                f"offset {uncompressed_offset} outside the layer (size {self._usize})"
            )
        return uncompressed_offset // self.span_size

    def uncompressed_bounds(self, span: int) -> tuple[int, int]:
        """[start, end) of span in the archive (the last one ends at `uncompressed_size`)."""
        _check_span_id(span, self.num_spans)
        start = span * self.span_size
        return start, min(start + self.span_size, self._usize)

    def compressed_bounds(self, span: int) -> tuple[int, int]:
        """[start, end) of span in the blob (the last one ends at `size`)."""
        _check_span_id(span, self.num_spans)
        start = span * self.span_size
        return start, min(start + self.span_size, self.size)

    def spans_for_range(self, offset: int, length: int) -> range:
        """The spans covering [offset, offset+length)."""
        return _spans_for_range(self, offset, length)


def encode_tar_zinfo(span_size: int, size: int) -> bytes:
    """The TarZinfo flatbuffer soci writes (version 2)."""
    builder = flatbuffers.Builder(64)
    builder.StartObject(3)
    builder.PrependInt64Slot(2, size, 0)
    builder.PrependInt64Slot(1, span_size, 0)
    builder.PrependInt32Slot(0, TAR_ZINFO_VERSION, 0)
    root = builder.EndObject()
    builder.Finish(root)
    return bytes(builder.Output())


_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U16: Final = struct.Struct("<H")
_U16X2: Final = struct.Struct("<HH")
_I64: Final = struct.Struct("<q")


def decode_tar_zinfo(blob: Blob) -> TarZinfo:
    """Parse a TarZinfo flatbuffer with bounds checks on every offset."""
    n = len(blob)
    if n < 4:
        raise CheckpointError(f"tar zinfo of {n} bytes is too short")
    table: int = _U32.unpack_from(blob, 0)[0]
    if table < 4 or table + 4 > n:
        raise CheckpointError(f"tar zinfo root offset {table} outside the buffer")
    (soffset,) = _I32.unpack_from(blob, table)
    vtable = table - soffset
    if vtable < 0 or vtable + 4 > n:
        raise CheckpointError(f"tar zinfo vtable offset {vtable} outside the buffer")
    vt_size, table_size = _U16X2.unpack_from(blob, vtable)
    if vt_size < 4 or vt_size % 2 or vtable + vt_size > n:
        raise CheckpointError(f"tar zinfo vtable size {vt_size} invalid")
    if table_size < 4 or table + table_size > n:
        raise CheckpointError(f"tar zinfo table size {table_size} invalid")

    def field(slot: int, width: int) -> int | None:
        entry = 4 + 2 * slot
        if entry + 2 > vt_size:
            return None
        off: int = _U16.unpack_from(blob, vtable + entry)[0]
        if off == 0:
            return None
        if off < 4 or off + width > table_size:
            raise CheckpointError(f"tar zinfo field {slot} at offset {off} outside its table")
        return table + off

    version = span_size = size = 0
    if (pos := field(0, 4)) is not None:
        (version,) = _I32.unpack_from(blob, pos)
    if (pos := field(1, 8)) is not None:
        (span_size,) = _I64.unpack_from(blob, pos)
    if (pos := field(2, 8)) is not None:
        (size,) = _I64.unpack_from(blob, pos)
    return TarZinfo(version, span_size, size)


Zinfo = GzipZinfo | TarZinfo


def decode_zinfo(
    algorithm: CompressionAlgorithm,
    blob: Blob,
    *,
    compressed_size: int,
    uncompressed_size: int,
) -> Zinfo:
    """Decode a zTOC's checkpoints for a layer of the given sizes."""
    if algorithm == CompressionAlgorithm.GZIP:
        return decode_gzip_zinfo(
            blob, compressed_size=compressed_size, uncompressed_size=uncompressed_size
        )
    if algorithm == CompressionAlgorithm.UNCOMPRESSED:
        tar = decode_tar_zinfo(blob)
        if tar.size != compressed_size:
            raise CheckpointError(
                f"tar zinfo size {tar.size} does not match the layer size {compressed_size}"
            )
        return TarZinfo(tar.version, tar.span_size, tar.size, uncompressed_size)
    raise CheckpointError(f"unknown compression algorithm {algorithm!r}")
