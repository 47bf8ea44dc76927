"""The prefetcher: fetches the spans a start is known to read, at once and in parallel.

Where a layer's spans come from (a SOCI prefetch artifact, a start recorded on this node) is
the data plane's business; this only fetches what each span manager has queued
(`SpanManager.prefetch`), over `prefetch_connections` requests for the whole data plane,
each a run of consecutive spans of at most `prefetch_request_bytes`, in the queue's order.
Unlike the background fetcher it does not wait for quiet: it starts at the mount, so the
spans arrive before the container asks. A container's own read still goes first: while a
read waits on the network no new prefetch request starts (the few in flight are small).
"""

from __future__ import annotations

import logging

import trio

from snapshotter import metrics
from snapshotter.errors import PysociError
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.spans import ForegroundActivity, SpanClaim, SpanManager
from snapshotter.logs import log_context

log = logging.getLogger(__name__)


class Prefetcher:
    """Fills the prefetch queues of its span managers; run `run()` in a nursery."""

    def __init__(self, config: FetchConfig, activity: ForegroundActivity) -> None:
        self.config = config
        self.activity = activity
        self._managers: list[SpanManager] = []
        self._next = 0
        self._work = trio.lowlevel.ParkingLot()
        self.requests = 0
        self.errors = 0

    def add(self, manager: SpanManager) -> None:
        """Serve this manager's prefetch queue (call after `manager.prefetch(...)`)."""
        if manager not in self._managers:
            self._managers.append(manager)
        self._work.unpark_all()

    def remove(self, manager: SpanManager) -> None:
        """Stop serving a manager (it is being unmounted)."""
        if manager in self._managers:
            self._managers.remove(manager)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, self.config.prefetch_connections)):
                nursery.start_soon(self._worker)
            task_status.started()

    def _claim(self) -> tuple[SpanManager, SpanClaim] | None:
        """The next run to fetch, taking the managers in turn (layers prefetch together)."""
        while self._managers:
            count = len(self._managers)
            done: list[SpanManager] = []
            for i in range(count):
                manager = self._managers[(self._next + i) % count]
                claim = manager.claim_prefetch(max(1, self.config.prefetch_request_bytes))
                if claim is not None:
                    self._next = (self._next + i + 1) % count
                    return manager, claim
                if not manager.prefetch_pending:
                    done.append(manager)
            if not done:
                return None  # queued spans are all being loaded by someone
            for manager in done:
                self._managers.remove(manager)
        return None

    async def _worker(self) -> None:
        while True:
            await self.activity.wait_no_readers()
            job = self._claim()
            if job is None:
                await self._work.park()
                continue
            manager, claim = job
            try:
                with log_context(layer=manager.digest):
                    self.requests += 1
                    await manager.fill(claim, kind=metrics.PREFETCH)
            except (PysociError, OSError) as exc:
                self.errors += 1
                log.warning("prefetch of layer %s failed (%s)", manager.digest, exc)
            finally:
                manager.release(claim)
