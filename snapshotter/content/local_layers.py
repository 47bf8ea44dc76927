"""Layers unpacked on local disk: the path for layers that have no zTOC.

Each layer is extracted once under `ROOT/layers/<hex of its digest>` (into a temporary
directory, renamed into place when complete and its diffID verified) and shared by every
image that uses it. `ROOT/layers` is 0700, as containerd keeps its snapshot roots: the trees
inside keep the image's modes (setuid files, device nodes) and only root, which mounts them
as overlay lower layers, reaches them.

What a layer may take is bounded (`UnpackBounds`): a layer that would expand past its bound,
or eat into the filesystem's free-space reserve (the download included), fails with a
ResourceLimitError and leaves nothing behind.
"""

from __future__ import annotations

import errno
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
from snapshotter.content.unpack import UnpackBounds, WriteBudget, apply_layer
from snapshotter.errors import ResourceLimitError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import oci

log = logging.getLogger(__name__)

ROOT_MODE = 0o700
DOWNLOAD_PREFIX = ".download-"
"""Where a layer is downloaded and unpacked before it is renamed into place."""


class LocalLayers:
    """Extracted layers under one directory, keyed by layer digest."""

    def __init__(self, root: Path, *, bounds: UnpackBounds | None = None) -> None:
        self.root = root
        self.bounds = bounds or UnpackBounds()
        self._locks: dict[str, trio.Lock] = {}
        self._downloading: set[str] = set()
        if root.is_dir():
            os.chmod(root, ROOT_MODE)

    def _make_root(self) -> None:
        self.root.mkdir(mode=ROOT_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, ROOT_MODE)

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
            self._make_root()
            budget = self.bounds.budget(layer.size, f"layer {layer.digest}")
            budget.target = self.root
            budget.check_space("(download)", more=layer.size)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=DOWNLOAD_PREFIX) as tmp:
                self._downloading.add(tmp)
                try:
                    return await self._download(client, ref, layer, diff_id, budget, Path(tmp))
                finally:
                    self._downloading.discard(tmp)

    async def _download(
        self,
        client: RegistryClient,
        ref: Reference,
        layer: oci.Descriptor,
        diff_id: str | None,
        budget: WriteBudget,
        tmp: Path,
    ) -> Path:
        target = self.path(layer.digest)
        blob = tmp / "blob"
        try:
            with open(blob, "wb") as f:
                async for chunk in client.fetch_blob(ref, layer.digest):
                    f.write(chunk)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceLimitError(
                f"downloading layer {layer.digest}: the filesystem of {self.root} is full: {e}"
            ) from e
        compression = compression_from_media_type(layer.media_type)
        if compression is None:
            with open(blob, "rb") as f:
                compression = detect_compression(f.read(8))
        work = tmp / "tree"
        await trio.to_thread.run_sync(_apply_file, blob, compression, work, diff_id, budget)
        os.rename(work, target)
        log.info("layer %s unpacked locally at %s", layer.digest, target)
        return target

    def sweep_downloads(self) -> int:
        """Delete what downloads cut short by a crash or a stop left (none in progress now);
        how many."""
        if not self.root.is_dir():
            return 0
        gone = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(DOWNLOAD_PREFIX) and str(entry) not in self._downloading:
                log.info("cleanup: removing the unfinished download %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                gone += 1
        return gone

    def remove(self, digest: str) -> None:
        """Delete an extracted layer."""
        self.remove_dir(self.path(digest))

    def remove_dir(self, path: Path) -> None:
        """Delete an extracted layer by its directory (one directly under the root)."""
        if path.parent != self.root:
            raise ValueError(f"{path} is not a layer directory of {self.root}")
        self._locks.pop(path.name.replace("-", ":", 1), None)
        shutil.rmtree(path, ignore_errors=True)


def _apply_file(
    blob: Path, compression: Compression, target: Path, diff_id: str | None, budget: WriteBudget
) -> None:
    def chunks() -> Iterator[bytes]:
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    apply_layer(chunks(), compression, target, expected_diff_id=diff_id, budget=budget)
