"""Tar stream → TOC: the `FileMetadata` list a zTOC records for one layer.

`TocBuilder` is a push parser for the uncompressed tar stream. It copies only header blocks
and meta payloads (PAX headers, GNU long names, each at most 1 MiB); file data is skipped by
counting, so it can ride along the single decompression pass of the zTOC builder.

End of archive follows Go's archive/tar: two zero blocks (anything after them is ignored),
one zero block followed by end of stream, or end of stream exactly at an entry boundary.
"""

from __future__ import annotations

from collections.abc import Iterable

from snapshotter.errors import TarFormatError
from snapshotter.soci.tarheader import (
    BLOCK_SIZE,
    META_TYPES,
    ZERO_BLOCK,
    EntryChain,
    RawHeader,
    data_length,
    meta_payload_size,
    padded_size,
    parse_header_block,
)
from snapshotter.soci.ztoc import FileMetadata


class TocBuilder:
    """Push parser: feed the uncompressed tar stream in order, in chunks of any size.

    Chunks may alias a buffer the caller reuses after `feed` returns; nothing is kept
    from them except copies of header and meta bytes. Once `feed` or `finish` has raised
    TarFormatError the builder's state is undefined: discard it.
    """

    __slots__ = (
        "_block",
        "_chain",
        "_entries",
        "_finished",
        "_meta_buf",
        "_meta_header",
        "_meta_need",
        "_meta_offset",
        "_pos",
        "_skip",
        "_zero_seen",
        "end_offset",
    )

    def __init__(self) -> None:
        self._entries: list[FileMetadata] = []
        self._pos = 0
        self._skip = 0
        self._block = bytearray()
        self._chain = EntryChain()
        self._meta_header: RawHeader | None = None
        self._meta_offset = 0
        self._meta_need = 0
        self._meta_buf = bytearray()
        self._zero_seen = False
        self._finished = False
        self.end_offset: int | None = None
        """Offset just past the end-of-archive marker, once both zero blocks were seen."""

    @property
    def entries(self) -> int:
        """Number of entries parsed so far."""
        return len(self._entries)

    @property
    def bytes_consumed(self) -> int:
        """Total bytes fed so far (including any after the end-of-archive marker)."""
        return self._pos

    @property
    def archive_end(self) -> int:
        """Where Go's archive/tar stops reading the stream: just past the end-of-archive
        marker, or the end of the stream when it comes first (no marker, or one zero block).
        What soci records as a zTOC's uncompressed archive size."""
        return self.end_offset if self.end_offset is not None else self._pos

    @property
    def at_end(self) -> bool:
        """True once the two-block end-of-archive marker has been read."""
        return self.end_offset is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next chunk of the tar stream."""
        if self._finished:
            raise RuntimeError("TocBuilder.feed() after finish()")
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = view.nbytes
        base = self._pos
        if self.end_offset is not None:
            self._pos = base + n
            return
        i = 0
        while i < n:
            skip = self._skip
            if skip:
                if skip >= n - i:
                    self._skip = skip - (n - i)
                    break
                i += skip
                self._skip = 0
                continue
            need = self._meta_need
            if need:
                take = min(need, n - i)
                self._meta_buf += view[i : i + take]
                i += take
                self._meta_need = need - take
                if not self._meta_need:
                    self._finish_meta()
                continue
            if not self._block and n - i >= BLOCK_SIZE:
                block = view[i : i + BLOCK_SIZE].tobytes()
                i += BLOCK_SIZE
            else:
                take = min(BLOCK_SIZE - len(self._block), n - i)
                self._block += view[i : i + take]
                i += take
                if len(self._block) < BLOCK_SIZE:
                    break
                block = bytes(self._block)
                self._block.clear()
            self._on_block(block, base + i - BLOCK_SIZE)
            if self.end_offset is not None:
                break
        self._pos = base + n

    def _on_block(self, block: bytes, offset: int) -> None:
        if block == ZERO_BLOCK:
            if self._chain.pending:
                raise TarFormatError(
                    f"tar meta entry at offset {self._chain.start} not followed by an entry"
                )
            if self._zero_seen:
                self.end_offset = offset + BLOCK_SIZE
            self._zero_seen = True
            return
        if self._zero_seen:
            raise TarFormatError(f"tar header at offset {offset} follows a zero block")
        hdr = parse_header_block(block, offset)
        if hdr.typeflag in META_TYPES:
            size = meta_payload_size(hdr, offset)
            self._meta_header = hdr
            self._meta_offset = offset
            self._meta_need = size
            if not size:
                self._finish_meta()
            return
        meta = self._chain.finish(hdr, offset + BLOCK_SIZE)
        self._entries.append(meta)
        self._skip = padded_size(data_length(meta))

    def _finish_meta(self) -> None:
        hdr = self._meta_header
        payload = bytes(self._meta_buf)
        self._meta_buf.clear()
        self._meta_header = None
        if hdr is None:  # pragma: no cover - only reachable through a bug here
            raise RuntimeError("meta payload without its header")
        self._chain.add_meta(hdr, payload, self._meta_offset)
        self._skip = padded_size(len(payload)) - len(payload)

    def finish(self) -> list[FileMetadata]:
        """End of stream: return the entries sorted by data offset, or raise if truncated."""
        self._finished = True
        if self.end_offset is None:
            if self._block:
                raise TarFormatError(
                    f"truncated tar header at offset {self._pos - len(self._block)}"
                )
            if self._meta_need or self._skip:
                raise TarFormatError(
                    f"truncated tar stream: ends at offset {self._pos} inside an entry"
                )
            if self._chain.pending:
                raise TarFormatError(
                    f"truncated tar stream: meta entry at offset {self._chain.start} "
                    "not followed by an entry"
                )
        return sorted(self._entries, key=lambda m: m.uncompressed_offset)


def build_toc(chunks: Iterable[bytes | bytearray | memoryview]) -> list[FileMetadata]:
    """Parse a whole uncompressed tar stream given as chunks; see TocBuilder."""
    builder = TocBuilder()
    for chunk in chunks:
        builder.feed(chunk)
    return builder.finish()
