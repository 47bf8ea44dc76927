"""A small verifying flatbuffers reader that never trusts an offset.

Every uoffset, soffset, vtable, vector length and string length is checked against the
buffer before it is followed or anything is allocated for it; a violation raises the
`FormatError` subclass the caller passes to `root`. The total number of bytes the reader
may visit is bounded by a small multiple of the buffer size, so a crafted buffer whose
offsets all point at one shared vector cannot make decoding take quadratic time.

Only little-endian integer scalars, strings, tables and vectors of those are supported:
that is all the SOCI formats use. `TableColumns` reads a long vector of tables column-wise
(numpy), with the same checks, for zTOCs of millions of entries.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from snapshotter.errors import FormatError

__all__ = ["ColumnError", "Table", "TableColumns", "root"]

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


class ColumnError(Exception):
    """Raised by `TableColumns` with the index of the first malformed table of the vector,
    so the caller can explain it with the scalar reader."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class TableColumns:
    """A vector of tables read column-wise: every check `Table` makes, vectorized.

    Positions, vtables, field offsets, string and vector bounds are validated for all
    tables at once with numpy; a violation raises `ColumnError` naming the first bad table.
    Work is charged to the buffer's visit budget as the scalar reader charges it.
    """

    def __init__(self, b: _Buffer, positions: npt.NDArray[np.int64]) -> None:
        self._b = b
        self._u8: npt.NDArray[np.uint8] = np.frombuffer(b.view, np.uint8)
        self.count = n = len(positions)
        size = b.size
        pos = positions
        self._fail(np.flatnonzero((pos < 0) | (pos + 4 > size)))
        vt = pos - self.gather(pos, "<i4").astype(np.int64)
        self._fail(np.flatnonzero((vt < 0) | (vt + 4 > size)))
        vtsize = self.gather(vt, "<u2").astype(np.int64)
        objsize = self.gather(vt + 2, "<u2").astype(np.int64)
        self._fail(
            np.flatnonzero(
                (vtsize < 4)
                | (vtsize & 1 != 0)
                | (vt + vtsize > size)
                | (objsize < 4)
                | (pos + objsize > size)
            )
        )
        if n:
            # Vtables are charged once each (builders share them), so at most the buffer's
            # size (they all lie inside it).
            b.spend(min(int(vtsize.sum()), size), "vtable")
            b.spend(int(objsize.sum()), "table")
        self.pos = pos
        self._offset_cache: dict[int, npt.NDArray[np.int64]] = {}
        self._vt = vt
        self._vtsize = vtsize
        self._objsize = objsize

    def _fail(self, bad: npt.NDArray[np.intp], subset: npt.NDArray[np.intp] | None = None) -> None:
        if len(bad):
            raise ColumnError(int(bad[0] if subset is None else subset[bad[0]]))

    def gather(self, p: npt.NDArray[np.int64], fmt: str) -> npt.NDArray[Any]:
        """The little-endian value of type `fmt` at each position (bounds already checked)."""
        dt = np.dtype(fmt)
        w = dt.itemsize
        if len(p) == 0:
            return np.zeros(0, dt)
        if w == 1:
            return self._u8[p].view(dt)
        if not (p % w).any():
            whole: npt.NDArray[Any] = np.frombuffer(self._b.view, dt, count=self._b.size // w)
            return whole[p // w]
        windows = sliding_window_view(self._u8, w)
        return np.ascontiguousarray(windows[p]).view(dt).reshape(-1)

    def _offsets(self, slot: int) -> npt.NDArray[np.int64]:
        """The field offset of `slot` in every table (0: absent). The first call reads the
        first slots of every vtable in one gather."""
        got = self._offset_cache.get(slot)
        if got is not None:
            return got
        width = 16
        idx = np.flatnonzero(self._vtsize > 4)
        if not self._offset_cache and not (self._vt[idx] & 1).any():
            slots = np.arange(width, dtype=np.int64)
            halves: npt.NDArray[np.uint16] = np.frombuffer(
                self._b.view, "<u2", count=self._b.size // 2
            )
            first = (self._vt[idx] + 4) // 2
            block = halves[np.minimum(first[:, None] + slots[None, :], len(halves) - 1)]
            block = np.where(4 + 2 * slots[None, :] < self._vtsize[idx, None], block, 0)
            for k in range(width):
                column = np.zeros(self.count, np.int64)
                column[idx] = block[:, k]
                self._offset_cache[k] = column
            got = self._offset_cache.get(slot)
        if got is None:  # odd vtables, or a slot past the block: this slot alone
            has = np.flatnonzero(self._vtsize > 4 + 2 * slot)
            got = np.zeros(self.count, np.int64)
            got[has] = self.gather(self._vt[has] + 4 + 2 * slot, "<u2")
            self._offset_cache[slot] = got
        return got

    def field(self, slot: int, size: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """Which tables have the field, and its absolute position (0 where absent)."""
        off = self._offsets(slot)
        present = off != 0
        self._fail(np.flatnonzero(present & ((off < 4) | (off + size > self._objsize))))
        return present, np.where(present, self.pos + off, 0)

    def scalar(self, slot: int, fmt: str, default: int) -> npt.NDArray[Any]:
        """An integer scalar column (struct format char, as `Table.scalar`)."""
        dt = np.dtype("<" + fmt)
        present, p = self.field(slot, dt.itemsize)
        out = np.full(self.count, default, dt)
        idx = np.flatnonzero(present)
        out[idx] = self.gather(p[idx], dt.str)
        return out

    def _indirect(self, slot: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        present, p = self.field(slot, 4)
        idx = np.flatnonzero(present)
        return idx, p[idx] + self.gather(p[idx], "<u4").astype(np.int64)

    def strings(self, slot: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(start, length) of each table's string bytes; start -1 where absent."""
        idx, target = self._indirect(slot)
        size = self._b.size
        self._fail(np.flatnonzero(target + 4 > size), idx)
        length = self.gather(target, "<u4").astype(np.int64)
        start = target + 4
        end = start + length
        self._fail(np.flatnonzero(end >= size), idx)
        self._fail(np.flatnonzero(self._u8[end] != 0), idx)
        if len(idx):
            total = int((length + 5).sum())
            if total > self._b.budget:  # shared strings are charged once (see above)
                _, first = np.unique(start, return_index=True)
                total = int((length[first] + 5).sum())
            self._b.spend(total, "string")
        starts = np.full(self.count, -1, np.int64)
        lengths = np.zeros(self.count, np.int64)
        starts[idx] = start
        lengths[idx] = length
        return starts, lengths

    def vectors(
        self, slot: int, elem_size: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(first element position, count) of each table's vector; count 0 where absent."""
        idx, target = self._indirect(slot)
        self._fail(np.flatnonzero(target + 4 > self._b.size), idx)
        count = self.gather(target, "<u4").astype(np.int64)
        self._fail(np.flatnonzero(target + 4 + count * elem_size > self._b.size), idx)
        self._b.spend(int((count * elem_size + 4).sum()), "vector")
        first = np.zeros(self.count, np.int64)
        counts = np.zeros(self.count, np.int64)
        first[idx] = target + 4
        counts[idx] = count
        return first, counts


def vector_of_table_positions(table: Table, slot: int) -> npt.NDArray[np.int64]:
    """Absolute positions of the tables a vector field points at (empty when absent),
    without a Python object per element."""
    b = table._b
    target = table._indirect(slot)
    if target == 0:
        return np.zeros(0, np.int64)
    n, first = b.vector_at(target, 4)
    rel = np.frombuffer(b.view, "<u4", n, first).astype(np.int64)
    return first + 4 * np.arange(n, dtype=np.int64) + rel


def unlimited(table: Table) -> None:
    """Lift the visit budget of `table`'s buffer (after a vectorized pass bounded the work),
    so the scalar reader can re-read validated data any number of times."""
    table._b.budget = 1 << 62


def buffer_of(table: Table) -> _Buffer:
    """The buffer a table lives in (to make more tables of it)."""
    return table._b


def table_at(b: _Buffer, pos: int) -> Table:
    """The table at `pos` of buffer `b`."""
    return Table(b, pos)
