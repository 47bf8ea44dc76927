"""The background fetcher: fills every registered layer's cache while the foreground is quiet.

One per daemon. `background_connections` workers each wait for quiet (no read waiting on the
network, `silence_period_msec` since the last foreground fetch or mount), claim the next run
of missing spans of the first unfinished layer (up to `background_request_bytes`), pay the
rate limiter, and fetch it as one ranged request. A read that starts waiting on the network
cancels the in-flight background requests (`background_preempt`), so a cold read never queues
behind a large background transfer. A layer whose spans are all verified gets its whole-layer
digest checked once; then, one worker at a time, its spans are inflated and kept decompressed
on disk (`keep_inflated`), so a later read of any of its files costs no inflate.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Final, Literal

import trio

from snapshotter import metrics
from snapshotter.errors import PysociError, ZtocRejectedError
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.spans import ForegroundActivity, SpanClaim, SpanManager
from snapshotter.logs import log_context

log = logging.getLogger(__name__)

_FIRST_BACKOFF: Final = 1.0
_MAX_BACKOFF: Final = 60.0
_INFLATE_BYTES: Final = 16 << 20
"""Most decompressed bytes one background inflate job produces (at least one span)."""

_Job = tuple[Literal["fill", "verify", "inflate"], SpanManager, SpanClaim | None]


class TokenBucket:
    """Average-rate limiter: callers take what they need and sleep off the debt."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.capacity = burst if burst is not None else rate
        self._tokens = self.capacity
        self._stamp: float | None = None

    async def acquire(self, amount: int) -> None:
        """Take `amount` tokens, sleeping until the bucket is out of debt."""
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= amount
        if self._tokens < 0:
            try:
                await trio.sleep(-self._tokens / self.rate)
            except BaseException:
                self._tokens += amount
                raise


class BackgroundFetcher:
    """Fills registered layers; start `run()` in a nursery, `close()` to stop."""

    def __init__(self, config: FetchConfig, activity: ForegroundActivity) -> None:
        self.config = config
        self.activity = activity
        self._managers: list[SpanManager] = []
        self._retry_at: dict[SpanManager, tuple[float, float]] = {}
        self._verifying: set[SpanManager] = set()
        self._inflating = False
        self._work = trio.lowlevel.ParkingLot()
        self._limiter = (
            TokenBucket(config.background_rate_limit) if config.background_rate_limit > 0 else None
        )
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self.bytes_fetched = 0
        self.requests = 0
        self.preempted = 0
        self.errors = 0
        self.layers_verified = 0
        self.spans_inflated = 0

    def add(self, manager: SpanManager) -> None:
        """Start filling a layer (a mount counts as foreground activity)."""
        if manager not in self._managers:
            self._managers.append(manager)
            self.activity.note_activity()
            self._work.unpark_all()

    def remove(self, manager: SpanManager) -> None:
        """Stop filling a layer (in-flight requests end when the manager closes)."""
        if manager in self._managers:
            self._managers.remove(manager)
        self._retry_at.pop(manager, None)

    @property
    def layers(self) -> list[SpanManager]:
        """The registered layers, in fill order."""
        return list(self._managers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until `close()` (or forever doing nothing if disabled)."""
        if self._done is not None:
            raise RuntimeError("BackgroundFetcher.run() called twice")
        self._done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    if not self.config.disable:
                        for _ in range(max(1, self.config.background_connections)):
                            nursery.start_soon(self._worker)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def close(self) -> None:
        """Cancel every background request and wait for the workers to end."""
        if self._scope is not None:
            self._scope.cancel()
        if self._done is not None:
            await self._done.wait()

    async def _worker(self) -> None:
        silence = self.config.silence_period_msec / 1000
        idle = max(self.config.fetch_period_msec, 10) / 1000
        while True:
            await self.activity.wait_quiet(silence)
            job = self._next_job()
            if job is None:
                with trio.move_on_after(idle):
                    await self._work.park()
                continue
            kind, manager, claim = job
            if kind == "verify":
                await self._verify(manager)
            elif claim is not None and kind == "fill":
                await self._fill(manager, claim)
            elif claim is not None:
                await self._inflate(manager, claim)

    def _next_job(self) -> _Job | None:
        now = trio.current_time()
        ready = []
        for manager in self._managers[: max(1, self.config.max_queue_size)]:
            retry = self._retry_at.get(manager)
            if retry is None or retry[0] <= now:
                ready.append(manager)
        ready = [m for m in ready if not m.rejected]  # its zTOC lies: nothing more to do
        for manager in ready:
            if manager.complete:
                if manager.layer_verified is None and manager not in self._verifying:
                    self._verifying.add(manager)
                    return "verify", manager, None
                continue
            claim = manager.claim_missing(self.config.background_request_bytes)
            if claim is not None:
                return "fill", manager, claim
        if not self._inflating:
            for manager in ready:
                claim = manager.claim_uninflated(_INFLATE_BYTES)
                if claim is not None:
                    self._inflating = True
                    return "inflate", manager, claim
        return None

    async def _fill(self, manager: SpanManager, claim: SpanClaim) -> None:
        with trio.CancelScope() as scope, log_context(layer=manager.digest):
            preemptible = (
                self.activity.preemptible(scope)
                if self.config.background_preempt
                else nullcontext()
            )
            with preemptible:
                try:
                    if self._limiter is not None and claim.network_bytes:
                        await self._limiter.acquire(claim.network_bytes)
                    before = manager.network_bytes
                    self.requests += 1
                    await manager.fill(claim)
                    self.bytes_fetched += manager.network_bytes - before
                    self._retry_at.pop(manager, None)
                except (PysociError, OSError) as exc:
                    self.errors += 1
                    delay = self._back_off(manager)
                    log.warning(
                        "background fetch of layer %s failed (%s); retrying in %.0f s",
                        manager.digest,
                        exc,
                        delay,
                    )
                finally:
                    manager.release(claim)
        if scope.cancelled_caught:
            self.preempted += 1
            metrics.BACKGROUND_PREEMPTIONS.inc()
            # The released spans are claimable again.
            self._work.unpark_all()

    async def _inflate(self, manager: SpanManager, claim: SpanClaim) -> None:
        # Network fills come first (see _next_job); this only costs CPU and disk.
        try:
            with log_context(layer=manager.digest):
                await manager.inflate(claim)
            self.spans_inflated += len(claim.spans)
        except (PysociError, OSError) as exc:
            self._failed(manager, "background inflate", exc)
        finally:
            manager.release(claim)
            self._inflating = False

    def _failed(self, manager: SpanManager, what: str, exc: Exception) -> None:
        delay = self._back_off(manager)
        log.warning(
            "%s of layer %s failed (%s); retrying in %.0f s",
            what,
            manager.digest,
            exc,
            delay,
            extra={"layer": manager.digest},
        )

    def _back_off(self, manager: SpanManager) -> float:
        previous = self._retry_at.get(manager)
        delay = _FIRST_BACKOFF if previous is None else min(_MAX_BACKOFF, 2 * previous[1])
        self._retry_at[manager] = (trio.current_time() + delay, delay)
        return delay

    async def _verify(self, manager: SpanManager) -> None:
        try:
            with log_context(layer=manager.digest):
                if await manager.verify_layer():
                    self.layers_verified += 1
                    log.info("layer %s: fetched completely and verified", manager.digest)
        except ZtocRejectedError:
            pass  # logged, counted and recorded where it was found; never retried
        except (PysociError, OSError) as exc:
            self._failed(manager, "whole-layer check", exc)
        finally:
            self._verifying.discard(manager)
