"""`pysoci serve`: the control plane — containerd's Snapshots API over gRPC.

It owns the metastore (`ROOT/metadata.db`), the snapshot directories and the layers it
unpacks itself (`ROOT/layers`), and resolves images and their SOCI indexes. The layers it
serves lazily live in the data plane (`pysoci data-plane run`, a process of its own that
outlives this one): they reach it only as `LayerSpec`s over the data plane's local API.

gRPC handlers run in grpcio's thread pool and reach the trio loop in the main thread only
through the TrioBridge. Start: take the root lock, find the data plane (or start it, with
`spawn`), move an older pysoci's records into the metastore, make every snapshot's layer
available again — layers the data plane still serves are kept as they are — then serve gRPC
and report READY. Whenever a new data plane takes over (a crash, an upgrade), every layer is
served again there. Stop (SIGTERM, SIGINT): STOPPING, gRPC stops with a grace period, the
store closes; the data plane and the containers reading through it carry on.
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
from snapshotter.dataplane.client import DataPlaneClient
from snapshotter.dataplane.supervisor import DataPlaneSupervisor
from snapshotter.legacy import migrate_lazy_records
from snapshotter.lifecycle import lock_root
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
    return Modes(
        v1=config.pull_modes.soci_v1.enable,
        v2=config.pull_modes.soci_v2.enable,
        local=config.pull_modes.local_store.enable,
    )


async def serve_daemon(
    config: Config,
    root: Path,
    address: str,
    *,
    max_workers: int = 16,
    spawn: bool = True,
    config_path: Path | None = None,
    log_level: str = "info",
    log_format: str = "json",
) -> None:
    """Serve until SIGTERM/SIGINT, then stop gRPC and flush the store."""
    started = time.monotonic()
    root = root.absolute()
    lock_fd = lock_root(root)
    try:
        supervisor = DataPlaneSupervisor(
            DataPlaneClient(root),
            spawn=spawn,
            config_path=config_path,
            log_level=log_level,
            log_format=log_format,
        )
        await _serve(config, root, address, max_workers, started, supervisor)
    finally:
        os.close(lock_fd)


async def _serve(
    config: Config,
    root: Path,
    address: str,
    max_workers: int,
    started: float,
    supervisor: DataPlaneSupervisor,
) -> None:
    store = Store(root)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with registry_client(config) as client, trio.open_nursery() as nursery:
            snapshotter = Snapshotter(root, store)
            remote = RemoteLayers(
                ImageResolver(client, modes=modes(config), local_store_dir=root / "content"),
                supervisor.client,
                LocalLayers(root / "layers", bounds=unpack_bounds(config)),
                users=snapshotter.layer_users,
            )
            snapshotter.remote = SociRemote(remote, TrioBridge(trio.lowlevel.current_trio_token()))
            await trio.to_thread.run_sync(migrate_lazy_records, root, snapshotter)
            await trio.to_thread.run_sync(snapshotter.cleanup)

            async def restore(hello: dict[str, object]) -> None:
                t0 = time.monotonic()
                layers = await trio.to_thread.run_sync(snapshotter.layers)
                counts = await remote.restore(layers)
                log.info(
                    "restored %d snapshot(s) with data plane %s (pid %s): %d lazy layer(s) "
                    "still served, %d mounted again, %d not mountable now, %d local layer(s), "
                    "in %.2f s",
                    len(layers),
                    hello.get("generation"),
                    hello.get("pid"),
                    counts.kept,
                    counts.mounted,
                    counts.failed,
                    counts.local,
                    time.monotonic() - t0,
                )

            await nursery.start(supervisor.run, restore)
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
    log.info("pysoci stopped (the data plane keeps serving)")
