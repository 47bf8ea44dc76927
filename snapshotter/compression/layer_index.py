"""What one streaming pass over a layer blob yields for its zTOC, besides the TOC."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from snapshotter.soci.ztoc import CompressionAlgorithm


@dataclass
class LayerIndexResult:
    """Checkpoints, span digests and sizes of one layer."""

    algorithm: CompressionAlgorithm
    zinfo_blob: bytes
    span_digests: list[str]
    compressed_size: int
    uncompressed_size: int
    span_size: int

    @property
    def max_span_id(self) -> int:
        """The zTOC's `max_span_id`."""
        return len(self.span_digests) - 1


class LayerIndexer(Protocol):
    """A streaming layer indexer: feed() every chunk (exhausting its iterator), then finish()."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Consume one chunk; yields the uncompressed data it produced."""
        ...

    def finish(self) -> LayerIndexResult:
        """Validate the end of the layer and return its index."""
        ...
