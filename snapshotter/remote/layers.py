"""`RemoteLayers`: the one owner of registry-served layers, for `pysoci serve` and `pysoci mount`.

One pipeline: image → SOCI index → zTOC → lazy mount in the data plane, or a local unpack
(diff ID verified) when the layer has no zTOC or its lazy mount fails. It also checks layers
before containerd mounts them, releases them when their last snapshot goes, mounts them again
after a restart (from the snapshots' labels: the metastore is the one record) and sweeps what
no snapshot references.

Whether anything still uses a layer is the metastore's answer (`users`), asked under the
layer's lock, and a Prepare commits its snapshot while holding that lock: a release racing a
Prepare of the same layer cannot unmount it under the new snapshot.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from snapshotter import metrics
from snapshotter.content.local_layers import LocalLayers
from snapshotter.dataplane.api import DataPlane, LayerNotMountedError
from snapshotter.errors import FormatError, PysociError, ZtocRejectedError
from snapshotter.logs import log_context
from snapshotter.registry.reference import Reference
from snapshotter.remote.rejected import REJECTED_FILE, RejectedZtocs
from snapshotter.remote.resolve import (
    ImageResolver,
    LayerNotInImageError,
    LayerPlan,
    LayerRequest,
    ResolvedImage,
    plan_layer,
)
from snapshotter.remote.spec import LayerSpec
from snapshotter.service import UnavailableError
from snapshotter.service.snapshots import LayerRecord, RemoteLayer
from snapshotter.soci import oci

log = logging.getLogger(__name__)

RESTORE_CONCURRENCY: Final = 8
WARM_TTL: Final = 600.0
MAX_WARMED: Final = 256
"""Layers mounted at once after a restart (each may fetch its zTOC)."""

Commit = Callable[[RemoteLayer], None]
"""Records the layer's snapshot in the metastore (blocking: run in a worker thread)."""
Users = Callable[[str], int]
"""How many snapshots use a layer directory (blocking: run in a worker thread)."""


@dataclass(frozen=True)
class PreparedImage:
    """An image's layers, bottom first, as directories (`pysoci mount`)."""

    image: ResolvedImage
    layers: list[RemoteLayer]


@dataclass
class RestoreCounts:
    """What a restore found."""

    kept: int = 0
    """Lazy layers the data plane was still serving."""
    mounted: int = 0
    failed: int = 0
    local: int = 0
    missing: int = 0


class RemoteLayers:
    """Makes registry layers available as directories, lazily where their index allows."""

    def __init__(
        self,
        resolver: ImageResolver,
        plane: DataPlane,
        local: LocalLayers,
        *,
        users: Users | None = None,
        rejected: RejectedZtocs | None = None,
    ) -> None:
        self.resolver = resolver
        self.plane = plane
        self.local = local
        # The data plane records them beside ROOT/layers (see LazyLayers).
        self.rejected = rejected or RejectedZtocs(local.root.parent / REJECTED_FILE)
        self._users = users
        self._locks: dict[str, trio.Lock] = {}
        self._warmed: dict[str, float] = {}
        """Images whose zTOCs the data plane was asked to fetch ahead, and when."""

    # -- locks -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, layer_dir: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(layer_dir, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(layer_dir, None)

    async def _in_use(self, layer_dir: str) -> bool:
        if self._users is None:
            return False
        return await trio.to_thread.run_sync(self._users, layer_dir) > 0

    # -- prepare -----------------------------------------------------------------------------

    async def prepare(self, request: LayerRequest, key: str, commit: Commit) -> RemoteLayer | None:
        """The layer a Prepare names, committed with `commit`; None to let containerd unpack
        it (an image without an index, a layer the image does not have)."""
        with log_context(image=str(request.ref), layer=request.layer_digest, snapshot=key):
            try:
                image = await self.resolver.for_request(request)
                position = image.position(request.layer_digest)
            except LayerNotInImageError as e:
                log.warning("snapshot %s: %s; not lazy, containerd unpacks it", key, e)
                return None
            if image.index is None:
                log.info(
                    "snapshot %s: image %s (%s) has no SOCI index; containerd unpacks layer %s",
                    key,
                    request.ref,
                    image.manifest_digest,
                    request.layer_digest,
                )
                return None
            await self._warm(image, position)
            return await self._serve(image, plan_layer(image, position), key, commit)

    async def _warm(self, image: ResolvedImage, position: int) -> None:
        """At an image's first Prepare, have the data plane fetch the zTOCs of its other lazy
        layers at once: containerd prepares the layers one after another."""
        now = trio.current_time()
        self._warmed = {d: t for d, t in self._warmed.items() if now - t < WARM_TTL}
        if image.manifest_digest in self._warmed or len(self._warmed) >= MAX_WARMED:
            return
        self._warmed[image.manifest_digest] = now
        specs = []
        for i in range(len(image.manifest.layers)):
            spec = plan_layer(image, i).spec
            if i != position and spec is not None:
                specs.append(spec)
        if specs:
            try:
                await self.plane.warm(specs)
            except PysociError as e:  # an optimisation: the mounts fetch what it did not
                log.info("could not warm the zTOCs of %s: %s", image.ref, e)

    async def prepare_image(
        self,
        ref: Reference,
        *,
        platform: oci.Platform | None = None,
        index_digest: str | None = None,
    ) -> PreparedImage:
        """Every layer of `ref` (`pysoci mount`): lazy where possible, unpacked otherwise."""
        image = await self.resolver.for_platform(ref, platform, index_digest=index_digest)
        if image.index is None:
            log.info("%s has no SOCI index: every layer is unpacked locally", ref)
        out: list[RemoteLayer | None] = [None] * len(image.manifest.layers)

        async def one(i: int) -> None:
            out[i] = await self._serve(image, plan_layer(image, i), f"layer {i}", None)

        async with trio.open_nursery() as nursery:
            for i in range(len(out)):
                nursery.start_soon(one, i)
        return PreparedImage(image, [layer for layer in out if layer is not None])

    async def _serve(
        self, image: ResolvedImage, plan: LayerPlan, key: str, commit: Commit | None
    ) -> RemoteLayer:
        spec = plan.spec
        if spec is None:
            reason = f"unpacked by pysoci: {plan.local_reason}"
            if commit is not None:
                log.info(
                    "snapshot %s: layer %s has no zTOC; unpacked locally", key, plan.layer.digest
                )
                metrics.LAZY_MOUNT_FALLBACKS.labels(reason="no_ztoc").inc()
            return await self._local(image.ref, plan, reason, commit)
        why = await trio.to_thread.run_sync(
            self.rejected.reason, spec.layer_digest, spec.ztoc_digest
        )
        if why is not None:
            return await self._rejected(image.ref, plan, key, commit, why)
        layer_dir = str(self.plane.mountpoint / spec.layer_id)
        async with self._locked(layer_dir):
            try:
                path = await self.plane.mount(spec)
            except PysociError as e:
                error = e
                if isinstance(e, ZtocRejectedError):
                    why = str(e)
            else:
                result = RemoteLayer(str(path), remote=True, labels=spec.to_labels())
                log.info("snapshot %s: layer %s served lazily at %s", key, plan.layer.digest, path)
                await self._commit(result, commit, spec)
                return result
        if why is not None:
            return await self._rejected(image.ref, plan, key, commit, why)
        log.error(
            "snapshot %s: LAZY MOUNT FAILED for layer %s of %s (%s); unpacking it locally",
            key,
            plan.layer.digest,
            image.ref,
            error,
        )
        metrics.LAZY_MOUNT_FALLBACKS.labels(reason="mount_failed").inc()
        reason = f"unpacked by pysoci: the lazy mount failed ({error})"[:1000]
        return await self._local(image.ref, plan, reason, commit)

    async def _rejected(
        self, ref: Reference, plan: LayerPlan, key: str, commit: Commit | None, why: str
    ) -> RemoteLayer:
        """A layer whose zTOC was proven to lie is unpacked locally (its diff ID checked)."""
        assert plan.spec is not None
        log.error(
            "snapshot %s: layer %s of %s is NOT served lazily: its zTOC %s (SOCI index %s) was "
            "rejected (%s); unpacking it locally",
            key,
            plan.layer.digest,
            ref,
            plan.spec.ztoc_digest,
            plan.spec.index_digest or "(unknown)",
            why,
        )
        metrics.LAZY_MOUNT_FALLBACKS.labels(reason="ztoc_rejected").inc()
        reason = f"unpacked by pysoci: its zTOC was rejected ({why})"[:1000]
        return await self._local(ref, plan, reason, commit)

    async def _local(
        self, ref: Reference, plan: LayerPlan, reason: str, commit: Commit | None
    ) -> RemoteLayer:
        layer_dir = str(self.local.path(plan.layer.digest))
        async with self._locked(layer_dir):
            path = await self.local.ensure(self.resolver.client, ref, plan.layer, plan.diff_id)
            result = RemoteLayer(str(path), remote=False, local_reason=reason)
            await self._commit(result, commit, None)
            return result

    async def _commit(
        self, result: RemoteLayer, commit: Commit | None, spec: LayerSpec | None
    ) -> None:
        """Run `commit` under the layer's lock; undo the layer when it fails and nothing
        else uses it."""
        if commit is None:
            return
        try:
            await trio.to_thread.run_sync(commit, result)
        except BaseException:
            with trio.CancelScope(shield=True):
                if not await self._in_use(result.layer_dir):
                    await self._drop(result.layer_dir, spec is not None)
            raise

    # -- check, release ----------------------------------------------------------------------

    async def check(self, records: Sequence[LayerRecord]) -> None:
        """UnavailableError unless every lazy layer among `records` can serve reads now; a
        layer the data plane lost (it restarted) is mounted again from its snapshot's labels."""
        for rec in records:
            if not rec.remote:
                continue
            layer_id = Path(rec.layer_dir).name
            try:
                try:
                    await self.plane.check(layer_id)
                except LayerNotMountedError:
                    async with self._locked(rec.layer_dir):
                        await self.plane.mount(self.spec_of(rec))
                    await self.plane.check(layer_id)
            except PysociError as e:
                raise UnavailableError(f"layer {layer_id} is not available: {e}") from e

    async def release(self, record: LayerRecord) -> None:
        """A snapshot using the layer was removed: when no other does, unmount it and delete
        its cached spans (lazy), or its tree (local)."""
        async with self._locked(record.layer_dir):
            if await self._in_use(record.layer_dir):
                return
            await self._drop(record.layer_dir, record.remote)

    async def _drop(self, layer_dir: str, remote: bool) -> None:
        path = Path(layer_dir)
        if remote:
            await self.plane.unmount(path.name, forget=True)
            log.info("released lazy layer %s: no snapshot uses it", path.name)
        elif path.parent == self.local.root:
            self.local.remove_dir(path)
            log.info("removed the local layer %s: no snapshot uses it", layer_dir)

    def spec_of(self, record: LayerRecord) -> LayerSpec:
        """The spec a remote snapshot's labels record."""
        return LayerSpec.from_labels(Path(record.layer_dir).name, record.labels)

    # -- restart -----------------------------------------------------------------------------

    async def restore(self, records: Sequence[LayerRecord]) -> RestoreCounts:
        """After a restart (of either plane): make every snapshot's layer available again at
        the directory containerd knows — the data plane may still serve it — and delete what
        no snapshot references. Needs no registry when the zTOCs are on this node; what
        cannot be mounted now is retried by `check`."""
        counts = RestoreCounts()
        by_dir: dict[str, list[LayerRecord]] = defaultdict(list)
        for rec in records:
            by_dir[rec.layer_dir].append(rec)
        served = {layer.layer_id: layer for layer in await self.plane.layers()}
        keep: dict[str, LayerSpec] = {}
        to_mount: list[LayerSpec] = []
        for layer_dir, recs in by_dir.items():
            rec = recs[0]
            if not rec.remote:
                if Path(layer_dir).is_dir():
                    counts.local += 1
                else:
                    counts.missing += 1
                    log.error("restore: local layer directory %s is missing", layer_dir)
                continue
            try:
                spec = self.spec_of(rec)
            except FormatError as e:
                counts.failed += 1
                log.error("restore: snapshot %s cannot be served again: %s", rec.name, e)
                continue
            keep[spec.layer_id] = spec
            got = served.get(spec.layer_id)
            if got is not None and got.ztoc_digest == spec.ztoc_digest:
                counts.kept += 1
            else:
                to_mount.append(spec)
        limit = trio.Semaphore(RESTORE_CONCURRENCY)

        async def mount(spec: LayerSpec) -> None:
            async with limit, self._locked(str(self.plane.mountpoint / spec.layer_id)):
                try:
                    await self.plane.mount(spec)
                    counts.mounted += 1
                except PysociError as e:
                    counts.failed += 1
                    log.error(
                        "restore: lazy layer %s (%s) cannot be mounted now (%s); snapshots on "
                        "it report unavailable until it can",
                        spec.layer_id,
                        spec.layer_digest,
                        e,
                    )

        async with trio.open_nursery() as nursery:
            for spec in to_mount:
                nursery.start_soon(mount, spec)
        swept = await self.plane.sweep(keep.values())
        if swept.unmounted or swept.caches or swept.ztocs:
            log.info(
                "cleanup: unmounted %d lazy layer(s), removed %d span cache(s) and %d zTOC(s) "
                "no snapshot uses",
                swept.unmounted,
                swept.caches,
                swept.ztocs,
            )
        self._sweep_local(set(by_dir))
        return counts

    def _sweep_local(self, referenced: set[str]) -> None:
        if not self.local.root.is_dir():
            return
        self.local.sweep_downloads()
        for entry in self.local.root.iterdir():
            if str(entry) not in referenced and not entry.name.startswith("."):
                log.info("cleanup: removing unused local layer %s", entry)
                self.local.remove_dir(entry)
