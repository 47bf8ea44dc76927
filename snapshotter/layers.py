"""The data plane of lazily mounted layers: one FUSE session, the span caches, the span
managers and the background fetcher, all living in one trio nursery.

The snapshotter daemon and `pysoci mount` both serve layers through this; what they share
with the rest of the code is `mount`, `unmount`, `check` and `status`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from snapshotter.config import Config, fetch_config
from snapshotter.errors import PysociError
from snapshotter.fetch.background import BackgroundFetcher
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.spans import ForegroundActivity, RangeSource, SpanManager, SpanMemoryCache
from snapshotter.fs.session import FuseSession
from snapshotter.soci.ztoc import Ztoc

log = logging.getLogger(__name__)


class LayerMountError(PysociError):
    """A layer could not be mounted lazily."""


@dataclass
class _Mounted:
    manager: SpanManager
    path: Path


class LazyLayers:
    """Serves layers lazily under `<mountpoint>/<layer-id>` while `run` runs."""

    def __init__(self, config: Config, mountpoint: Path, cache_dir: Path) -> None:
        self.config = config
        self._fetch = fetch_config(config)
        self.mountpoint = mountpoint
        self.session = FuseSession(
            mountpoint,
            attr_timeout=config.fuse.attr_timeout,
            entry_timeout=config.fuse.entry_timeout,
            negative_timeout=config.fuse.negative_timeout,
        )
        self.cache = DiskCache(cache_dir, self._fetch.cache_max_bytes)
        self.memory = SpanMemoryCache(self._fetch.memory_cache_bytes)
        self.activity = ForegroundActivity()
        self.background = BackgroundFetcher(self._fetch, self.activity)
        self._layers: dict[str, _Mounted] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount the FUSE session and serve until cancelled; everything is torn down after."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.session.run)
                await nursery.start(self.background.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for layer_id in list(self._layers):
                    await self._close(layer_id)
                await self.background.close()

    async def mount(
        self, layer_id: str, layer_digest: str, ztoc: Ztoc, source: RangeSource
    ) -> Path:
        """Serve a layer lazily; returns its directory (an overlay lower dir)."""
        if self._nursery is None:
            raise LayerMountError("the lazy layer service is not running")
        if layer_id in self._layers:
            return self._layers[layer_id].path
        layer_cache = self.cache.open_layer(layer_digest, ztoc.compressed_archive_size)
        try:
            manager = SpanManager(
                layer_digest,
                ztoc,
                source,
                layer_cache,
                memory=self.memory,
                config=self._fetch,
                activity=self.activity,
            )
        except BaseException:
            layer_cache.close()
            raise
        await self._nursery.start(manager.run)
        try:
            path = self.session.mount_layer(layer_id, ztoc, manager)
        except BaseException:
            await manager.close()
            raise
        self.background.add(manager)
        self._layers[layer_id] = _Mounted(manager, path)
        log.info("layer %s (%s) mounted lazily at %s", layer_digest, layer_id, path)
        return path

    async def unmount(self, layer_id: str) -> None:
        """Stop serving a layer (its cached spans stay on disk)."""
        await self._close(layer_id)

    async def _close(self, layer_id: str) -> None:
        mounted = self._layers.pop(layer_id, None)
        if mounted is None:
            return
        self.background.remove(mounted.manager)
        try:
            await self.session.unmount_layer(layer_id)
        finally:
            await mounted.manager.close()

    def check(self, layer_id: str) -> None:
        """Raise if the layer is not mounted or not usable."""
        self.session.check(layer_id)

    def status(self, layer_id: str) -> dict[str, object]:
        """The layer's fetch status (soci's fields)."""
        return self.session.status(layer_id)

    def layer_ids(self) -> list[str]:
        """Layers being served."""
        return list(self._layers)
