"""Lazily served layers: one FUSE session, the span caches, the span managers and the
background fetcher, all living in one trio nursery (the data plane's core).

Availability (`check_available`): a layer whose spans are all on disk is always available. A
layer with spans still missing is available while its registry answers: the last fetch of
that layer succeeded less than `PROBE_TTL` seconds ago, or a probe (one byte of the blob,
bounded by `PROBE_TIMEOUT`) succeeds now. Otherwise containerd gets Unavailable before it
mounts a container on the layer, instead of a container whose reads fail with EIO.

Cache bound: unused layers are evicted by the DiskCache; layers in use are filled by the
background fetcher only while the cache has room for every background request in flight, so
only what containers actually read can take the cache over its bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from snapshotter.config import Config, fetch_config, free_space_reserve
from snapshotter.dataplane.memory import return_freed_memory, trim_when_quiet
from snapshotter.errors import PysociError, ZtocRejectedError
from snapshotter.fetch.background import BackgroundFetcher
from snapshotter.fetch.cache import DiskCache, LayerCache
from snapshotter.fetch.prefetch import Prefetcher
from snapshotter.fetch.spans import (
    ForegroundActivity,
    RangeSink,
    RangeSource,
    SpanClaim,
    SpanManager,
    SpanMemoryCache,
)
from snapshotter.fs.session import FuseSession
from snapshotter.fs.table import LayerNotMountedError, LayerUnavailableError
from snapshotter.prefetch.recordings import Recordings
from snapshotter.remote.rejected import REJECTED_FILE, RejectedZtocs
from snapshotter.remote.spec import LayerSpec
from snapshotter.soci.ztoc import CompressionAlgorithm, Ztoc

log = logging.getLogger(__name__)

PROBE_TTL: Final = 10.0
PROBE_TIMEOUT: Final = 5.0


class LayerMountError(PysociError):
    """A layer could not be mounted lazily."""


class TrackedSource:
    """A RangeSource that remembers how its last fetch went (for `check_available`)."""

    def __init__(self, source: RangeSource) -> None:
        self.source = source
        self.last_ok = -math.inf
        self.last_failed = -math.inf
        self.last_error = ""

    async def fetch(
        self, ranges: Sequence[tuple[int, int]], sink: RangeSink | None = None
    ) -> list[bytes]:
        """Fetch through the wrapped source, noting success or failure."""
        try:
            out = await self.source.fetch(ranges, sink)
        except Exception as e:
            self.last_failed = trio.current_time()
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        self.last_ok = trio.current_time()
        return out


class _BoundedSpanManager(SpanManager):
    """A SpanManager whose background claims wait for room in the disk cache."""

    def __init__(self, *args: Any, room: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.room = room

    def claim_missing(self, max_bytes: int) -> SpanClaim | None:
        if not self.room():
            return None
        return super().claim_missing(max_bytes)

    def claim_prefetch(self, max_bytes: int) -> SpanClaim | None:
        if not self.room():
            return None
        return super().claim_prefetch(max_bytes)


@dataclass
class _Mounted:
    spec: LayerSpec
    manager: SpanManager
    path: Path
    cache: LayerCache
    source: TrackedSource
    probing: trio.Lock = field(default_factory=trio.Lock)


class LazyLayers:
    """Serves layers lazily under `<mountpoint>/<layer-id>` while `run` runs."""

    def __init__(
        self,
        config: Config,
        mountpoint: Path,
        cache_dir: Path,
        *,
        recordings_dir: Path | None = None,
        rejected: RejectedZtocs | None = None,
    ) -> None:
        self.config = config
        self.rejected = rejected or RejectedZtocs(cache_dir.parent / REJECTED_FILE)
        """zTOCs proven to lie (by this process or an earlier one): never served again."""
        self._fetch = fetch_config(config)
        self.mountpoint = mountpoint
        self.session = FuseSession(
            mountpoint,
            attr_timeout=config.fuse.attr_timeout,
            entry_timeout=config.fuse.entry_timeout,
            negative_timeout=config.fuse.negative_timeout,
            opaque_xattr=config.fuse.opaque_xattr,
        )
        self.cache = DiskCache(
            cache_dir, self._fetch.cache_max_bytes, reserve=free_space_reserve(config)
        )
        self.memory = SpanMemoryCache(self._fetch.memory_cache_bytes)
        self.activity = ForegroundActivity()
        self.background = BackgroundFetcher(self._fetch, self.activity)
        self.prefetcher = Prefetcher(self._fetch, self.activity)
        self.recordings = (
            Recordings(config.prefetch, recordings_dir) if recordings_dir is not None else None
        )
        """The starts recorded on this node (`[prefetch] record`), under ROOT/prefetch."""
        self._layers: dict[str, _Mounted] = {}
        self._nursery: trio.Nursery | None = None
        self.draining = False
        self._background_paused = False

    def _background_room(self) -> bool:
        """Whether the cache can take every background request in flight under its bound."""
        in_flight = max(1, self._fetch.background_connections) * max(
            1, self._fetch.background_request_bytes
        )
        room = self.cache.room_for(in_flight)
        if room == self._background_paused:
            self._background_paused = not room
            log.info(
                "background fetching %s: the span cache holds %d of %d bytes",
                "paused" if not room else "resumed",
                self.cache.usage(),
                self.cache.max_bytes,
            )
        return room

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount the FUSE session and serve until cancelled or until the session ends (its
        last user gone after `drain`, or unmounted from outside); everything is torn down
        after."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.session.run)
                await nursery.start(self.background.run)
                await nursery.start(self.prefetcher.run)
                if self.recordings is not None:
                    await nursery.start(self.recordings.run)
                nursery.start_soon(trim_when_quiet, self.activity)
                task_status.started()
                await self.session.ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for layer_id in list(self._layers):
                    await self._close(layer_id)
                await self.background.close()

    async def drain(self) -> None:
        """Serve only the containers already using these layers: detach the FUSE mount from
        its path (a successor mounts there), stop filling layers in the background."""
        self.draining = True
        self.session.detach()
        await self.background.close()

    async def mount(self, spec: LayerSpec, ztoc: Ztoc, source: RangeSource) -> Path:
        """Serve a layer lazily; returns its directory (an overlay lower dir)."""
        if self._nursery is None:
            raise LayerMountError("the lazy layer service is not running")
        if self.draining:
            raise LayerMountError("this data plane is draining: its successor mounts layers")
        layer_id, layer_digest = spec.layer_id, spec.layer_digest
        if layer_id in self._layers:
            return self._layers[layer_id].path
        why = await trio.to_thread.run_sync(self.rejected.reason, layer_digest, spec.ztoc_digest)
        if why is not None:
            raise ZtocRejectedError(why)
        keep = self._fetch.keep_inflated and ztoc.compression_algorithm == CompressionAlgorithm.GZIP
        layer_cache = self.cache.open_layer(
            layer_digest,
            ztoc.compressed_archive_size,
            uncompressed_size=ztoc.uncompressed_archive_size if keep else None,
            inflated_key=layer_id,
        )
        tracked = TrackedSource(source)
        try:
            manager = _BoundedSpanManager(
                layer_digest,
                ztoc,
                tracked,
                layer_cache,
                memory=self.memory,
                config=self._fetch,
                activity=self.activity,
                room=self._background_room,
                ztoc_digest=spec.ztoc_digest,
                memory_key=layer_id,
                diff_id=spec.diff_id,
                on_reject=lambda why: self._record_rejection(spec, why),
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
        self._layers[layer_id] = _Mounted(spec, manager, path, layer_cache, tracked)
        recorder = self.recordings.start(spec, manager.zinfo) if self.recordings else None
        if recorder is not None:
            self.session.table.layer(layer_id).observer = Recordings.observer(recorder)
        log.info("layer %s (%s) mounted lazily at %s", layer_digest, layer_id, path)
        return path

    async def unmount(self, layer_id: str, *, drop_cache: bool = False) -> None:
        """Stop serving a layer; its cached spans stay on disk unless `drop_cache`."""
        mounted = self._layers.get(layer_id)
        await self._close(layer_id)
        if drop_cache and mounted is not None:
            digest = mounted.manager.digest
            if self.cache.remove_layer(digest):
                log.info("removed the cached spans of layer %s", digest)
        if mounted is not None:
            return_freed_memory()

    def remove_cached(self, digest: str) -> bool:
        """Delete the cached spans of a layer that is not mounted."""
        return self.cache.remove_layer(digest)

    async def _close(self, layer_id: str) -> None:
        mounted = self._layers.pop(layer_id, None)
        if mounted is None:
            return
        self.background.remove(mounted.manager)
        self.prefetcher.remove(mounted.manager)
        if self.recordings is not None:
            await self.recordings.stop(layer_id)
        try:
            await self.session.unmount_layer(layer_id)
        finally:
            await mounted.manager.close()

    def _record_rejection(self, spec: LayerSpec, why: str) -> None:
        log.error(
            "lazy layer %s of %s: zTOC %s of SOCI index %s is rejected; recorded in %s",
            spec.layer_id,
            spec.image_ref,
            spec.ztoc_digest,
            spec.index_digest or "(unknown)",
            self.rejected.path,
        )
        try:
            self.rejected.add(spec.layer_digest, spec.ztoc_digest, why)
        except OSError as e:
            log.error(
                "cannot record the rejected zTOC %s in %s: %s",
                spec.ztoc_digest,
                self.rejected.path,
                e,
            )

    def check(self, layer_id: str) -> None:
        """Raise if the layer is not mounted or not usable (its zTOC was rejected)."""
        self.session.check(layer_id)
        mounted = self._layers.get(layer_id)
        if mounted is not None and mounted.manager.rejected:
            raise LayerUnavailableError(mounted.manager.rejected)

    def fully_cached(self, layer_id: str) -> bool:
        """Every span of the layer is on disk (verified, or logged by an earlier run)."""
        mounted = self._layers[layer_id]
        if mounted.manager.complete:
            return True
        n = mounted.manager.num_spans
        try:
            present = mounted.cache.present_spans()
        except ValueError:  # the handle closed under us: the layer is being unmounted
            return False
        return sum(1 for s in present if s < n) == n

    async def check_available(self, layer_id: str) -> None:
        """`check`, and for a layer with spans still missing, that its registry answers."""
        self.check(layer_id)
        if self.fully_cached(layer_id):
            return
        mounted = self._layers[layer_id]
        async with mounted.probing:
            src = mounted.source
            now = trio.current_time()
            ok = src.last_ok > src.last_failed
            # A success is trusted for PROBE_TTL; a failure only for a second (another check
            # just probed), so the layer is back as soon as its registry is.
            if now - max(src.last_ok, src.last_failed) < (PROBE_TTL if ok else 1.0):
                if ok:
                    return
                self._unavailable(layer_id, src.last_error)
            with trio.move_on_after(PROBE_TIMEOUT) as scope:
                with contextlib.suppress(Exception):  # TrackedSource noted the outcome
                    await src.fetch([(0, 1)])
            if scope.cancelled_caught:
                src.last_failed = trio.current_time()
                src.last_error = f"the registry did not answer within {PROBE_TIMEOUT:.0f} s"
            if src.last_failed > src.last_ok:
                self._unavailable(layer_id, src.last_error)

    def _unavailable(self, layer_id: str, error: str) -> None:
        status = self._layers[layer_id].manager.status()
        raise LayerUnavailableError(
            f"layer {status['digest']} is not fully cached ({status['spansFetched']} of "
            f"{status['spansTotal']} spans verified) and its registry cannot be reached: {error}"
        )

    def status(self, layer_id: str) -> dict[str, object]:
        """The layer's fetch status (soci's fields)."""
        return self.session.status(layer_id)

    def prefetch(self, layer_id: str, spans: Sequence[int]) -> int:
        """Fetch these spans of a served layer at once, ahead of its readers (in this order);
        how many were queued. LayerNotMountedError when it is not served."""
        mounted = self._layers.get(layer_id)
        if mounted is None:
            raise LayerNotMountedError(f"layer {layer_id!r} is not mounted")
        queued = mounted.manager.prefetch(spans)
        if queued:
            self.prefetcher.add(mounted.manager)
            log.info("layer %s: prefetching %d span(s)", mounted.spec.layer_digest, queued)
        return queued

    def num_spans(self, layer_id: str) -> int:
        """Spans of a served layer; LayerNotMountedError when it is not served."""
        mounted = self._layers.get(layer_id)
        if mounted is None:
            raise LayerNotMountedError(f"layer {layer_id!r} is not mounted")
        return mounted.manager.num_spans

    def served(self) -> list[tuple[LayerSpec, Path, str]]:
        """Layers being served: their spec, directory and state."""
        return [
            (m.spec, m.path, str(m.manager.status().get("state", "")))
            for m in self._layers.values()
        ]

    def spec(self, layer_id: str) -> LayerSpec | None:
        """The spec a served layer was mounted with."""
        mounted = self._layers.get(layer_id)
        return None if mounted is None else mounted.spec
