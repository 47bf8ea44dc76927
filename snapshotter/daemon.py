"""`pysoci serve`: the snapshotter daemon's wiring.

The trio loop runs in the main thread and owns the data plane (the one FUSE session, span
caches, background fetcher, registry client). gRPC handlers run in grpcio's thread pool and
reach the loop only through the TrioBridge. Readiness and shutdown are reported to systemd.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio

from snapshotter.config import Config
from snapshotter.content.discovery import Modes
from snapshotter.content.local_layers import LocalLayers
from snapshotter.layers import LazyLayers
from snapshotter.registry.auth import RegistryAuth
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import CredentialStore
from snapshotter.registry.hosts import RegistryHosts
from snapshotter.sdnotify import notify
from snapshotter.service.remote import SociRemote, TrioBridge
from snapshotter.service.server import serve
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.store import Store

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/pysoci/pysoci.sock"


def registry_client(config: Config) -> RegistryClient:
    """The daemon's registry client: hosts.toml, mirrors and Docker credentials of the node."""
    docker_dir = Path(config.registry.docker_config) if config.registry.docker_config else None
    credentials = CredentialStore(docker_dir)
    return RegistryClient(
        config,
        hosts=RegistryHosts(config),
        auth=RegistryAuth(credentials.get),
        force_single_range=config.blob.force_single_range_mode,
    )


async def serve_daemon(config: Config, root: Path, address: str, *, max_workers: int = 16) -> None:
    """Serve until SIGTERM/SIGINT, then stop gRPC, unmount and flush."""
    root.mkdir(parents=True, exist_ok=True)
    lazy = LazyLayers(config, root / "fuse", root / "cache")
    store = Store(root)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with registry_client(config) as client, trio.open_nursery() as nursery:
            await nursery.start(lazy.run)
            bridge = TrioBridge(trio.lowlevel.current_trio_token())
            remote = SociRemote(
                client,
                lazy,
                LocalLayers(root / "layers"),
                bridge,
                modes=Modes(
                    v1=config.pull_modes.soci_v1.enable, v2=config.pull_modes.soci_v2.enable
                ),
            )
            snapshotter = Snapshotter(root, store, remote=remote)
            server = serve(snapshotter, address, max_workers=max_workers)
            log.info("pysoci serving on %s (root %s)", address, root)
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
