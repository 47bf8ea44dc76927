"""The wing's side of untrusted indexes: the trust policy (`[pull_modes.*]`) and the record of
rejected zTOCs (a layer whose zTOC was proven to lie is unpacked locally at its next Prepare).

Uses the fake registry and FUSE side of test_remote_hook (mocks: this is the wing's logic; the
real data plane's rejection is in test_verify_checkpoints and the integration tests).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import cast

import pytest
import trio

from snapshotter.content.discovery import Modes
from snapshotter.content.indexing import LayoutIndexer
from snapshotter.content.layout import OciLayout
from snapshotter.content.local_layers import LocalLayers
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.registry.client import RegistryClient
from snapshotter.remote.layers import RemoteLayers
from snapshotter.remote.rejected import REJECTED_FILE, RejectedZtocs
from snapshotter.remote.resolve import ImageResolver
from snapshotter.service.snapshots import RemoteLayer
from snapshotter.soci import index as soci_index
from tests.unit.test_remote_hook import (
    HOST,
    OPTIONS,
    Rig,
    big_layer,
    labels_for,
    push_image,
    rig,  # noqa: F401  (the fixture)
)


def layers_with(r: Rig, modes: Modes) -> RemoteLayers:
    client = cast(RegistryClient, r.registry)
    plane = LocalDataPlane(
        cast(LazyLayers, r.lazy),
        client,
        ztoc_dir=r.root / "ztocs",
        local_store_dir=r.root / "content",
    )
    return RemoteLayers(
        ImageResolver(client, modes=modes, local_store_dir=r.root / "content"),
        plane,
        LocalLayers(r.root / "layers"),
    )


def prepare(r: Rig, layers: RemoteLayers, labels: dict[str, str]) -> RemoteLayer | None:
    async def main() -> RemoteLayer | None:
        return await r.prepare_on(r.remote(layers), labels, "default/1/extract")  # type: ignore[no-any-return]

    return trio.run(main)


def test_a_local_store_index_is_ignored_when_the_local_store_is_not_trusted(
    rig: Rig,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    shutil.copytree(rig.repo("a").root, rig.root / "content")
    (result,) = LayoutIndexer(OciLayout.open(rig.root / "content"), OPTIONS).create("v1")
    labels = labels_for(f"{HOST}/a:v1", manifest.layers[0].digest)
    assert prepare(rig, layers_with(rig, Modes(local=False)), labels) is None
    assert not rig.lazy.mounts
    assert "[pull_modes.local_store] enable = false" in caplog.text
    assert result.index_descriptor.digest in caplog.text
    got = prepare(rig, layers_with(rig, Modes()), labels)
    assert isinstance(got, RemoteLayer) and got.remote


def test_referrers_are_not_asked_when_v1_is_not_trusted(
    rig: Rig,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    labels = labels_for(f"{HOST}/a:v1", manifest.layers[0].digest)
    assert prepare(rig, layers_with(rig, Modes(v1=False)), labels) is None
    assert not any(kind == "referrers" for kind, _, _ in rig.registry.requests)
    assert "[pull_modes.soci_v1] enable = false" in caplog.text


def test_a_rejected_ztoc_is_unpacked_locally_at_the_next_prepare(
    rig: Rig,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    manifest = push_image(rig, "a", [big_layer(1)])
    (result,) = LayoutIndexer(rig.repo("a"), OPTIONS).create("v1")
    layer = manifest.layers[0].digest
    idx = soci_index.parse_soci_index(
        rig.repo("a").read_blob(result.index_descriptor.digest, max_size=1 << 20)
    )
    ztoc = idx.ztoc_for_layer(layer)
    assert ztoc is not None
    # What the data plane records when it proves the zTOC wrong (in another process).
    RejectedZtocs(rig.root / REJECTED_FILE).add(layer, ztoc.digest, "checkpoint 3 lies")
    got = prepare(rig, layers_with(rig, Modes()), labels_for(f"{HOST}/a:v1", layer))
    assert isinstance(got, RemoteLayer) and not got.remote
    assert not rig.lazy.mounts
    assert "checkpoint 3 lies" in got.local_reason and got.labels == {}
    assert (Path(got.layer_dir) / "data" / "1").stat().st_size == 300_000
    assert f"its zTOC {ztoc.digest}" in caplog.text
    assert result.index_descriptor.digest in caplog.text


def test_the_rejected_record_survives_a_bad_file_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / REJECTED_FILE
    path.write_text("not json")
    rejected = RejectedZtocs(path)
    assert rejected.reason("sha256:a", "sha256:z") is None
    rejected.add("sha256:a", "sha256:z", "x" * 5000)
    assert RejectedZtocs(path).reason("sha256:a", "sha256:z") == "x" * 1000
    assert RejectedZtocs(path).reason("sha256:b", "sha256:z") is None
