"""`pysoci data-plane run`: the long-lived process containers read their lazy layers through.

It owns the FUSE session at `ROOT/fuse`, the span caches (`ROOT/cache`), the zTOC store
(`ROOT/ztocs`), the background fetcher and the registry client with the node's credentials,
and serves its local API on `ROOT/data-plane.sock`. `pysoci serve` (the control plane) may
stop, crash or be upgraded at any time: this process and the containers reading through it
carry on, and the next control plane reconnects and finds the layers still served.

Stop (SIGTERM, SIGINT, or the `stop` call): every layer is unmounted and the FUSE session
with it — containers still reading lazy layers then fail (ENOTCONN); it is for node shutdown.

Upgrade (the `upgrade` call, `pysoci data-plane upgrade`): this process starts its successor
from the installed code, waits until it is ready to take over, then detaches its FUSE mount
from `ROOT/fuse` (the overlays of running containers keep it), gives up the socket and the
lock, tells systemd the successor is the main process, and serves its existing containers
until the last of them goes; the successor mounts a fresh session at `ROOT/fuse`, and the
control plane mounts every layer there for new containers. No running container's read fails.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trio

from snapshotter.config import Config
from snapshotter.dataplane.api import DataPlaneError
from snapshotter.dataplane.client import socket_path
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.dataplane.memory import pin_mmap_threshold
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.dataplane.server import DataPlaneServer
from snapshotter.lifecycle import lock_root, overlays_using, unmount_stale_fuse
from snapshotter.metrics import exposition
from snapshotter.registry.node import node_registry_client
from snapshotter.sdnotify import notify

log = logging.getLogger(__name__)

LOCK_NAME: Final = "data-plane.lock"
DRAINING_DIR: Final = "draining"
"""`ROOT/draining/<pid>.json`: data planes that handed over and serve their last users."""
TAKEOVER_WAIT: Final = 60.0


def command(
    root: Path,
    config_path: Path | None,
    *,
    log_level: str = "info",
    log_format: str = "json",
    takeover: bool = False,
    ready_fd: int | None = None,
) -> list[str]:
    """The command line of a data plane for ROOT, from the installed pysoci."""
    argv = [sys.executable, "-m", "snapshotter.cli.main", "data-plane", "run", "--root", str(root)]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += ["--log-level", log_level, "--log-format", log_format]
    if takeover:
        argv.append("--takeover")
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    return argv


def spawn(
    argv: Sequence[str], *, pass_fds: Sequence[int] = (), keep_notify: bool = False
) -> subprocess.Popen[bytes]:
    """Start a data plane in a session of its own (no signal of the spawner's terminal or
    process group reaches it); it logs to the spawner's stderr."""
    env = dict(os.environ)
    if not keep_notify:
        env.pop("NOTIFY_SOCKET", None)  # systemd's readiness is the spawner's, not its own
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
        env=env,
    )


def _report_stale(root: Path) -> None:
    """Detach a FUSE mount a killed data plane left, and say which containers it breaks."""
    fuse_root = root / "fuse"
    if unmount_stale_fuse(fuse_root) == 0:
        return
    for user in overlays_using(fuse_root):
        log.error(
            "container %s (overlay at %s) uses lazy layers %s of the previous FUSE session, "
            "which died with the previous data plane: its reads of files not already in the "
            "page cache fail with ENOTCONN until it is restarted",
            user.container,
            user.mount_point,
            ", ".join(user.layer_ids),
        )


def _wait_ready(fd: int, timeout: float) -> bool:
    """Whether a successor wrote its ready line on `fd` within `timeout`."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            chunk = os.read(fd, 64)
            if not chunk:
                return False
            buf += chunk
        return buf.startswith(b"ready")
    finally:
        os.close(fd)


class _Process:
    """The state of one data-plane process: its lock, its server, its way out."""

    def __init__(self, config: Config, root: Path, argv_base: dict[str, Any]) -> None:
        self.config = config
        self.root = root
        self.argv_base = argv_base
        self.lock_fd: int | None = None
        self.server: DataPlaneServer | None = None
        self.lazy: LazyLayers | None = None
        self.stop = trio.Event()
        self.upgrading = False

    async def upgrade(self, _args: dict[str, Any]) -> dict[str, Any]:
        assert self.lazy is not None and self.server is not None
        if self.upgrading or self.lazy.draining:
            raise DataPlaneError("this data plane is already handing over")
        self.upgrading = True
        try:
            read_fd, write_fd = os.pipe()
            argv = command(self.root, takeover=True, ready_fd=write_fd, **self.argv_base)
            try:
                successor = spawn(argv, pass_fds=[write_fd], keep_notify=True)
            finally:
                os.close(write_fd)
            threading.Thread(target=successor.wait, daemon=True).start()
            ready = await trio.to_thread.run_sync(_wait_ready, read_fd, TAKEOVER_WAIT)
            if not ready:
                successor.kill()
                raise DataPlaneError(
                    f"the new data plane (pid {successor.pid}) did not get ready within "
                    f"{TAKEOVER_WAIT:.0f} s: see its log; this one keeps serving"
                )
            served = len(self.lazy.served())
            await self.lazy.drain()
            self.server.close(socket_path(self.root))
            notify(f"MAINPID={successor.pid}")
            self._mark_draining(served)
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None
            log.info(
                "handed over to data plane %d; serving the %d layer(s) of running containers "
                "until their last user goes",
                successor.pid,
                served,
            )
            return {"successor": successor.pid, "draining": os.getpid()}
        finally:
            self.upgrading = False

    def _mark_draining(self, layers: int) -> None:
        directory = self.root / DRAINING_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        record = {"pid": os.getpid(), "since": time.time(), "layers": layers}
        (directory / f"{os.getpid()}.json").write_text(json.dumps(record))

    async def stop_call(self, _args: dict[str, Any]) -> None:
        self.stop.set()


async def run_data_plane(
    config: Config,
    root: Path,
    *,
    config_path: Path | None = None,
    log_level: str = "info",
    log_format: str = "json",
    takeover: bool = False,
    ready_fd: int | None = None,
) -> None:
    """Serve until stopped, or, after an upgrade handed over, until the last user is gone."""
    started = time.monotonic()
    pin_mmap_threshold()
    root = root.absolute()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = _Process(
        config,
        root,
        {"config_path": config_path, "log_level": log_level, "log_format": log_format},
    )
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    proc.lock_fd = await trio.to_thread.run_sync(
        lambda: lock_root(root, LOCK_NAME, wait=TAKEOVER_WAIT if takeover else 0.0)
    )
    try:
        await _serve(proc, started)
    finally:
        if proc.lock_fd is not None:
            os.close(proc.lock_fd)
        (root / DRAINING_DIR / f"{os.getpid()}.json").unlink(missing_ok=True)


async def _serve(proc: _Process, started: float) -> None:
    root, config = proc.root, proc.config
    await trio.to_thread.run_sync(_report_stale, root)
    lazy = proc.lazy = LazyLayers(
        config, root / "fuse", root / "cache", recordings_dir=root / "prefetch"
    )
    generation = f"{os.getpid()}-{time.time_ns()}"
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with node_registry_client(config) as client, trio.open_nursery() as nursery:
            await nursery.start(lazy.run)
            plane = LocalDataPlane(
                lazy, client, ztoc_dir=root / "ztocs", local_store_dir=root / "content"
            )
            plane.attach(nursery)

            async def metrics(_args: dict[str, Any]) -> str:
                return exposition()

            server = proc.server = DataPlaneServer(
                plane,
                generation=generation,
                extra={"upgrade": proc.upgrade, "stop": proc.stop_call, "metrics": metrics},
            )
            await nursery.start(server.serve, socket_path(root))
            log.info(
                "data plane %s serving %s, ready %.2f s after start",
                generation,
                lazy.mountpoint,
                time.monotonic() - started,
            )
            notify("READY=1\nSTATUS=serving")

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("received %s: stopping the data plane", signal.Signals(signum).name)
                    proc.stop.set()
                    return

            async def on_stop() -> None:
                await proc.stop.wait()
                notify("STOPPING=1")
                server.close(socket_path(root) if not lazy.draining else None)
                nursery.cancel_scope.cancel()

            async def on_session_end() -> None:
                await lazy.session.ended.wait()
                if not lazy.draining:
                    log.error("the FUSE session at %s ended: the data plane stops", lazy.mountpoint)
                    server.close(socket_path(root))
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_stop)
            nursery.start_soon(on_session_end)
    log.info("data plane %s stopped", generation)
