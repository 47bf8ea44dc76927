"""The layer indexer for each compression (gzip checkpoints, fixed spans for plain tar)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from snapshotter.compression.detect import Compression
from snapshotter.compression.gzip import GzipCheckpointer
from snapshotter.compression.layer_index import LayerIndexer, LayerIndexResult
from snapshotter.errors import CompressionError
from snapshotter.soci.zinfo import encode_tar_zinfo
from snapshotter.soci.ztoc import CompressionAlgorithm


class UncompressedIndexer:
    """Indexer for an uncompressed tar layer: fixed spans, TarZinfo version 2.

    Same shape as GzipCheckpointer: `feed()` yields the data itself (exhaust it),
    `finish()` returns the result.
    """

    def __init__(self, span_size: int) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, got {span_size}")
        self._span_size = span_size
        self._size = 0
        self._hasher = hashlib.sha256()
        self._in_span = 0
        self._digests: list[str] = []
        self._finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Consume one chunk; the iterator yields it back."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        while pos < n:
            take = min(n - pos, self._span_size - self._in_span)
            self._hasher.update(mv[pos : pos + take])
            pos += take
            self._in_span += take
            if self._in_span == self._span_size:
                self._digests.append("sha256:" + self._hasher.hexdigest())
                self._hasher = hashlib.sha256()
                self._in_span = 0
        self._size += n
        return iter((mv,)) if n else iter(())

    def finish(self) -> LayerIndexResult:
        """Return the span digests and the TarZinfo blob."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._in_span:
            self._digests.append("sha256:" + self._hasher.hexdigest())
        return LayerIndexResult(
            algorithm=CompressionAlgorithm.UNCOMPRESSED,
            zinfo_blob=encode_tar_zinfo(self._span_size, self._size),
            span_digests=self._digests,
            compressed_size=self._size,
            uncompressed_size=self._size,
            span_size=self._span_size,
        )


def make_indexer(compression: Compression, span_size: int) -> LayerIndexer:
    """The indexer for a layer of this compression; zstd layers get no zTOC."""
    if compression is Compression.GZIP:
        return GzipCheckpointer(span_size)
    if compression is Compression.UNCOMPRESSED:
        return UncompressedIndexer(span_size)
    raise CompressionError(
        f"{compression.name} layers cannot be indexed (SOCI has no zTOC for them)"
    )
