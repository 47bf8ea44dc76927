"""`pysoci serve`: the snapshotter daemon's wiring.

The trio loop runs in the main thread and owns the data plane (the one FUSE session, span
caches, background fetcher, registry client). gRPC handlers run in grpcio's thread pool and
reach the loop only through the TrioBridge. Readiness and shutdown are reported to systemd.

Start: take the root lock, detach a FUSE mount left by a daemon that was killed, report the
container overlays still using it (their lazy layers are gone for good, see the README),
mount the FUSE session, mount every remote snapshot's layer again, and only then serve gRPC
and report READY. Stop (SIGTERM, SIGINT): STOPPING, gRPC stops with a grace period, the store
closes, every layer and the FUSE session are unmounted.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import trio

from snapshotter.bridge import TrioBridge
from snapshotter.config import Config, unpack_bounds
from snapshotter.content.discovery import Modes
from snapshotter.content.local_layers import LocalLayers
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.legacy import migrate_lazy_records
from snapshotter.lifecycle import lock_root, overlays_using, unmount_stale_fuse
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.node import node_registry_client
from snapshotter.remote.hook import SociRemote
from snapshotter.remote.layers import RemoteLayers
from snapshotter.remote.resolve import ImageResolver
from snapshotter.sdnotify import notify
from snapshotter.service.server import serve
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.store import Store

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/pysoci/pysoci.sock"


def registry_client(config: Config) -> RegistryClient:
    """The daemon's registry client: hosts.toml, mirrors and Docker credentials of the node."""
    return node_registry_client(config)


def modes(config: Config) -> Modes:
    """Which ways of finding an index the config enables."""
    return Modes(v1=config.pull_modes.soci_v1.enable, v2=config.pull_modes.soci_v2.enable)


async def serve_daemon(config: Config, root: Path, address: str, *, max_workers: int = 16) -> None:
    """Serve until SIGTERM/SIGINT, then stop gRPC, unmount and flush."""
    started = time.monotonic()
    root = root.absolute()
    lock_fd = lock_root(root)
    try:
        await _serve(config, root, address, max_workers, started)
    finally:
        os.close(lock_fd)


def _report_stale(root: Path) -> None:
    """Detach a FUSE mount a killed daemon left, and say which containers it breaks."""
    fuse_root = root / "fuse"
    if unmount_stale_fuse(fuse_root) == 0:
        return
    for user in overlays_using(fuse_root):
        log.error(
            "container %s (overlay at %s) uses lazy layers %s of the previous FUSE session, "
            "which died with the previous daemon: its reads of files not already in the page "
            "cache fail with ENOTCONN until it is restarted",
            user.container,
            user.mount_point,
            ", ".join(user.layer_ids),
        )


async def _serve(
    config: Config, root: Path, address: str, max_workers: int, started: float
) -> None:
    _report_stale(root)
    lazy = LazyLayers(config, root / "fuse", root / "cache")
    store = Store(root)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with registry_client(config) as client, trio.open_nursery() as nursery:
            await nursery.start(lazy.run)
            plane = LocalDataPlane(
                lazy, client, ztoc_dir=root / "ztocs", local_store_dir=root / "content"
            )
            snapshotter = Snapshotter(root, store)
            remote = RemoteLayers(
                ImageResolver(client, modes=modes(config), local_store_dir=root / "content"),
                plane,
                LocalLayers(root / "layers", bounds=unpack_bounds(config)),
                users=snapshotter.layer_users,
            )
            snapshotter.remote = SociRemote(remote, TrioBridge(trio.lowlevel.current_trio_token()))
            await trio.to_thread.run_sync(migrate_lazy_records, root, snapshotter)
            layers = await trio.to_thread.run_sync(snapshotter.layers)
            counts = await remote.restore(layers)
            await trio.to_thread.run_sync(snapshotter.cleanup)
            log.info(
                "restored %d snapshot(s): %d lazy layer(s) still served, %d mounted again, "
                "%d not mountable now, %d local layer(s) in %.2f s",
                len(layers),
                counts.kept,
                counts.mounted,
                counts.failed,
                counts.local,
                time.monotonic() - started,
            )
            server = serve(snapshotter, address, max_workers=max_workers)
            log.info(
                "pysoci serving on %s (root %s), ready %.2f s after start",
                address,
                root,
                time.monotonic() - started,
            )
            notify("READY=1\nSTATUS=serving")
            try:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
            finally:
                notify("STOPPING=1")
                with trio.CancelScope(shield=True):
                    # stop() waits for running handlers, which may be waiting on this loop.
                    event = server.stop(grace=5)
                    await trio.to_thread.run_sync(event.wait)
                    snapshotter.close()
                nursery.cancel_scope.cancel()
    store.close()
    log.info("pysoci stopped")
