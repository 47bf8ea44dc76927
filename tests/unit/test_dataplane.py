"""The data plane's local API: the real server and client over a real unix socket, typed
errors across it, malformed messages, `watch`, and the metrics merge of both processes.

The data plane behind the server is the real LocalDataPlane over a fake FUSE side (FUSE needs
root; tests/integration run the real process: test_lifecycle, test_systemd).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, generate_latest

from snapshotter import metrics
from snapshotter.dataplane.api import DataPlaneUnavailableError, ServedLayer
from snapshotter.dataplane.client import DataPlaneClient, call_sync, socket_path
from snapshotter.dataplane.lazy import LazyLayers
from snapshotter.dataplane.plane import LocalDataPlane
from snapshotter.dataplane.protocol import (
    MAX_REQUEST,
    ProtocolError,
    decode,
    encode,
    error_reply,
    raise_reply,
)
from snapshotter.dataplane.server import DataPlaneServer
from snapshotter.errors import FormatError, RegistryUnavailableError
from snapshotter.fs.table import LayerNotMountedError, LayerUnavailableError
from snapshotter.registry.client import RegistryClient
from snapshotter.remote.spec import LayerSpec, layer_id

LAYER = "sha256:" + "a" * 64
ZTOC = "sha256:" + "b" * 64


def spec(**kw: Any) -> LayerSpec:
    values: dict[str, Any] = dict(
        layer_id=layer_id(LAYER, ZTOC),
        layer_digest=LAYER,
        layer_size=100,
        ztoc_digest=ZTOC,
        ztoc_size=10,
        image_ref="registry.test/app:v1",
    )
    values.update(kw)
    return LayerSpec(**values)


class _Cache:
    def cached_layers(self) -> list[str]:
        return []


class FakeLazy:
    """The FUSE side: mounted layers by id; check says what the test wants."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.mounts: dict[str, LayerSpec] = {}
        self.cache = _Cache()
        self.draining = False
        self.unavailable = ""

    def spec(self, lid: str) -> LayerSpec | None:
        return self.mounts.get(lid)

    def served(self) -> list[tuple[LayerSpec, Path, str]]:
        return [(s, self.mountpoint / lid, "fetching") for lid, s in self.mounts.items()]

    async def unmount(self, lid: str, *, drop_cache: bool = False) -> None:
        self.mounts.pop(lid, None)

    async def check_available(self, lid: str) -> None:
        if lid not in self.mounts:
            raise LayerNotMountedError(f"layer {lid!r} is not mounted")
        if self.unavailable:
            raise LayerUnavailableError(self.unavailable)

    def remove_cached(self, digest: str) -> bool:
        return False


@asynccontextmanager
async def served(
    tmp_path: Path,
) -> AsyncIterator[tuple[DataPlaneServer, FakeLazy, DataPlaneClient]]:
    lazy = FakeLazy(tmp_path / "fuse")
    plane = LocalDataPlane(cast(LazyLayers, lazy), cast(RegistryClient, None))
    server = DataPlaneServer(plane, generation="g1")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, socket_path(tmp_path))
        yield server, lazy, DataPlaneClient(tmp_path, connect_timeout=0.5)
        server.close()
        nursery.cancel_scope.cancel()


async def test_calls_and_typed_errors_cross_the_socket(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, lazy, client):
        hello = await client.hello()
        assert hello["generation"] == "g1" and hello["layers"] == 0
        lazy.mounts[spec().layer_id] = spec()
        assert await client.layers() == [
            ServedLayer(spec().layer_id, LAYER, ZTOC, str(tmp_path / "fuse" / spec().layer_id),
                        "fetching")
        ]  # fmt: skip
        await client.check(spec().layer_id)
        with pytest.raises(LayerNotMountedError, match="not mounted"):
            await client.check("other")
        lazy.unavailable = "its registry cannot be reached"
        with pytest.raises(LayerUnavailableError, match="cannot be reached"):
            await client.check(spec().layer_id)
        # Served already with another zTOC: a FormatError, not a silent reuse.
        other = spec(ztoc_digest="sha256:" + "c" * 64)
        with pytest.raises(FormatError, match="is served with layer"):
            await client.mount(other)
        assert await client.mount(spec()) == tmp_path / "fuse" / spec().layer_id
        result = await client.sweep([])
        assert (result.unmounted, lazy.mounts) == (1, {})
        assert (socket_path(tmp_path).stat().st_mode & 0o777) == 0o600


async def test_malformed_requests_get_errors_not_crashes(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, _, client):
        for line in (b"not json\n", b"[1,2]\n", b'{"op": "format-disk"}\n',
                     b'{"op": "mount", "args": {"spec": {"layer_id": "../x"}}}\n',
                     b'{"op": "unmount", "args": {"layer_id": 7}}\n'):  # fmt: skip
            stream = await trio.open_unix_socket(str(socket_path(tmp_path)))
            async with stream:
                await stream.send_all(line)
                reply = json.loads(await stream.receive_some(65536))
            assert "error" in reply, line
            assert reply["error"]["type"] in ("ProtocolError", "FormatError", "DataPlaneError")
        # A message over the bound is refused: the server stops reading and closes.
        stream = await trio.open_unix_socket(str(socket_path(tmp_path)))
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(4 * MAX_REQUEST // 65536):
                    await stream.send_all(b"x" * 65536)
        assert (await client.hello())["generation"] == "g1"  # still serving


async def test_watch_ends_when_the_data_plane_hands_over(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, _, client):
        async with trio.open_nursery() as nursery:
            hello = await nursery.start(client.watch)
            assert hello["generation"] == "g1"
            server.close(socket_path(tmp_path))
        assert not socket_path(tmp_path).exists()
    with pytest.raises(DataPlaneUnavailableError, match="no data plane answers"):
        await client.hello(wait=0)


async def test_a_call_waits_for_a_data_plane_to_listen(tmp_path: Path) -> None:
    """A successor needs a moment to listen: calls wait up to the connect timeout."""
    client = DataPlaneClient(tmp_path, connect_timeout=5)
    async with trio.open_nursery() as nursery:

        async def late() -> None:
            await trio.sleep(0.3)
            async with served(tmp_path) as (_, _, _c):
                await trio.sleep(1)

        nursery.start_soon(late)
        assert (await client.hello())["generation"] == "g1"


def test_error_replies_keep_their_class() -> None:
    for exc in (LayerNotMountedError("x"), RegistryUnavailableError("down"), FormatError("f")):
        with pytest.raises(type(exc), match=str(exc)):
            raise_reply(decode(encode(error_reply(exc)), 1 << 20))
    with pytest.raises(ProtocolError):
        raise_reply({"nothing": 1})
    assert error_reply(KeyError("k"))["error"]["type"] == "DataPlaneError"


def test_call_sync_without_a_data_plane(tmp_path: Path) -> None:
    with pytest.raises(DataPlaneUnavailableError):
        call_sync(tmp_path, "metrics", timeout=1)


def test_metrics_of_both_processes_add_up() -> None:
    """The control plane's /metrics: its own series plus the data plane's, summed where both
    keep the same counter; `pysoci_data_plane_up` says whether the data plane answered."""
    other = CollectorRegistry()
    errors = Counter("pysoci_registry_errors", "", ["kind"], registry=other)
    errors.labels("timeout").inc(3)
    fetches = Counter("pysoci_span_fetches", "", ["kind"], registry=other)
    fetches.labels("on_demand").inc(5)
    remote_text = generate_latest(other).decode()
    # This process's counters hold what earlier tests counted: compare with them.
    before = metrics.REGISTRY.get_sample_value("pysoci_registry_errors_total", {"kind": "timeout"})
    fetched = metrics.REGISTRY.get_sample_value("pysoci_span_fetches_total", {"kind": "on_demand"})
    metrics.registry_error("timeout")
    merged = metrics.merged_registry(lambda: remote_text)
    value = merged.get_sample_value("pysoci_registry_errors_total", {"kind": "timeout"})
    assert value == (before or 0) + 1 + 3
    on_demand = merged.get_sample_value("pysoci_span_fetches_total", {"kind": "on_demand"})
    assert on_demand == (fetched or 0) + 5
    assert merged.get_sample_value("pysoci_data_plane_up") == 1

    def down() -> str:
        raise DataPlaneUnavailableError("no")

    assert metrics.merged_registry(down).get_sample_value("pysoci_data_plane_up") == 0
