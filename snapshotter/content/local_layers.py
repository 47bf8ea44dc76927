"""Layers unpacked on local disk: the path for layers that have no zTOC.

Each layer is extracted once under `ROOT/layers/<hex of its digest>` (into a temporary
directory, renamed into place when complete and its diffID verified) and shared by every
image that uses it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import trio

from snapshotter.compression.detect import (
    Compression,
    compression_from_media_type,
    detect_compression,
)
from snapshotter.content.unpack import apply_layer
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import oci

log = logging.getLogger(__name__)


class LocalLayers:
    """Extracted layers under one directory, keyed by layer digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, trio.Lock] = {}

    def path(self, digest: str) -> Path:
        """Where the layer lives once extracted."""
        return self.root / digest.replace(":", "-")

    async def ensure(
        self, client: RegistryClient, ref: Reference, layer: oci.Descriptor, diff_id: str | None
    ) -> Path:
        """The extracted layer, downloading and applying it first if needed."""
        target = self.path(layer.digest)
        lock = self._locks.setdefault(layer.digest, trio.Lock())
        async with lock:
            if target.is_dir():
                return target
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".download-") as tmp:
                blob = Path(tmp) / "blob"
                with open(blob, "wb") as f:
                    async for chunk in client.fetch_blob(ref, layer.digest):
                        f.write(chunk)
                compression = compression_from_media_type(layer.media_type)
                if compression is None:
                    with open(blob, "rb") as f:
                        compression = detect_compression(f.read(8))
                work = Path(tmp) / "tree"
                await trio.to_thread.run_sync(_apply_file, blob, compression, work, diff_id)
                os.rename(work, target)
            log.info("layer %s unpacked locally at %s", layer.digest, target)
            return target

    def remove(self, digest: str) -> None:
        """Delete an extracted layer."""
        self.remove_dir(self.path(digest))

    def remove_dir(self, path: Path) -> None:
        """Delete an extracted layer by its directory (one directly under the root)."""
        if path.parent != self.root:
            raise ValueError(f"{path} is not a layer directory of {self.root}")
        self._locks.pop(path.name.replace("-", ":", 1), None)
        shutil.rmtree(path, ignore_errors=True)


def _apply_file(blob: Path, compression: Compression, target: Path, diff_id: str | None) -> None:
    def chunks() -> Iterator[bytes]:
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    apply_layer(chunks(), compression, target, expected_diff_id=diff_id)
