"""Random access to a layer's uncompressed bytes through its zTOC, verifying every span.

I/O is passed in: `read_compressed(start, end)` returns the layer blob's bytes [start, end).
The reader only ever serves bytes whose compressed span matched its zTOC digest.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable

from snapshotter.compression.gzip import inflate_spans
from snapshotter.errors import DigestMismatchError, FormatError
from snapshotter.soci.zinfo import GzipZinfo, Zinfo, decode_zinfo
from snapshotter.soci.ztoc import FileMetadata, Ztoc

ReadCompressed = Callable[[int, int], bytes]


def clean_path(name: str) -> str:
    """The absolute, normalised form of a tar name (`clean("/" + name)`)."""
    cleaned = posixpath.normpath("/" + name)
    # normpath keeps a leading "//" (POSIX allows it to be special); a tar name never means that.
    return "/" + cleaned.lstrip("/")


class ZtocReader:
    """Reads files and byte ranges of one layer through its zTOC."""

    def __init__(self, ztoc: Ztoc, read_compressed: ReadCompressed) -> None:
        self.ztoc = ztoc
        self.zinfo: Zinfo = decode_zinfo(
            ztoc.compression_algorithm,
            ztoc.checkpoints,
            compressed_size=ztoc.compressed_archive_size,
            uncompressed_size=ztoc.uncompressed_archive_size,
        )
        if self.zinfo.num_spans != ztoc.max_span_id + 1:
            raise FormatError(
                f"zTOC has {ztoc.max_span_id + 1} spans but its checkpoints describe "
                f"{self.zinfo.num_spans}"
            )
        self._read = read_compressed
        self._by_path: dict[str, FileMetadata] | None = None
        self.compressed_bytes_read = 0

    def find(self, path: str) -> FileMetadata:
        """The entry at `path` (any spelling: `a/b`, `./a/b`, `/a/b`); KeyError if absent."""
        if self._by_path is None:
            self._by_path = {clean_path(f.name): f for f in self.ztoc.files}
        return self._by_path[clean_path(path)]

    def read_spans(self, first: int, last: int) -> bytes:
        """The uncompressed bytes of spans first..last, from verified compressed bytes."""
        start = self.zinfo.compressed_bounds(first)[0]
        end = self.zinfo.compressed_bounds(last)[1]
        data = self._read(start, end)
        if len(data) != end - start:
            raise FormatError(f"short read of compressed bytes {start}-{end}: got {len(data)}")
        self.compressed_bytes_read += len(data)
        view = memoryview(data)
        for span in range(first, last + 1):
            s, e = self.zinfo.compressed_bounds(span)
            digest = "sha256:" + hashlib.sha256(view[s - start : e - start]).hexdigest()
            if digest != self.ztoc.span_digests[span]:
                raise DigestMismatchError(
                    f"span {span} (bytes {s}-{e}) has digest {digest}, "
                    f"zTOC says {self.ztoc.span_digests[span]}"
                )
        if isinstance(self.zinfo, GzipZinfo):
            return inflate_spans(self.zinfo, first, last, data)
        # A tar layer's last span may end in the archive before the blob's record padding.
        return data[: self.zinfo.uncompressed_bounds(last)[1] - start]

    def read(self, offset: int, length: int) -> bytes:
        """Uncompressed layer bytes [offset, offset + length), clipped at the end."""
        length = max(0, min(length, self.ztoc.uncompressed_archive_size - offset))
        if length == 0:
            return b""
        spans = self.zinfo.spans_for_range(offset, length)
        data = self.read_spans(spans.start, spans.stop - 1)
        base = self.zinfo.uncompressed_bounds(spans.start)[0]
        return data[offset - base : offset - base + length]

    def read_file(self, entry: FileMetadata) -> bytes:
        """The whole content of a regular file entry (hardlinks are followed)."""
        seen = 0
        while entry.type == "hardlink":
            entry = self.find(entry.linkname)
            seen += 1
            if seen > 64:
                raise FormatError(f"hardlink chain too long at {entry.name}")
        if entry.type != "reg":
            raise FormatError(f"{entry.name} is a {entry.type}, not a regular file")
        return self.read(entry.uncompressed_offset, entry.uncompressed_size)
