"""`Recordings`: the data plane's recorded starts, from the FUSE reads to ROOT/prefetch.

One `Recorder` per lazy layer being served (when `[prefetch] record` is on and the layer's
spec names its image manifest); `run` closes their windows and keeps what changed in the
`RecordingStore` every `FLUSH_PERIOD` seconds, so a restart of the data plane loses at most
that much of a start in progress. The store's file writes run in a worker thread, one at a
time (this is their only writer). `recorded` answers the mount of a layer with the spans this
node recorded for the same image, layer and zTOC.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Final

import trio

from snapshotter.config import PrefetchConfig
from snapshotter.fs.table import ReadObserver
from snapshotter.fs.tree import LayerTree
from snapshotter.prefetch.record import LayerRecording
from snapshotter.prefetch.recorder import Recorder, RecordLimits
from snapshotter.prefetch.store import RecordingStore
from snapshotter.remote.spec import LayerSpec
from snapshotter.soci.zinfo import Zinfo

log = logging.getLogger(__name__)

FLUSH_PERIOD: Final = 1.0


class _Recording:
    def __init__(self, spec: LayerSpec, recorder: Recorder) -> None:
        self.spec = spec
        self.recorder = recorder


class Recordings:
    """The recorders of the layers served, and the store they are kept in."""

    def __init__(self, config: PrefetchConfig, directory: Path) -> None:
        self.config = config
        self.store = RecordingStore(
            directory, max_images=config.max_images, max_bytes=config.max_bytes
        )
        self.limits = RecordLimits(
            quiet_period=float(config.quiet_period_sec),
            max_duration=float(config.max_record_sec),
            max_spans=config.max_spans_per_layer,
            max_files=config.max_files_per_layer,
        )
        self._active: dict[str, _Recording] = {}
        self._write_lock = trio.Lock()

    def start(self, spec: LayerSpec, zinfo: Zinfo) -> Recorder | None:
        """A recorder for a layer just mounted (None when not recording it)."""
        if not self.config.record or not spec.manifest_digest:
            return None
        recorder = Recorder(
            spec.layer_digest,
            spec.ztoc_digest,
            zinfo,
            self.limits,
            index_digest=spec.index_digest,
        )
        self._active[spec.layer_id] = _Recording(spec, recorder)
        return recorder

    @staticmethod
    def observer(recorder: Recorder) -> ReadObserver:
        """The function the filesystem calls before each read it serves."""

        def observe(tree: LayerTree, entry: int, start: int, length: int) -> None:
            recorder.observe(tree, entry, start, length, time.monotonic())

        return observe

    async def stop(self, layer_id: str) -> None:
        """The layer is unmounted: keep what its recorder has."""
        found = self._active.pop(layer_id, None)
        if found is None:
            return
        found.recorder.stop()
        if found.recorder.started:
            await self._save(found)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close the windows that are due and keep what changed, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(FLUSH_PERIOD)
            await self.flush()

    async def flush(self) -> None:
        """One pass of `run`: recorders closed if due, changed ones kept."""
        now = time.monotonic()
        for layer_id, found in list(self._active.items()):
            done = found.recorder.tick(now)
            if found.recorder.dirty and found.recorder.started:
                await self._save(found)
            if done:
                self._active.pop(layer_id, None)
                log.info(
                    "recorded the start of layer %s in image %s (%s): %d span(s)",
                    found.spec.layer_digest,
                    found.spec.manifest_digest,
                    found.recorder.reason,
                    len(found.recorder.spans),
                )

    async def _save(self, found: _Recording) -> None:
        layer = found.recorder.taken()
        async with self._write_lock:
            await trio.to_thread.run_sync(self._save_sync, found.spec, layer)

    def _save_sync(self, spec: LayerSpec, layer: LayerRecording) -> None:
        try:
            self.store.save(spec.manifest_digest, spec.image_ref, layer, now=time.time())
        except Exception:  # a recording must never take the data plane down
            log.exception("cannot keep the recorded start of layer %s", spec.layer_digest)

    def recorded(self, spec: LayerSpec) -> list[int]:
        """The spans this node recorded for the layer's start in this image (with this zTOC),
        in first-read order; [] when none (or `[prefetch] use_recordings` is off)."""
        if not self.config.use_recordings or not spec.manifest_digest:
            return []
        found = self.store.layer(spec.manifest_digest, spec.layer_digest, spec.ztoc_digest)
        return list(found.spans) if found is not None else []

    def recording(self, layer_id: str) -> Recorder | None:
        """The recorder of a served layer still recording, if any."""
        found = self._active.get(layer_id)
        return found.recorder if found is not None else None
