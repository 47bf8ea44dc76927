"""The control plane's watch over its data plane: find it (or start it), and serve its layers
again whenever a new one takes its place.

With `spawn`, `pysoci serve` starts `pysoci data-plane run` when none answers (run by hand,
in a container, in tests); without it (the shipped systemd units) the data plane has a unit
of its own and the control plane waits for it, so that systemd never counts the data plane
as part of the control plane's service (a restart of pysoci.service must not kill it).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio

from snapshotter.dataplane import process
from snapshotter.dataplane.api import DataPlaneUnavailableError
from snapshotter.dataplane.client import DataPlaneClient

log = logging.getLogger(__name__)

START_WAIT: Final = 60.0
"""Seconds a data plane this process started has to answer."""
EXTERNAL_WAIT: Final = 120.0
"""Seconds to wait for a data plane someone else starts (its systemd unit), per attempt."""


class DataPlaneSupervisor:
    """Keeps a data plane serving ROOT, and calls `on_new` each time a new one serves."""

    def __init__(
        self,
        client: DataPlaneClient,
        *,
        spawn: bool,
        config_path: Path | None = None,
        log_level: str = "info",
        log_format: str = "json",
    ) -> None:
        self.client = client
        self.spawn = spawn
        self.config_path = config_path
        self.log_level = log_level
        self.log_format = log_format
        self.generation: str | None = None
        self._child: subprocess.Popen[bytes] | None = None

    async def ensure(self) -> dict[str, Any]:
        """The hello of a serving data plane: the one running, or one started now."""
        try:
            # A successor taking over needs a moment to listen; a first start does not wait.
            return await self.client.hello(wait=0.0 if self.generation is None else 10.0)
        except DataPlaneUnavailableError as e:
            if not self.spawn:
                log.warning("%s; waiting for the pysoci-data-plane service", e)
                return await self.client.hello(wait=EXTERNAL_WAIT)
        self._reap()
        argv = process.command(
            self.client.root,
            self.config_path,
            log_level=self.log_level,
            log_format=self.log_format,
        )
        self._child = process.spawn(argv)
        # Reaped as soon as it exits (after a hand-over it runs on for its last containers).
        threading.Thread(target=self._child.wait, name="data-plane-reaper", daemon=True).start()
        log.info("started the data plane (pid %d)", self._child.pid)
        with trio.move_on_after(START_WAIT):
            while True:
                if self._child.poll() is not None:
                    raise DataPlaneUnavailableError(
                        f"the data plane exited with status {self._child.returncode} before "
                        "it served (see its log lines above)"
                    )
                try:
                    return await self.client.hello(wait=0.5)
                except DataPlaneUnavailableError:
                    await trio.sleep(0.1)
        raise DataPlaneUnavailableError(
            f"the data plane (pid {self._child.pid}) did not serve within {START_WAIT:.0f} s"
        )

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            log.warning(
                "the data plane this process started (pid %d) exited with status %d",
                self._child.pid,
                self._child.returncode,
            )
            self._child = None

    async def run(
        self,
        on_new: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: find a data plane, run `on_new` when it is not the one seen last (after
        a restart of either plane), and wait until it stops serving. Started once the first
        `on_new` is done."""
        started = False
        while True:
            try:
                hello = await self.ensure()
                if hello.get("generation") != self.generation:
                    if self.generation is not None:
                        log.warning(
                            "a new data plane serves (pid %s): serving every layer again",
                            hello.get("pid"),
                        )
                    await on_new(hello)
                    self.generation = str(hello.get("generation"))
                if not started:
                    task_status.started()
                    started = True
                await self.client.watch()
                log.warning("data plane %s stopped serving", self.generation)
            except DataPlaneUnavailableError as e:
                if not started:
                    raise
                log.error("no data plane: %s; retrying", e)
                await trio.sleep(1.0)
            self._reap()
