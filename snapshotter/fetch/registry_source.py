"""The span manager's source of bytes for a layer that lives in a registry."""

from __future__ import annotations

from collections.abc import Sequence

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.ranges import RangeSink
from snapshotter.registry.reference import Reference


class RegistryRangeSource:
    """Fetches compressed byte ranges of one layer blob with HTTP range requests."""

    def __init__(self, client: RegistryClient, ref: Reference, layer_digest: str) -> None:
        self._client = client
        self._ref = ref
        self._digest = layer_digest

    async def fetch(
        self, ranges: Sequence[tuple[int, int]], sink: RangeSink | None = None
    ) -> list[bytes]:
        """The bytes of each half-open range, in order (one request when the registry allows);
        with one range, `sink` sees its bytes as they arrive."""
        return await self._client.fetch_ranges(self._ref, self._digest, ranges, sink)
