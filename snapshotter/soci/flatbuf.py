"""A small verifying flatbuffers reader that never trusts an offset.

Every uoffset, soffset, vtable, vector length and string length is checked against the
buffer before it is followed or anything is allocated for it; a violation raises the
`FormatError` subclass the caller passes to `root`. The total number of bytes the reader
may visit is bounded by a small multiple of the buffer size, so a crafted buffer whose
offsets all point at one shared vector cannot make decoding take quadratic time.

Only little-endian integer scalars, strings, tables and vectors of those are supported:
that is all the SOCI formats use.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from snapshotter.errors import FormatError

__all__ = ["Table", "root"]

_U16x2 = struct.Struct("<HH").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from

_SCALARS: dict[str, struct.Struct] = {c: struct.Struct("<" + c) for c in "?bBhHiIqQ"}

# Tables and vectors are charged on every visit, strings only on the first (they are cached:
# builders legitimately share strings, never tables or vectors), so reading honest data once
# spends at most the buffer's size; the factor leaves room for callers that re-read fields.
_BUDGET_FACTOR = 4
_BUDGET_SLACK = 1 << 16


class _Buffer:
    """The buffer, its bounds, the caller's error class and the shared visit budget."""

    __slots__ = ("budget", "buf", "error", "size", "strings", "view", "vtables")

    def __init__(self, data: bytes | bytearray | memoryview, error: type[FormatError]) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        self.view = view
        self.buf: bytes | memoryview = data if isinstance(data, bytes) else view
        self.size = len(view)
        self.error = error
        self.budget = _BUDGET_FACTOR * self.size + _BUDGET_SLACK
        # vtable position -> (field offsets, object size); vtables are shared by many tables.
        self.vtables: dict[int, tuple[tuple[int, ...], int]] = {}
        self.strings: dict[int, str] = {}

    def spend(self, n: int, what: str) -> None:
        self.budget -= n
        if self.budget < 0:
            raise self.error(f"flatbuffer: {what} exceeds the visit budget (shared offsets?)")

    def vtable(self, vt: int, pos: int) -> tuple[tuple[int, ...], int]:
        size = self.size
        if vt < 0 or vt + 4 > size:
            raise self.error(f"flatbuffer: vtable of table at {pos} is out of bounds ({vt})")
        vtsize, objsize = _U16x2(self.buf, vt)
        if vtsize < 4 or vtsize & 1 or vt + vtsize > size:
            raise self.error(f"flatbuffer: bad vtable size {vtsize} at {vt}")
        if objsize < 4:
            raise self.error(f"flatbuffer: bad table size {objsize} in vtable at {vt}")
        self.spend(vtsize, "vtable")
        nfields = (vtsize - 4) // 2
        offsets: tuple[int, ...] = struct.unpack_from(f"<{nfields}H", self.buf, vt + 4)
        entry = (offsets, objsize)
        self.vtables[vt] = entry
        return entry

    def string_at(self, pos: int) -> str:
        """Decode the string whose length prefix is at `pos`."""
        cached = self.strings.get(pos)
        if cached is not None:
            return cached
        size = self.size
        if pos + 4 > size:
            raise self.error(f"flatbuffer: string at {pos} is out of bounds")
        (n,) = _U32(self.buf, pos)
        start = pos + 4
        end = start + n
        if end >= size:
            raise self.error(f"flatbuffer: string of length {n} at {pos} is out of bounds")
        if self.view[end] != 0:
            raise self.error(f"flatbuffer: string at {pos} is not NUL-terminated")
        self.spend(n + 5, "string")
        s = self.strings[pos] = str(self.view[start:end], "utf-8", "surrogateescape")
        return s

    def vector_at(self, pos: int, elem_size: int) -> tuple[int, int]:
        """Return (count, first element position) of the vector whose length is at `pos`."""
        if pos + 4 > self.size:
            raise self.error(f"flatbuffer: vector at {pos} is out of bounds")
        (n,) = _U32(self.buf, pos)
        nbytes = n * elem_size
        if pos + 4 + nbytes > self.size:
            raise self.error(f"flatbuffer: vector of {n} elements at {pos} is out of bounds")
        self.spend(nbytes + 4, "vector")
        return n, pos + 4


class Table:
    """A verified flatbuffers table: its vtable and inline object lie inside the buffer."""

    __slots__ = ("_b", "_buf", "_objsize", "_offsets", "_pos")

    def __init__(self, b: _Buffer, pos: int) -> None:
        if pos + 4 > b.size:
            raise b.error(f"flatbuffer: table at {pos} is out of bounds")
        vt = pos - _I32(b.buf, pos)[0]
        entry = b.vtables.get(vt)
        if entry is None:
            entry = b.vtable(vt, pos)
        offsets, objsize = entry
        if pos + objsize > b.size:
            raise b.error(f"flatbuffer: table at {pos} of size {objsize} is out of bounds")
        b.spend(objsize, "table")
        self._b = b
        self._buf = b.buf
        self._pos = pos
        self._offsets = offsets
        self._objsize = objsize

    @property
    def position(self) -> int:
        """Byte offset of the table in the buffer."""
        return self._pos

    def _outside(self, slot: int) -> FormatError:
        return self._b.error(
            f"flatbuffer: field {slot} of table at {self._pos} lies outside the table"
        )

    def _field(self, slot: int, size: int) -> int:
        """Absolute position of the field in `slot`, or 0 when it is absent."""
        offsets = self._offsets
        if slot >= len(offsets):
            return 0
        off = offsets[slot]
        if off == 0:
            return 0
        if off < 4 or off + size > self._objsize:
            raise self._outside(slot)
        return self._pos + off

    def _indirect(self, slot: int) -> int:
        """Follow the uoffset in `slot`; 0 when the field is absent."""
        p = self._field(slot, 4)
        if p == 0:
            return 0
        rel: int = _U32(self._buf, p)[0]
        return p + rel

    def scalar(self, slot: int, fmt: str, default: int) -> int:
        """Read an integer scalar (struct format char, e.g. "q", "I", "b") or its default."""
        s = _SCALARS[fmt]
        offsets = self._offsets
        off = offsets[slot] if slot < len(offsets) else 0
        if off == 0:
            return default
        if off < 4 or off + s.size > self._objsize:
            raise self._outside(slot)
        value: int = s.unpack_from(self._buf, self._pos + off)[0]
        return value

    def string(self, slot: int) -> str | None:
        """Read a string field (UTF-8, undecodable bytes as surrogate escapes), or None."""
        offsets = self._offsets
        off = offsets[slot] if slot < len(offsets) else 0
        if off == 0:
            return None
        if off < 4 or off + 4 > self._objsize:
            raise self._outside(slot)
        p = self._pos + off
        return self._b.string_at(p + _U32(self._buf, p)[0])

    def table(self, slot: int) -> Table | None:
        """Read a sub-table field, or None."""
        target = self._indirect(slot)
        if target == 0:
            return None
        return Table(self._b, target)

    def _offset_vector(self, slot: int) -> list[int] | None:
        """Absolute positions that the elements of a vector of uoffsets point at."""
        target = self._indirect(slot)
        if target == 0:
            return None
        n, first = self._b.vector_at(target, 4)
        rel = struct.unpack_from(f"<{n}I", self._buf, first)
        return [first + 4 * i + r for i, r in enumerate(rel)]

    def vector_of_tables(self, slot: int) -> Sequence[Table]:
        """Read a vector of tables (empty when absent)."""
        positions = self._offset_vector(slot)
        if positions is None:
            return ()
        b = self._b
        return [Table(b, p) for p in positions]

    def vector_of_strings(self, slot: int) -> Sequence[str]:
        """Read a vector of strings (empty when absent)."""
        positions = self._offset_vector(slot)
        if positions is None:
            return ()
        string_at = self._b.string_at
        return [string_at(p) for p in positions]

    def bytes_vector(self, slot: int) -> memoryview | None:
        """Read a [ubyte]/[byte] vector as a zero-copy view of the buffer, or None."""
        target = self._indirect(slot)
        if target == 0:
            return None
        n, first = self._b.vector_at(target, 1)
        return self._b.view[first : first + n]


def root(data: bytes | bytearray | memoryview, error: type[FormatError]) -> Table:
    """Return the verified root table of a flatbuffer (no file identifier is checked).

    Every later read through the returned table raises `error` on malformed data.
    """
    b = _Buffer(data, error)
    if b.size < 8:
        raise error(f"flatbuffer: {b.size} bytes is too short")
    return Table(b, _U32(b.buf, 0)[0])
