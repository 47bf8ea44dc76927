"""RegistryClient behind real mirrors: docker-registry in proxy mode and nginx (slice cache).

The origin is a real docker-registry behind the fault proxy, which counts every byte the origin
serves (to the mirror and to the client alike); a second fault proxy in front of each mirror
counts what the mirror serves the client, and injects the mirror's failures. The client reaches
them through a containerd-style hosts.toml: the mirror first, then the origin.

What the mirrors do with a `Range` request on a blob they have not cached (measured here, and
written in the README's "Running on many nodes"): docker-registry's proxy answers 200 with the
whole blob streamed from the origin, and stores the blob meanwhile, even when the client closes
the answer at once; nginx's slice cache answers 206 from slices it fetches with their own Range
(and 200 with the whole blob to a multi-range request).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.config import Config, HttpConfig, RegistryConfig
from snapshotter.registry import ranges, session
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.soci.oci import MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST, ImageManifest
from snapshotter.soci.oci import Descriptor as Desc
from tests.fixtures.fault_proxy import Fault, FaultProxy, blob_get, kind_is
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.registry_mirrors import (
    Nginx,
    start_nginx_mirror,
    start_proxy_registry,
    write_hosts_toml,
)

MiB = 1 << 20
SIZE = 24 * MiB
HTTP = HttpConfig(
    DialTimeoutMsec=2000,
    ResponseHeaderTimeoutMsec=5000,
    RequestTimeoutMsec=60000,
    MaxRetries=8,
    MinWaitMsec=1,
    MaxWaitMsec=50,
)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("origin"))
    yield reg
    reg.stop()


@pytest.fixture
def counted_origin(origin: Registry) -> Iterator[FaultProxy]:
    """The origin as every mirror and client reach it: the bytes it serves are counted."""
    with FaultProxy.start(origin.url) as p:
        yield p


@pytest.fixture
def nginx(counted_origin: FaultProxy, tmp_path: Path) -> Iterator[Nginx]:
    mirror = start_nginx_mirror(tmp_path / "nginx", counted_origin.host, "slice")
    yield mirror
    mirror.stop()


@pytest.fixture
def proxy_registry(counted_origin: FaultProxy, tmp_path: Path) -> Iterator[Registry]:
    mirror = start_proxy_registry(tmp_path / "proxy-registry", counted_origin.url)
    yield mirror
    mirror.stop()


async def push_blob(origin: Registry, repo: str, data: bytes) -> str:
    """Push straight to the origin (not counted); the blob's digest."""
    async with RegistryClient(plain_http=True) as c:
        ref = parse_reference(f"{origin.host}/{repo}:x")

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), MiB):
                yield data[i : i + MiB]

        await c.push_blob(ref, digest_of(data), len(data), chunks)
    return digest_of(data)


def node_config(tmp: Path, origin: FaultProxy, mirror: FaultProxy) -> Config:
    """A node's config: hosts.toml for the origin's name, the mirror first."""
    certs = tmp / f"certs-{os.urandom(4).hex()}"
    write_hosts_toml(certs, origin.host, f"http://{origin.host}", [f"http://{mirror.host}"])
    return Config(http=HTTP, registry=RegistryConfig(config_path=str(certs)))


def origin_gets(origin: FaultProxy, digest: str) -> list[tuple[str | None, int]]:
    """(Range, body bytes) of the origin's blob GETs, once it is idle."""
    assert origin.wait_idle(10)
    return [
        (r.range, r.bytes)
        for r in origin.stats.log
        if r.method == "GET" and r.kind == "blob" and digest in r.path
    ]


def mirror_bytes(mirror: FaultProxy) -> int:
    assert mirror.wait_idle(10)
    return mirror.stats.bytes_of(kind="blob", method="GET")


async def test_proxy_registry_whole_blob_answer_is_not_read(
    origin: Registry,
    counted_origin: FaultProxy,
    proxy_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ranges, "RANGE_RETRY_SECONDS", 0.3)
    data = os.urandom(SIZE)
    digest = await push_blob(origin, "fleet/proxied", data)
    with FaultProxy.start(proxy_registry.url) as mirror:
        ref = parse_reference(f"{counted_origin.host}/fleet/proxied:x")
        async with RegistryClient(node_config(tmp_path, counted_origin, mirror)) as client:
            span = (16 * MiB, 17 * MiB)
            assert await client.fetch_ranges(ref, digest, [span]) == [data[16 * MiB : 17 * MiB]]
            # The proxy answered 200 with the whole blob: the client closed it at once and
            # asked the origin for the span, which it will do for this blob for a while.
            (answer,) = [r for r in mirror.stats.log if r.kind == "blob"]
            assert (answer.status, answer.range) == (200, f"bytes={span[0]}-{span[1] - 1}")
            assert mirror_bytes(mirror) < SIZE // 3, "the whole-blob answer was read"
            assert client.ranges.passed_over(f"http://{mirror.host}", digest)
            gets = origin_gets(counted_origin, digest)
            assert (f"bytes={span[0]}-{span[1] - 1}", MiB) in gets, gets
            # Meanwhile the proxy stores the blob (its own whole GET from the origin).
            blob_file = (
                proxy_registry.root
                / f"data/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
            )
            with trio.fail_after(30):
                while not (blob_file.exists() and blob_file.stat().st_size == SIZE):
                    await trio.sleep(0.1)
            await trio.sleep(0.4)  # past RANGE_RETRY_SECONDS: the proxy is asked again
            counted_origin.reset_stats()
            mirror.reset_stats()
            asked = [(100, 200), (5 * MiB, 7 * MiB), (SIZE - 10, SIZE)]
            got = await client.fetch_ranges(ref, digest, asked)
            assert got == [data[s:e] for s, e in asked]
            # The proxy logs a request once it is done with it, maybe after the client is.
            assert await trio.to_thread.run_sync(mirror.wait_idle)
            assert [r.status for r in mirror.stats.log if r.kind == "blob"] == [206] * len(asked)
            assert origin_gets(counted_origin, digest) == [], "served from the proxy's cache"
            assert not client.ranges.passed_over(f"http://{mirror.host}", digest)


async def test_nginx_slice_cache_serves_each_slice_once(
    origin: Registry, counted_origin: FaultProxy, nginx: Nginx, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    digest = await push_blob(origin, "fleet/sliced", data)
    asked = [(3 * MiB + 5, 4 * MiB + 10), (10 * MiB, 12 * MiB), (20 * MiB, 20 * MiB + 100)]
    slices = {s // MiB for a, b in asked for s in range(a, b, 1)}
    origin_after: list[int] = []
    with FaultProxy.start(nginx.url) as mirror:
        ref = parse_reference(f"{counted_origin.host}/fleet/sliced:x")
        for node in range(3):
            async with RegistryClient(node_config(tmp_path, counted_origin, mirror)) as client:
                got = await client.fetch_ranges(ref, digest, asked)
                assert got == [data[a:b] for a, b in asked]
            # A mirror is asked one range per request (several at once): nginx answers a
            # multi-range request with the whole blob, and serves single ranges from slices.
            assert mirror.wait_idle()
            answers = [(r.range, r.status) for r in mirror.stats.log if r.kind == "blob"]
            assert len(answers) == len(asked) * (node + 1), answers
            assert all(status == 206 and "," not in str(rng) for rng, status in answers)
            assert origin_gets(counted_origin, digest) and not any(
                rng is None for rng, _ in origin_gets(counted_origin, digest)
            ), "nginx asks the origin for slices, never the whole blob"
            origin_after.append(counted_origin.stats.bytes_of(kind="blob", method="GET"))
            if node == 0:
                node_read = mirror_bytes(mirror)
        # Each slice left the origin once (the whole-blob answer cost at most slice 0).
        assert origin_after[0] <= (len(slices) + 1) * MiB, origin_after
        assert origin_after[0] == origin_after[1] == origin_after[2], origin_after
        assert node_read < sum(b - a for a, b in asked) + 4 * MiB, node_read


async def test_mirror_failures_fall_back_to_the_origin(
    origin: Registry,
    counted_origin: FaultProxy,
    nginx: Nginx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(3 * MiB)
    digest = await push_blob(origin, "fleet/failing", data)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    config_digest = await push_blob(origin, "fleet/failing", config)
    manifest = ImageManifest(
        config=Desc(MEDIA_TYPE_OCI_CONFIG, config_digest, len(config)),
        layers=[Desc("application/vnd.oci.image.layer.v1.tar+gzip", digest, len(data))],
    ).to_json_bytes()
    async with RegistryClient(plain_http=True) as c:
        await c.push_manifest(
            parse_reference(f"{origin.host}/fleet/failing:v1"), manifest, MEDIA_TYPE_OCI_MANIFEST
        )
    ref = parse_reference(f"{counted_origin.host}/fleet/failing:v1")

    async def everything(client: RegistryClient, ref: Reference) -> None:
        desc = await client.resolve(ref)
        _, body = await client.get_manifest(ref.with_digest(desc.digest))
        assert body == manifest
        assert await client.read_blob(ref, digest, max_size=len(data)) == data
        assert await client.fetch_ranges(ref, digest, [(10, 20), (2 * MiB, 3 * MiB)]) == [
            data[10:20],
            data[2 * MiB : 3 * MiB],
        ]

    with FaultProxy.start(nginx.url) as mirror:
        # Unavailable (503 on everything): one retry, then the origin; then passed over.
        mirror.add_fault(Fault(kind="status", status=503))
        async with RegistryClient(node_config(tmp_path, counted_origin, mirror)) as client:
            await everything(client, ref)
            assert mirror.wait_idle()
            assert mirror.stats.count() == 1 + session.MIRROR_RETRIES, mirror.stats.by_kind()
            await everything(client, ref)
            assert mirror.stats.count() == 1 + session.MIRROR_RETRIES, "within the cooldown"
        mirror.clear()
        mirror.reset_stats()

        # Down (connections refused), then back: asked again once the cooldown is over.
        monkeypatch.setattr(session, "MIRROR_COOLDOWN", 0.5)
        mirror.down(True)
        async with RegistryClient(node_config(tmp_path, counted_origin, mirror)) as client:
            await everything(client, ref)
            mirror.down(False)
            await trio.sleep(0.6)
            counted_origin.reset_stats()
            await everything(client, ref)
            assert mirror.wait_idle()
            assert mirror.stats.count("GET", "blob") >= 2
            assert counted_origin.stats.count("GET", "blob") == 0 or all(
                r.range is not None for r in counted_origin.stats.log if r.kind == "blob"
            ), "only nginx's slice requests reach the origin"

        # Wrong answers: a corrupt manifest, a lying Content-Range, a refusal.
        for fault in (
            Fault(kind="corrupt", match=kind_is("manifest", methods=("GET",))),
            Fault(
                kind="headers",
                match=blob_get(ranged=True),
                headers=(("Content-Range", "bytes 0-9/10"),),
            ),
            Fault(kind="status", status=403, match=kind_is("manifest", "blob")),
        ):
            mirror.clear()
            mirror.add_fault(fault)
            async with RegistryClient(node_config(tmp_path, counted_origin, mirror)) as client:
                await everything(client, ref)
