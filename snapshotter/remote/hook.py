"""The snapshotter's RemoteHook: containerd's remote-snapshot protocol on top of RemoteLayers.

containerd's unpacker calls Prepare with `containerd.io/snapshot.ref` and the layer's labels
(CRI/nerdctl: `cri.*`, `remote/soci.*`; ctr-remote: `remote/stargz.*`, no manifest digest);
when the hook provides the layer, the snapshotter commits it and answers AlreadyExists, and
containerd never downloads the blob. Called from gRPC threads: the work runs on the trio loop
through the bridge.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from snapshotter import labels
from snapshotter.bridge import TrioBridge
from snapshotter.errors import FormatError, InvalidReferenceError
from snapshotter.remote.layers import Commit, RemoteLayers
from snapshotter.remote.resolve import parse_labels
from snapshotter.service.snapshots import LayerRecord, RemoteLayer

log = logging.getLogger(__name__)


class SociRemote:
    """Serves indexed layers lazily, unpacks the others (implements `RemoteHook`)."""

    def __init__(self, layers: RemoteLayers, bridge: TrioBridge) -> None:
        self.layers = layers
        self.bridge = bridge

    def prepare_remote(
        self,
        key: str,
        parent: str | None,
        values: Mapping[str, str],
        parent_layers: Sequence[LayerRecord],
        commit: Commit,
    ) -> RemoteLayer | None:
        """Make the layer a Prepare names available and commit it, or None to let containerd
        unpack it."""
        try:
            request = parse_labels(values)
        except (FormatError, InvalidReferenceError) as e:
            log.warning("snapshot %s: unusable remote-snapshot labels (%s); not lazy", key, e)
            return None
        if request is None:
            if labels.TARGET in values:
                log.info(
                    "snapshot %s: no image reference or layer digest among the labels; not lazy",
                    key,
                )
            return None
        return self.bridge.run(self.layers.prepare, request, key, commit)

    def check(self, records: Sequence[LayerRecord]) -> None:
        """UnavailableError if a lazily served layer among `records` is not usable."""
        self.bridge.run(self.layers.check, records)

    def release(self, record: LayerRecord) -> None:
        """A snapshot on `record`'s layer was removed."""
        self.bridge.run(self.layers.release, record)
