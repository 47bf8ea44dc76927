"""The remote-layer wing on bad and unusual input: Prepare labels, layers that are not in the
image, zTOCs that do not fit their layer, indexes that exist only in the local store, and
restoring from the snapshots' labels.

The registry is a small fake over one OCI layout per repository (what the wing asks of
RegistryClient: manifests, whole blobs, blob streams, referrers); the FUSE side of the data
plane is a fake that records mounts (FUSE needs root; tests/integration mount for real). The
data plane's zTOC resolution, local unpacks, the content stores, the index building and the
gRPC-thread → trio bridge are the real ones.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from snapshotter import labels as names
from snapshotter.bridge import TrioBridge
from snapshotter.config import Config
from snapshotter.content.indexing import IndexOptions, LayoutIndexer, iter_soci_index_descriptors
from snapshotter.content.layout import OciLayout
from snapshotter.content.local_layers import LocalLayers
from snapshotter.dataplane.lazy import LayerMountError, LazyLayers
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.errors import (
    ContentNotFoundError,
    FormatError,
    InvalidReferenceError,
    RegistryNotFoundError,
)
from snapshotter.fs.table import LayerNotMountedError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.remote.hook import SociRemote
from snapshotter.remote.layers import RemoteLayers
from snapshotter.remote.resolve import ImageResolver, parse_labels
from snapshotter.remote.spec import LayerSpec, layer_id
from snapshotter.service import UnavailableError
from snapshotter.service.snapshots import LayerRecord, RemoteLayer
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.ztoc import Ztoc
from tests.fixtures.images import Layer, files_tar, write_image

LABEL_TARGET = names.TARGET
LABEL_CRI_IMAGE_REF = names.CRI_IMAGE_REF
LABEL_CRI_LAYER_DIGEST = names.CRI_LAYER_DIGEST
LABEL_CRI_MANIFEST_DIGEST = names.CRI_MANIFEST_DIGEST
LABEL_SOCI_INDEX_DIGEST = names.SOCI_INDEX_DIGEST
LABEL_STARGZ_DIGEST = names.STARGZ_DIGEST
LABEL_STARGZ_REFERENCE = names.STARGZ_REFERENCE
HOST = "registry.test:5000"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
OPTIONS = IndexOptions(span_size=64 << 10, min_layer_size=100 << 10, workers=1)


def big_layer(seed: int) -> Layer:
    """A gzip layer above OPTIONS' min layer size (random data does not compress)."""
    return Layer.from_tar(files_tar({f"data/{seed}": random.Random(seed).randbytes(300_000)}))


SMALL = Layer.from_tar(files_tar({"etc/small": b"small\n"}))


# -- fakes -----------------------------------------------------------------------------------


class FakeRegistry:
    """The registry calls the hook makes, served from one OCI layout per repository."""

    def __init__(self) -> None:
        self.repos: dict[str, OciLayout] = {}
        self.requests: list[tuple[str, str, str]] = []
        """(kind, repository, tag or digest) of every request, in order."""

    def _layout(self, ref: Reference) -> OciLayout:
        layout = self.repos.get(ref.repository)
        if layout is None:
            raise RegistryNotFoundError(f"repository {ref.locator} not found")
        return layout

    async def get_manifest(self, ref: Reference) -> tuple[oci.Descriptor, bytes]:
        self.requests.append(("manifest", ref.repository, ref.object))
        layout = self._layout(ref)
        try:
            desc = layout.resolve(ref.object)
            return desc, layout.read_blob(desc.digest, max_size=4 << 20)
        except ContentNotFoundError as e:
            raise RegistryNotFoundError(f"manifest {ref}: {e}") from None

    async def read_blob(self, ref: Reference, digest: str, *, max_size: int) -> bytes:
        self.requests.append(("blob", ref.repository, digest))
        try:
            return self._layout(ref).read_blob(digest, max_size=max_size)
        except ContentNotFoundError as e:
            raise RegistryNotFoundError(f"blob {digest} of {ref.locator}: {e}") from None

    async def fetch_blob(self, ref: Reference, digest: str) -> AsyncIterator[bytes]:
        self.requests.append(("blob", ref.repository, digest))
        try:
            with self._layout(ref).open_blob(digest) as f:
                while chunk := f.read(64 << 10):
                    yield chunk
        except ContentNotFoundError as e:
            raise RegistryNotFoundError(f"blob {digest} of {ref.locator}: {e}") from None

    async def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[oci.Descriptor]:
        self.requests.append(("referrers", ref.repository, subject_digest))
        return [
            desc
            for desc, idx in iter_soci_index_descriptors(self._layout(ref))
            if idx.subject is not None
            and idx.subject.digest == subject_digest
            and artifact_type in (None, desc.artifact_type)
        ]

    def asked_for(self, digest: str) -> bool:
        return any(obj == digest for _, _, obj in self.requests)


class _NoCache:
    def cached_layers(self) -> list[str]:
        return []


@dataclass
class FakeLazy:
    """The FUSE side of the data plane: records what would be mounted lazily."""

    mountpoint: Path
    mounts: dict[str, tuple[LayerSpec, Ztoc]] = field(default_factory=dict)
    cache: _NoCache = field(default_factory=_NoCache)
    failure: str = ""
    """When set, mounting fails with this message."""
    config: Config = field(default_factory=Config)

    async def mount(self, spec: LayerSpec, ztoc: Ztoc, source: object) -> Path:
        if self.failure:
            raise LayerMountError(self.failure)
        self.mounts[spec.layer_id] = (spec, ztoc)
        return self.mountpoint / spec.layer_id

    async def unmount(self, lid: str, *, drop_cache: bool = False) -> None:
        self.mounts.pop(lid, None)

    async def check_available(self, lid: str) -> None:
        if lid not in self.mounts:
            raise LayerNotMountedError(f"layer {lid!r} is not mounted")

    def spec(self, lid: str) -> LayerSpec | None:
        mounted = self.mounts.get(lid)
        return None if mounted is None else mounted[0]

    def served(self) -> list[tuple[LayerSpec, Path, str]]:
        return [(spec, self.mountpoint / lid, "fetching") for lid, (spec, _) in self.mounts.items()]

    def remove_cached(self, digest: str) -> bool:
        return False


@dataclass
class Rig:
    root: Path
    registry: FakeRegistry
    lazy: FakeLazy
    committed: list[RemoteLayer] = field(default_factory=list)

    def layers(self) -> RemoteLayers:
        """The wing as the daemon makes it (state in `root`)."""
        client = cast(RegistryClient, self.registry)
        plane = LocalDataPlane(
            cast(LazyLayers, self.lazy),
            client,
            ztoc_dir=self.root / "ztocs",
            local_store_dir=self.root / "content",
        )
        return RemoteLayers(
            ImageResolver(client, local_store_dir=self.root / "content"),
            plane,
            LocalLayers(self.root / "layers"),
        )

    def remote(self, layers: RemoteLayers | None = None) -> SociRemote:
        """A hook on the running trio loop."""
        return SociRemote(layers or self.layers(), TrioBridge(trio.lowlevel.current_trio_token()))

    def prepare_on(self, remote: SociRemote, labels: Mapping[str, str], key: str) -> Any:
        """Prepare through the hook, from a worker thread (as gRPC's), committing to a list."""
        return trio.to_thread.run_sync(
            remote.prepare_remote, key, None, labels, [], self.committed.append
        )

    def prepare(self, labels: Mapping[str, str], key: str = "default/1/extract") -> Any:
        """One Prepare with a fresh hook."""

        async def main() -> RemoteLayer | None:
            return await self.prepare_on(self.remote(), labels, key)  # type: ignore[no-any-return]

        return trio.run(main)

    def repo(self, name: str) -> OciLayout:
        layout = OciLayout.open(self.root.parent / "registry" / name, create=True)
        self.registry.repos[name] = layout
        return layout


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    root = tmp_path / "root"
    root.mkdir()
    return Rig(root, FakeRegistry(), FakeLazy(root / "fuse"))


def push_image(rig: Rig, repo: str, layers: list[Layer], tag: str = "v1") -> oci.ImageManifest:
    """Store an image in the fake registry; returns its manifest."""
    layout = rig.repo(repo)
    desc = write_image(layout.root, tag, layers)
    parsed = oci.parse_manifest(layout.read_blob(desc.digest, max_size=1 << 20))
    assert isinstance(parsed, oci.ImageManifest)
    return parsed


def labels_for(ref: str, layer: str, **extra: str) -> dict[str, str]:
    """What ctr-remote sends (no manifest digest)."""
    return {
        LABEL_TARGET: "default/2/sha256:chain",
        LABEL_STARGZ_REFERENCE: ref,
        LABEL_STARGZ_DIGEST: layer,
        **extra,
    }


# -- parse_labels ----------------------------------------------------------------------------


def test_labels_without_a_target_or_an_image_are_not_a_request() -> None:
    assert parse_labels({}) is None
    assert parse_labels({LABEL_CRI_IMAGE_REF: f"{HOST}/a:v1"}) is None
    target = {LABEL_TARGET: "default/2/sha256:chain"}
    assert parse_labels(target) is None
    assert parse_labels({**target, LABEL_CRI_IMAGE_REF: f"{HOST}/a:v1"}) is None
    assert parse_labels({**target, LABEL_CRI_LAYER_DIGEST: DIGEST_A}) is None
    empty = {**target, LABEL_CRI_IMAGE_REF: "", LABEL_CRI_LAYER_DIGEST: ""}
    assert parse_labels(empty) is None


def test_labels_of_cri_and_of_ctr_remote() -> None:
    cri = parse_labels(
        {
            LABEL_TARGET: "t",
            LABEL_CRI_IMAGE_REF: f"{HOST}/a:v1",
            LABEL_CRI_LAYER_DIGEST: DIGEST_A,
            LABEL_CRI_MANIFEST_DIGEST: DIGEST_B,
            LABEL_SOCI_INDEX_DIGEST: DIGEST_B,
            # CRI's labels win over ctr-remote's when both are there.
            LABEL_STARGZ_REFERENCE: f"{HOST}/other:v2",
            LABEL_STARGZ_DIGEST: DIGEST_B,
        }
    )
    assert cri is not None
    assert (str(cri.ref), cri.layer_digest) == (f"{HOST}/a:v1", DIGEST_A)
    assert (cri.manifest_digest, cri.index_digest) == (DIGEST_B, DIGEST_B)
    stargz = parse_labels(labels_for(f"{HOST}/a:v1", DIGEST_A))
    assert stargz is not None
    assert (stargz.layer_digest, stargz.manifest_digest, stargz.index_digest) == (
        DIGEST_A,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("labels", "error"),
    [
        (labels_for(f"{HOST}/a:v1", "sha256:abc"), FormatError),
        (labels_for(f"{HOST}/a:v1", "md5:" + "a" * 32), FormatError),
        (labels_for(f"{HOST}/a:v1", DIGEST_A, **{LABEL_CRI_MANIFEST_DIGEST: "x"}), FormatError),
        (labels_for(f"{HOST}/a:v1", DIGEST_A, **{LABEL_SOCI_INDEX_DIGEST: "sha256:"}), FormatError),
        (labels_for(f"{HOST}/Not A Ref", DIGEST_A), InvalidReferenceError),
        (labels_for(f"{HOST}/a:" + "t" * 200, DIGEST_A), InvalidReferenceError),
    ],
)
def test_malformed_labels_raise_typed_errors(labels: dict[str, str], error: type) -> None:
    with pytest.raises(error):
        parse_labels(labels)


# -- the hook: what is not lazy, and why the log says so -------------------------------------


def test_malformed_labels_are_not_lazy_and_ask_no_registry(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert rig.prepare(labels_for(f"{HOST}/a:v1", "sha256:zz")) is None
    assert "unusable remote-snapshot labels" in caplog.text
    assert rig.prepare({LABEL_TARGET: "default/2/sha256:chain"}) is None
    assert "no image reference or layer digest" in caplog.text
    assert rig.registry.requests == []
    assert rig.lazy.mounts == {}


def test_image_without_an_index_is_left_to_containerd(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "plain", [big_layer(1)])
    assert rig.prepare(labels_for(f"{HOST}/plain:v1", manifest.layers[0].digest)) is None
    assert "has no SOCI index" in caplog.text
    assert not (rig.root / "layers").exists() or not any((rig.root / "layers").iterdir())


def test_layer_of_another_repository_is_reported_as_not_in_the_image(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    push_image(rig, "a", [big_layer(1)])
    layout = rig.repo("a")
    LayoutIndexer(layout, OPTIONS).create("v1")  # a is indexed: the message must not blame that
    other = push_image(rig, "b", [big_layer(2)]).layers[0].digest
    assert rig.prepare(labels_for(f"{HOST}/a:v1", other)) is None
    assert f"layer {other} is not in image {HOST}/a:v1" in caplog.text
    assert "has no SOCI index" not in caplog.text
    assert rig.lazy.mounts == {}
    assert not rig.registry.asked_for(other)


def test_manifest_digest_that_lacks_the_layer_is_reported(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """CRI's labels: the named manifest does not list the named layer (twice: the second
    Prepare finds the image cached)."""
    caplog.set_level(logging.INFO)
    first = push_image(rig, "a", [big_layer(1)])
    manifest_digest = rig.repo("a").resolve("v1").digest
    base = {
        LABEL_TARGET: "default/2/sha256:chain",
        LABEL_CRI_IMAGE_REF: f"{HOST}/a:v1",
        LABEL_CRI_MANIFEST_DIGEST: manifest_digest,
    }
    assert rig.prepare({**base, LABEL_CRI_LAYER_DIGEST: DIGEST_A}) is None
    assert f"layer {DIGEST_A} is not in image {HOST}/a:v1 (manifest {manifest_digest})" in (
        caplog.text
    )

    async def twice() -> list[RemoteLayer | None]:
        remote = rig.remote()
        out = []
        for layer in (first.layers[0].digest, DIGEST_B):
            labels = {**base, LABEL_CRI_LAYER_DIGEST: layer}
            out.append(await rig.prepare_on(remote, labels, "k"))
        return out

    assert trio.run(twice) == [None, None]  # a is not indexed; B is not in it
    assert f"layer {DIGEST_B} is not in image" in caplog.text


def test_layer_in_no_platform_of_an_image_index(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    push_image(rig, "multi", [big_layer(1)], tag="host")
    layout = rig.repo("multi")
    host = layout.resolve("host")
    index = oci.ImageIndex(
        manifests=[
            oci.Descriptor(host.media_type, host.digest, host.size, platform=oci.host_platform())
        ]
    )
    data = index.to_json_bytes()
    layout.set_tag(
        "v1", oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, layout.write_blob(data), len(data))
    )
    assert rig.prepare(labels_for(f"{HOST}/multi:v1", DIGEST_A)) is None
    assert f"layer {DIGEST_A} is not in image {HOST}/multi:v1: none of the 1 platform" in (
        caplog.text
    )


# -- zTOCs that do not fit -------------------------------------------------------------------


def _index_naming(
    layout: OciLayout, subject: oci.Descriptor, layer: oci.Descriptor, ztoc: str, size: int
) -> str:
    """A v1 index for `subject` that names blob `ztoc` (`size` bytes) as `layer`'s zTOC."""
    desc = soci_index.ztoc_descriptor(
        ztoc,
        size,
        layer_digest=layer.digest,
        layer_media_type=layer.media_type,
        span_size=OPTIONS.span_size,
    )
    idx = soci_index.SociIndex(version=1, ztocs=[desc], subject=subject)
    layout.write_blob(soci_index.EMPTY_CONFIG_BYTES)
    return layout.write_blob(idx.to_json_bytes())


def test_ztoc_of_another_layer_falls_back_to_a_local_unpack(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """An index whose zTOC for layer 1 is the zTOC of layer 2 (a different size)."""
    caplog.set_level(logging.INFO)
    one, two = big_layer(1), big_layer(2)
    manifest = push_image(rig, "a", [one, two])
    layout = rig.repo("a")
    (good,) = LayoutIndexer(layout, OPTIONS).create("v1")
    l1, l2 = manifest.layers
    ztoc2 = good.index.ztoc_for_layer(l2.digest)
    assert ztoc2 is not None and l1.size != l2.size
    bad = _index_naming(layout, good.manifest, l1, ztoc2.digest, ztoc2.size)
    got = rig.prepare(labels_for(f"{HOST}/a:v1", l1.digest, **{LABEL_SOCI_INDEX_DIGEST: bad}))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert "LAZY MOUNT FAILED" in caplog.text and "the layer has" in caplog.text
    assert rig.lazy.mounts == {}
    # The local unpack is the layer's own content, committed as a local layer.
    assert (Path(got.layer_dir) / "data" / "1").read_bytes() == random.Random(1).randbytes(300_000)
    assert rig.committed == [got] and names.ZTOC_DIGEST not in got.labels


def test_ztoc_that_is_not_a_ztoc_falls_back_to_a_local_unpack(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    layout = rig.repo("a")
    layer = manifest.layers[0]
    garbage = b"\x10\x00\x00\x00not a flatbuffer at all"
    garbage_digest = layout.write_blob(garbage)
    bad = _index_naming(layout, layout.resolve("v1"), layer, garbage_digest, len(garbage))
    got = rig.prepare(labels_for(f"{HOST}/a:v1", layer.digest, **{LABEL_SOCI_INDEX_DIGEST: bad}))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert "LAZY MOUNT FAILED" in caplog.text
    assert rig.lazy.mounts == {}
    # What failed to decode is not kept as the layer's zTOC.
    assert not OciLayout.open(rig.root / "ztocs").has_blob(garbage_digest)


def test_index_naming_a_missing_ztoc_falls_back_to_a_local_unpack(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    layout = rig.repo("a")
    layer = manifest.layers[0]
    bad = _index_naming(layout, layout.resolve("v1"), layer, DIGEST_A, 100)
    got = rig.prepare(labels_for(f"{HOST}/a:v1", layer.digest, **{LABEL_SOCI_INDEX_DIGEST: bad}))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert "LAZY MOUNT FAILED" in caplog.text


def test_failed_mount_is_committed_as_a_local_layer(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    layer = manifest.layers[0].digest
    rig.lazy.failure = "the FUSE session is gone"
    got = rig.prepare(labels_for(f"{HOST}/a:v1", layer))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert "LAZY MOUNT FAILED" in caplog.text and "the FUSE session is gone" in caplog.text
    # A restart must not try to remount a layer that was unpacked locally instead.
    assert got.labels == {} and "the lazy mount failed" in got.local_reason
    rig.lazy.failure = ""
    got = rig.prepare(labels_for(f"{HOST}/a:v1", layer))
    assert isinstance(got, RemoteLayer) and got.remote
    assert "found by referrers" in caplog.text
    spec = LayerSpec.from_labels(Path(got.layer_dir).name, got.labels)
    assert spec.layer_digest == layer and spec.index_source == "referrers"


# -- the local content store -----------------------------------------------------------------


def _local_only_index(rig: Rig, layers: list[Layer]) -> tuple[oci.ImageManifest, str]:
    """An image in the registry whose v1 index exists only in ROOT/content (as `pysoci create
    --root ROOT` leaves it before `pysoci push`)."""
    manifest = push_image(rig, "a", layers)
    content = rig.root / "content"
    shutil.copytree(rig.repo("a").root, content)
    (result,) = LayoutIndexer(OciLayout.open(content), OPTIONS).create("v1")
    return manifest, result.index_descriptor.digest


def test_index_only_in_the_local_store_serves_the_layer_lazily(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    manifest, index_digest = _local_only_index(rig, [big_layer(1), SMALL])
    big, small = manifest.layers
    content = OciLayout.open(rig.root / "content")
    found = soci_index.parse_soci_index(content.read_blob(index_digest, max_size=1 << 20))
    ztoc_desc = found.ztoc_for_layer(big.digest)
    assert ztoc_desc is not None and found.ztoc_for_layer(small.digest) is None

    got = rig.prepare(labels_for(f"{HOST}/a:v1", big.digest))
    lid = layer_id(big.digest, ztoc_desc.digest)
    assert isinstance(got, RemoteLayer) and got.remote
    assert got.layer_dir == str(rig.lazy.mountpoint / lid)
    assert f"SOCI index {index_digest}, found by local" in caplog.text
    spec, ztoc = rig.lazy.mounts[lid]
    assert spec.layer_digest == big.digest and ztoc.compressed_archive_size == big.size
    assert [f.name for f in ztoc.files if f.type == "reg"] == ["data/1"]
    # The zTOC came from ROOT/content (the registry has none), and is kept for restarts; the
    # snapshot's labels say what serving the layer again needs.
    assert not rig.registry.asked_for(ztoc_desc.digest)
    assert OciLayout.open(rig.root / "ztocs").has_blob(ztoc_desc.digest)
    assert LayerSpec.from_labels(lid, got.labels) == spec
    # The small layer has no zTOC: unpacked here, not left to containerd.
    got = rig.prepare(labels_for(f"{HOST}/a:v1", small.digest))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert (Path(got.layer_dir) / "etc" / "small").read_bytes() == b"small\n"


def test_local_index_named_by_digest_is_read_locally(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """nerdctl's `--soci-index-digest` of an index built here and never pushed."""
    caplog.set_level(logging.INFO)
    manifest, index_digest = _local_only_index(rig, [big_layer(1)])
    layer = manifest.layers[0].digest
    labels = labels_for(f"{HOST}/a:v1", layer, **{LABEL_SOCI_INDEX_DIGEST: index_digest})
    got = rig.prepare(labels)
    assert isinstance(got, RemoteLayer) and got.remote
    assert f"SOCI index {index_digest}, found by explicit (local)" in caplog.text
    assert not rig.registry.asked_for(index_digest)


def test_local_store_made_while_the_daemon_runs_is_used(rig: Rig) -> None:
    manifest = push_image(rig, "a", [big_layer(1)])
    layer = manifest.layers[0].digest

    async def main() -> list[RemoteLayer | None]:
        layers = rig.layers()
        remote = rig.remote(layers)  # ROOT/content does not exist yet
        labels = labels_for(f"{HOST}/a:v1", layer)
        first = await rig.prepare_on(remote, labels, "k1")
        shutil.copytree(rig.repo("a").root, rig.root / "content")
        LayoutIndexer(OciLayout.open(rig.root / "content"), OPTIONS).create("v1")
        layers.resolver.forget()  # a new pull of the image looks it up again
        second = await rig.prepare_on(remote, labels, "k2")
        return [first, second]

    first, second = trio.run(main)
    assert first is None
    assert isinstance(second, RemoteLayer) and second.remote


def test_restart_remounts_a_local_index_layer_without_the_registry(rig: Rig) -> None:
    """The snapshot's labels and the kept zTOC are enough; if the kept zTOC is gone,
    ROOT/content still has it (the registry never had it)."""
    manifest, _ = _local_only_index(rig, [big_layer(1)])
    layer = manifest.layers[0].digest
    got = rig.prepare(labels_for(f"{HOST}/a:v1", layer))
    assert isinstance(got, RemoteLayer) and got.remote
    for blob in (rig.root / "ztocs" / "blobs" / "sha256").iterdir():
        blob.unlink()
    rig.lazy.mounts.clear()
    rig.registry.repos.clear()  # the registry is unreachable after the restart
    record = LayerRecord("chain", got.layer_dir, True, got.labels)

    async def restart() -> tuple[int, int]:
        counts = await rig.layers().restore([record])
        return counts.mounted, counts.failed

    assert trio.run(restart) == (1, 0)
    spec, _ = rig.lazy.mounts[Path(got.layer_dir).name]
    assert spec.layer_digest == layer


def test_restore_keeps_layers_the_data_plane_still_serves(rig: Rig) -> None:
    """After a control-plane restart the data plane still serves the layer: nothing is
    mounted again, and what no snapshot references is swept."""
    manifest = push_image(rig, "a", [big_layer(1), big_layer(2)])
    LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    one, two = (rig.prepare(labels_for(f"{HOST}/a:v1", layer.digest)) for layer in manifest.layers)
    assert one.remote and two.remote
    served = dict(rig.lazy.mounts)

    async def restart() -> tuple[int, int, list[str]]:
        counts = await rig.layers().restore([LayerRecord("c1", one.layer_dir, True, one.labels)])
        return counts.kept, counts.mounted, sorted(rig.lazy.mounts)

    kept, mounted, left = trio.run(restart)
    assert (kept, mounted) == (1, 0)
    assert left == [Path(one.layer_dir).name]  # two has no snapshot: unmounted
    assert rig.lazy.mounts[left[0]] is served[left[0]]  # the same mount, not a new one


def test_check_mounts_a_layer_the_data_plane_lost(rig: Rig) -> None:
    """A data plane that restarted serves nothing: the first check mounts the layer again
    from its snapshot's labels; a layer that cannot be mounted is Unavailable."""
    manifest = push_image(rig, "a", [big_layer(1)])
    LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    got = rig.prepare(labels_for(f"{HOST}/a:v1", manifest.layers[0].digest))
    record = LayerRecord("chain", got.layer_dir, True, got.labels)
    rig.lazy.mounts.clear()

    async def check(layers: RemoteLayers) -> None:
        await layers.check([record])

    trio.run(check, rig.layers())
    assert list(rig.lazy.mounts) == [Path(got.layer_dir).name]
    rig.lazy.mounts.clear()
    rig.lazy.failure = "no FUSE"
    with pytest.raises(UnavailableError, match="no FUSE"):
        trio.run(check, rig.layers())
    broken = LayerRecord("chain", got.layer_dir, True, {})  # labels lost
    with pytest.raises(UnavailableError, match="has no label"):
        trio.run(lambda: rig.layers().check([broken]))


def test_release_asks_the_metastore_and_drops_only_unused_layers(rig: Rig) -> None:
    manifest = push_image(rig, "a", [big_layer(1)])
    LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    got = rig.prepare(labels_for(f"{HOST}/a:v1", manifest.layers[0].digest))
    record = LayerRecord("chain", got.layer_dir, True, got.labels)
    users = {got.layer_dir: 1}

    async def release() -> None:
        layers = rig.layers()
        layers._users = users.__getitem__
        await layers.release(record)

    trio.run(release)
    assert Path(got.layer_dir).name in rig.lazy.mounts  # another snapshot still uses it
    users[got.layer_dir] = 0
    trio.run(release)
    assert rig.lazy.mounts == {}


def test_unreadable_local_store_is_skipped(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    content = OciLayout.open(rig.root / "content", create=True)
    (content.root / "index.json").write_text("{not json")
    assert rig.prepare(labels_for(f"{HOST}/a:v1", manifest.layers[0].digest)) is None
    assert "has no SOCI index" in caplog.text
    assert "local content store" in caplog.text and "not using it" in caplog.text


def test_first_prepare_fetches_the_other_layers_ztocs_at_once(rig: Rig) -> None:
    """containerd prepares an image's layers one after another: at the first, the data plane
    fetches every other layer's zTOC at once, and their mounts use those (asked for once)."""
    manifest = push_image(rig, "a", [big_layer(1), big_layer(2), big_layer(3)])
    (built,) = LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    ztocs = [built.index.ztoc_for_layer(layer.digest) for layer in manifest.layers]
    assert all(z is not None for z in ztocs)

    async def main() -> list[int]:
        layers = rig.layers()
        plane = cast(LocalDataPlane, layers.plane)
        async with trio.open_nursery() as nursery:
            plane.attach(nursery)
            remote = rig.remote(layers)
            await rig.prepare_on(
                remote, labels_for(f"{HOST}/a:v1", manifest.layers[0].digest), "k0"
            )
            with trio.fail_after(10):
                while sum(rig.registry.asked_for(z.digest) for z in ztocs if z) < 3:
                    await trio.sleep(0.01)
            for i in (1, 2):
                labels = labels_for(f"{HOST}/a:v1", manifest.layers[i].digest)
                await rig.prepare_on(remote, labels, f"k{i}")
            nursery.cancel_scope.cancel()
        return [
            sum(1 for kind, _, obj in rig.registry.requests if z is not None and obj == z.digest)
            for z in ztocs
        ]

    assert trio.run(main) == [1, 1, 1]
    assert len(rig.lazy.mounts) == 3


def test_restore_removes_downloads_a_crash_cut_short(rig: Rig) -> None:
    """A download dir left by a killed daemon goes at the next restore; one in progress (of
    this process) stays."""
    layers = rig.layers()
    root = rig.root / "layers"
    root.mkdir(parents=True, exist_ok=True)
    (root / ".download-dead" / "tree").mkdir(parents=True)
    (root / ".download-dead" / "blob").write_bytes(b"x" * 1000)
    live = root / ".download-live"
    live.mkdir()
    layers.local._downloading.add(str(live))
    trio.run(layers.restore, [])
    assert sorted(p.name for p in root.iterdir()) == [".download-live"]
