"""`LocalDataPlane`: the data plane's operations, in the process that serves the FUSE session.

It turns a `LayerSpec` into a served layer: the zTOC from the first place that has it (the
data plane's own zTOC store `ROOT/ztocs`, the local content store `ROOT/content` that
`pysoci create` fills, the registry), checked against the layer, then a span manager whose
bytes come from the registry's range requests with this process's credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Final

import trio

from snapshotter.content.discovery import fetch_ztoc
from snapshotter.content.layout import OciLayout
from snapshotter.dataplane.api import ServedLayer, SweepResult
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.errors import FormatError, PysociError
from snapshotter.fetch.registry_source import RegistryRangeSource
from snapshotter.fs.table import LayerNotMountedError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import parse_reference
from snapshotter.remote.spec import LayerSpec
from snapshotter.soci.index import DEFAULT_MAX_PREFETCH_SIZE, parse_prefetch
from snapshotter.soci.prefetch import expand_runs
from snapshotter.soci.ztoc import Ztoc

log = logging.getLogger(__name__)


MAX_PREFETCH_ARTIFACT: Final = DEFAULT_MAX_PREFETCH_SIZE
WARM_TTL: Final = 120.0
MAX_WARM: Final = 64


class _Warming:
    """A zTOC being fetched ahead of its mount."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self.taken = trio.Event()
        """Set when the mount took the result: the warming holds nothing from then on."""
        self._ztoc: Ztoc | None = None
        self._error: Exception | None = None

    def set(self, ztoc: Ztoc) -> None:
        self._ztoc = ztoc
        self._done.set()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._done.set()

    async def take(self) -> Ztoc:
        """The zTOC (once fetched), handed over: the warming lets go of it."""
        await self._done.wait()
        ztoc, error = self._ztoc, self._error
        self._ztoc = self._error = None
        self.taken.set()
        if ztoc is None:
            assert error is not None
            raise error
        return ztoc


class LocalDataPlane:
    """The DataPlane calls, served by this process's LazyLayers (running in its nursery)."""

    def __init__(
        self,
        lazy: LazyLayers,
        client: RegistryClient,
        *,
        ztoc_dir: Path | None = None,
        local_store_dir: Path | None = None,
    ) -> None:
        self.lazy = lazy
        self.client = client
        self.ztocs = OciLayout.open(ztoc_dir, create=True) if ztoc_dir is not None else None
        """zTOCs of served layers, kept so that a restart needs no registry."""
        self.local_store_dir = local_store_dir
        self._warming: dict[str, _Warming] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def mountpoint(self) -> Path:
        """The FUSE mount."""
        return self.lazy.mountpoint

    def _local_store(self) -> OciLayout | None:
        path = self.local_store_dir
        if path is None or not (path / "oci-layout").exists():
            return None
        try:
            return OciLayout.open(path)
        except PysociError as e:
            log.warning("local content store %s is unusable (%s); not using it", path, e)
            return None

    async def mount(self, spec: LayerSpec) -> Path:
        """Serve the layer; its directory (the one it has when it is served already)."""
        served = self.lazy.spec(spec.layer_id)
        if served is not None:
            if served.ztoc_digest != spec.ztoc_digest or served.layer_digest != spec.layer_digest:
                raise FormatError(
                    f"lazy layer {spec.layer_id} is served with layer {served.layer_digest} "
                    f"and zTOC {served.ztoc_digest}, not {spec.layer_digest} and "
                    f"{spec.ztoc_digest}"
                )
            return self.mountpoint / spec.layer_id
        ref = parse_reference(spec.image_ref)
        warming = self._warming.pop(spec.ztoc_digest, None)
        if warming is not None:
            ztoc = await warming.take()
        else:
            ztoc = await self._fetch_ztoc(spec)
        if ztoc.compressed_archive_size != spec.layer_size:
            raise FormatError(
                f"zTOC {spec.ztoc_digest} is for {ztoc.compressed_archive_size} bytes, the "
                f"layer has {spec.layer_size} ({spec.layer_digest})"
            )
        source = RegistryRangeSource(self.client, ref, spec.layer_digest)
        path = await self.lazy.mount(spec, ztoc, source)
        if self._nursery is not None:
            self._nursery.start_soon(self._prefetch, spec)
        return path

    async def _prefetch(self, spec: LayerSpec) -> None:
        """Fetch the layer's known start at once, after its mount returned: the spans this
        node recorded for the image, else those of the index's prefetch artifact."""
        try:
            spans, origin = await self._prefetch_spans(spec)
            if spans:
                queued = self.lazy.prefetch(spec.layer_id, spans)
                log.info(
                    "layer %s: %d of %d span(s) of its %s queued for prefetching",
                    spec.layer_digest,
                    queued,
                    len(spans),
                    origin,
                )
        except LayerNotMountedError:
            pass  # unmounted meanwhile
        except Exception as e:  # a prefetch is an optimisation: reads fetch what they need
            log.warning("layer %s: no prefetch: %s", spec.layer_digest, e)

    async def _prefetch_spans(self, spec: LayerSpec) -> tuple[list[int], str]:
        recordings = self.lazy.recordings
        if recordings is not None:
            recorded = await trio.to_thread.run_sync(recordings.recorded, spec)
            if recorded:
                return recorded, "recorded start"
        desc = spec.prefetch
        if desc is None or not self.lazy.config.prefetch.enable:
            return [], ""
        if desc.size > MAX_PREFETCH_ARTIFACT:
            raise FormatError(f"prefetch artifact {desc.digest} of {desc.size} bytes is too large")
        blob = await self.client.read_blob(
            parse_reference(spec.image_ref), desc.digest, max_size=MAX_PREFETCH_ARTIFACT
        )
        artifact = parse_prefetch(blob, spec.layer_digest, max_size=MAX_PREFETCH_ARTIFACT)
        num_spans = self.lazy.num_spans(spec.layer_id)
        spans, outside = expand_runs(artifact.spans, num_spans)
        if outside:
            log.warning(
                "layer %s: its prefetch artifact %s names %d span(s) past its %d",
                spec.layer_digest,
                desc.digest,
                outside,
                num_spans,
            )
        return spans, f"prefetch artifact {desc.digest}"

    async def _fetch_ztoc(self, spec: LayerSpec) -> Ztoc:
        return await fetch_ztoc(
            self.client,
            parse_reference(spec.image_ref),
            spec.ztoc,
            store=self.ztocs,
            local=self._local_store(),
            max_entries=self.lazy.config.fuse.max_ztoc_entries,
        )

    async def warm(self, specs: Collection[LayerSpec]) -> int:
        """Start fetching and decoding the zTOCs of layers about to be mounted (the other
        layers of an image whose first layer containerd prepares: it prepares them one after
        another), all at once, so that their mounts find them ready; how many were started.
        Needs `attach`; the results are kept WARM_TTL seconds and at most MAX_WARM of them."""
        if self._nursery is None:
            return 0
        started = 0
        for spec in specs:
            if (
                spec.ztoc_digest in self._warming
                or self.lazy.spec(spec.layer_id) is not None
                or len(self._warming) >= MAX_WARM
            ):
                continue
            pending = _Warming()
            self._warming[spec.ztoc_digest] = pending
            self._nursery.start_soon(self._warm_one, spec, pending)
            started += 1
        return started

    async def _warm_one(self, spec: LayerSpec, pending: _Warming) -> None:
        try:
            pending.set(await self._fetch_ztoc(spec))
        except Exception as exc:  # the mount asks again and reports it
            pending.fail(exc)
        with trio.move_on_after(WARM_TTL):
            await pending.taken.wait()
        if self._warming.get(spec.ztoc_digest) is pending:
            del self._warming[spec.ztoc_digest]  # never mounted: drop the decoded zTOC

    def attach(self, nursery: trio.Nursery) -> None:
        """The nursery warming runs in (the data plane's)."""
        self._nursery = nursery

    async def unmount(self, layer_id: str, *, forget: bool = False) -> None:
        """Stop serving the layer; with `forget`, delete its cached spans and, when no other
        served layer uses it, its zTOC."""
        spec = self.lazy.spec(layer_id)
        await self.lazy.unmount(layer_id, drop_cache=forget)
        if (
            forget
            and spec is not None
            and self.ztocs is not None
            and all(s.ztoc_digest != spec.ztoc_digest for s, _, _ in self.lazy.served())
        ):
            self.ztocs.blob_path(spec.ztoc_digest).unlink(missing_ok=True)

    async def check(self, layer_id: str) -> None:
        """LayerNotMountedError / LayerUnavailableError unless the layer serves reads."""
        await self.lazy.check_available(layer_id)

    async def layers(self) -> list[ServedLayer]:
        """Every layer served now."""
        return [
            ServedLayer(spec.layer_id, spec.layer_digest, spec.ztoc_digest, str(path), state)
            for spec, path, state in self.lazy.served()
        ]

    async def sweep(self, keep: Collection[LayerSpec]) -> SweepResult:
        """Unmount what is not in `keep`; delete the span caches and zTOCs it does not use."""
        wanted = {spec.layer_id for spec in keep}
        unmounted = 0
        for spec, _, _ in self.lazy.served():
            if spec.layer_id not in wanted:
                log.info("cleanup: unmounting lazy layer %s: no snapshot uses it", spec.layer_id)
                await self.unmount(spec.layer_id, forget=True)
                unmounted += 1
        digests = {spec.layer_digest for spec in keep}
        caches = 0
        for digest in self.lazy.cache.cached_layers():
            if digest not in digests and self.lazy.remove_cached(digest):
                log.info("cleanup: removed the cached spans of unused layer %s", digest)
                caches += 1
        ztocs = 0
        if self.ztocs is not None:
            used = {spec.ztoc_digest for spec in keep}
            blobs = self.ztocs.root / "blobs" / "sha256"
            if blobs.is_dir():
                for blob in blobs.iterdir():
                    if f"sha256:{blob.name}" not in used:
                        blob.unlink(missing_ok=True)
                        ztocs += 1
        return SweepResult(unmounted, caches, ztocs)
