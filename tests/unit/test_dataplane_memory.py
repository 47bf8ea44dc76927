"""The data plane trims its heap after reads go quiet, not while they go on."""

from __future__ import annotations

import trio
import trio.testing

from snapshotter.dataplane import memory
from snapshotter.fetch.spans import ForegroundActivity


def test_the_allocator_settings_reach_glibc() -> None:
    assert memory.return_freed_memory()  # this machine runs glibc
    assert memory.pin_mmap_threshold()


def test_trims_once_per_quiet_period_and_periodically() -> None:
    trims: list[None] = []

    async def trim() -> None:
        trims.append(None)

    async def main() -> None:
        activity = ForegroundActivity()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(memory.trim_when_quiet, activity, trim)
            await trio.sleep(memory.PERIOD_SEC / 2)
            assert len(trims) == 1  # the first check: nothing was trimmed yet
            for _ in range(20):  # reads every half second: no trim while they go on
                activity.note_activity()
                await trio.sleep(0.5)
            assert len(trims) == 1
            await trio.sleep(memory.QUIET_SEC + 1.5)
            assert len(trims) == 2  # once the burst is over
            await trio.sleep(memory.PERIOD_SEC * 2 + 0.5)
            assert len(trims) == 4  # then every PERIOD_SEC
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
