"""An image's root filesystem from its layers: lazy where the image has zTOCs, unpacked
locally where not, stacked with overlayfs (read-only).

`ImageLayers.prepare` resolves the image, finds its SOCI index and makes every layer
available as a directory; `mount_overlay` stacks them. A layer whose lazy mount fails is
unpacked locally instead, and the log says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import trio

from snapshotter.content.discovery import FoundIndex, Modes, fetch_ztoc, find_soci_index
from snapshotter.content.layout import OciLayout
from snapshotter.content.local_layers import LocalLayers
from snapshotter.errors import FormatError, PysociError
from snapshotter.fetch.registry_source import RegistryRangeSource
from snapshotter.layers import LazyLayers
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.soci import oci

log = logging.getLogger(__name__)


class MountError(PysociError):
    """An overlay or bind mount failed."""


@dataclass(frozen=True)
class PreparedLayer:
    """One layer, ready as a directory."""

    descriptor: oci.Descriptor
    path: Path
    lazy: bool
    reason: str = ""


@dataclass(frozen=True)
class PreparedImage:
    """An image's layers, bottom first, and how its SOCI index was found."""

    manifest: oci.Descriptor
    layers: list[PreparedLayer]
    index: FoundIndex | None


def layer_id(digest: str) -> str:
    """The name of a layer's directory in the FUSE mount."""
    return digest.split(":", 1)[-1][:24]


class ImageLayers:
    """Makes an image's layers available as directories."""

    def __init__(
        self,
        client: RegistryClient,
        lazy: LazyLayers,
        local: LocalLayers,
        *,
        modes: Modes | None = None,
        store: OciLayout | None = None,
    ) -> None:
        self.client = client
        self.lazy = lazy
        self.local = local
        self.modes = modes or Modes()
        self.store = store

    async def prepare(
        self,
        ref: Reference,
        *,
        platform: oci.Platform | None = None,
        index_digest: str | None = None,
    ) -> PreparedImage:
        """Resolve `ref` and make each of its layers available (lazily where possible)."""
        manifest_desc, manifest = await self.client.get_platform_manifest(ref, platform)
        config = await self.client.read_blob(ref, manifest.config.digest, max_size=4 << 20)
        diff_ids = oci.image_diff_ids(config, len(manifest.layers))
        found = await find_soci_index(
            self.client,
            ref,
            manifest_desc.digest,
            manifest,
            explicit_digest=index_digest,
            modes=self.modes,
            store=self.store,
        )
        if found is None:
            log.info("%s has no SOCI index: every layer is unpacked locally", ref)
        else:
            log.info("%s: SOCI index %s (%s)", ref, found.descriptor.digest, found.source)
        prepared: list[PreparedLayer | None] = [None] * len(manifest.layers)

        async def one(i: int, layer: oci.Descriptor) -> None:
            prepared[i] = await self._layer(ref, layer, diff_ids[i], found)

        async with trio.open_nursery() as nursery:
            for i, layer in enumerate(manifest.layers):
                nursery.start_soon(one, i, layer)
        return PreparedImage(manifest_desc, [p for p in prepared if p is not None], found)

    async def _layer(
        self, ref: Reference, layer: oci.Descriptor, diff_id: str, found: FoundIndex | None
    ) -> PreparedLayer:
        ztoc_desc = found.index.ztoc_for_layer(layer.digest) if found else None
        if ztoc_desc is None:
            reason = "no SOCI index" if found is None else "no zTOC for this layer"
            path = await self.local.ensure(self.client, ref, layer, diff_id)
            return PreparedLayer(layer, path, lazy=False, reason=reason)
        try:
            ztoc = await fetch_ztoc(
                self.client,
                ref,
                ztoc_desc,
                store=self.store,
                max_entries=self.lazy.config.fuse.max_ztoc_entries,
            )
            if ztoc.compressed_archive_size != layer.size:
                raise FormatError(
                    f"zTOC {ztoc_desc.digest} describes {ztoc.compressed_archive_size} bytes, "
                    f"the layer has {layer.size}"
                )
            source = RegistryRangeSource(self.client, ref, layer.digest)
            path = await self.lazy.mount(layer_id(layer.digest), layer.digest, ztoc, source)
            return PreparedLayer(layer, path, lazy=True)
        except PysociError as e:
            log.warning(
                "LAZY MOUNT FAILED for layer %s of %s: %s; falling back to a local unpack",
                layer.digest,
                ref,
                e,
            )
            path = await self.local.ensure(self.client, ref, layer, diff_id)
            return PreparedLayer(layer, path, lazy=False, reason=f"lazy mount failed: {e}")


def overlay_options(lowers_bottom_first: list[Path]) -> str:
    """`lowerdir=` with the topmost layer first, as overlayfs wants it."""
    return "lowerdir=" + ":".join(str(p) for p in reversed(lowers_bottom_first))


async def mount_overlay(lowers_bottom_first: list[Path], target: Path) -> None:
    """Mount the layers read-only at `target` (a bind mount when there is one layer)."""
    target.mkdir(parents=True, exist_ok=True)
    if len(lowers_bottom_first) == 1:
        cmd = ["mount", "--bind", "-o", "ro", str(lowers_bottom_first[0]), str(target)]
    else:
        cmd = [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            overlay_options(lowers_bottom_first),
            str(target),
        ]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise MountError(f"{' '.join(cmd[:4])} … {target} failed: {result.stderr.decode().strip()}")


async def unmount(target: Path, *, lazy: bool = False) -> bool:
    """Unmount `target`; False if it was not mounted."""
    if not os.path.ismount(target):
        return False
    cmd = ["umount", *(["-l"] if lazy else []), str(target)]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise MountError(f"umount {target} failed: {result.stderr.decode().strip()}")
    return True
