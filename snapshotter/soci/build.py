"""Build a zTOC from a layer blob in one streaming pass.

The compressed bytes are fed once: the indexer inflates them (recording checkpoints and span
digests as it goes) and hands the uncompressed stream straight to the tar parser. soci reads a
layer three times for the same result.
"""

from __future__ import annotations

from collections.abc import Iterable

from snapshotter import BUILD_TOOL_IDENTIFIER
from snapshotter.compression.detect import Compression
from snapshotter.compression.indexer import make_indexer
from snapshotter.compression.layer_index import LayerIndexResult
from snapshotter.soci.toc import TocBuilder
from snapshotter.soci.zinfo import decode_zinfo
from snapshotter.soci.ztoc import ZTOC_VERSION, Ztoc

DEFAULT_SPAN_SIZE = 4 << 20
DEFAULT_MIN_LAYER_SIZE = 10 << 20


class ZtocBuilder:
    """Push builder: `feed` the layer blob's bytes in order, then `finish` for the zTOC."""

    def __init__(
        self,
        compression: Compression,
        span_size: int = DEFAULT_SPAN_SIZE,
        *,
        build_tool_identifier: str = BUILD_TOOL_IDENTIFIER,
    ) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, not {span_size}")
        self._indexer = make_indexer(compression, span_size)
        self._toc = TocBuilder()
        self._build_tool = build_tool_identifier
        self.compressed_bytes = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Consume the next piece of the layer blob."""
        self.compressed_bytes += len(data)
        for chunk in self._indexer.feed(data):
            self._toc.feed(chunk)

    def finish(self) -> Ztoc:
        """Return the zTOC; raises CompressionError or TarFormatError for a bad layer."""
        result = self._indexer.finish()
        files = self._toc.finish()
        return Ztoc(
            version=ZTOC_VERSION,
            build_tool_identifier=self._build_tool,
            compressed_archive_size=result.compressed_size,
            uncompressed_archive_size=_archive_size(result, self._toc.archive_end),
            files=files,
            compression_algorithm=result.algorithm,
            max_span_id=len(result.span_digests) - 1,
            span_digests=result.span_digests,
            checkpoints=result.zinfo_blob,
        )


def _archive_size(result: LayerIndexResult, archive_end: int) -> int:
    """The zTOC's uncompressed archive size, as soci writes it: where the tar archive ends
    (end-of-archive blocks included, the record padding after them not), which soci's span
    manager takes as the end of the last span (fs/span-manager/span_manager.go,
    `EndUncompressedOffset(maxSpan, UncompressedArchiveSize)`; written by
    ztoc/toc_builder.go from Go's archive/tar position at io.EOF). A last checkpoint at or
    past that end (a deflate block ending in the padding) would leave the last span empty
    or negative: the whole stream's size is written then."""
    if result.max_span_id < 0:
        return result.uncompressed_size
    zinfo = decode_zinfo(
        result.algorithm,
        result.zinfo_blob,
        compressed_size=result.compressed_size,
        uncompressed_size=result.uncompressed_size,
    )
    last_start = zinfo.uncompressed_bounds(result.max_span_id)[0]
    return archive_end if last_start < archive_end else result.uncompressed_size


def build_ztoc(
    chunks: Iterable[bytes | memoryview],
    compression: Compression,
    span_size: int = DEFAULT_SPAN_SIZE,
    *,
    build_tool_identifier: str = BUILD_TOOL_IDENTIFIER,
) -> Ztoc:
    """Build the zTOC of a layer given as an iterable of byte chunks."""
    builder = ZtocBuilder(compression, span_size, build_tool_identifier=build_tool_identifier)
    for chunk in chunks:
        builder.feed(chunk)
    return builder.finish()
