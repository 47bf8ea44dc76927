"""RegistryClient against a real docker-registry behind the fault-injecting proxy.

Transient faults (5xx/429 bursts, drops mid-body, stalls, latency) are recovered with identical
data; persistent ones (always 5xx, registry down, endless stalls) give up with a typed error
within the configured budget; corrupted, truncated or mislabelled answers are never accepted,
and nothing of them reaches the local content store.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio

from snapshotter.config import Config, HttpConfig, RegistryConfig
from snapshotter.content.layout import OciLayout
from snapshotter.content.remote import RemoteStore
from snapshotter.errors import (
    DigestMismatchError,
    ManifestError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry import manifests
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.soci.oci import (
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageManifest,
)
from tests.fixtures.fault_proxy import Fault, FaultProxy, blob_get, kind_is
from tests.fixtures.registry import Registry, start_registry

HTTP = HttpConfig(
    DialTimeoutMsec=2000,
    ResponseHeaderTimeoutMsec=2000,
    RequestTimeoutMsec=20000,
    MaxRetries=3,
    MinWaitMsec=1,
    MaxWaitMsec=20,
)
BUDGET = 5.0
"""Generous bound on how long giving up may take with HTTP (4 attempts, ≤ 20 ms waits)."""
REPO = "pysoci/faults"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    config: bytes
    layer: bytes
    manifest: bytes

    @property
    def layer_digest(self) -> str:
        return digest_of(self.layer)


def make_config(tmp: Path, http: HttpConfig = HTTP) -> Config:
    return Config(http=http, registry=RegistryConfig(config_path=str(tmp)))


def chunks(data: bytes, size: int = 256 * 1024):  # type: ignore[no-untyped-def]
    def open_data() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), size):
                yield data[i : i + size]

        return gen()

    return open_data


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A one-layer image (2 MB layer) pushed straight to the registry as REPO:v1."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer = os.urandom(2_000_000)
    manifest = ImageManifest(
        config=Descriptor(MEDIA_TYPE_OCI_CONFIG, digest_of(config), len(config)),
        layers=[Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, digest_of(layer), len(layer))],
    ).to_json_bytes()
    hosts = tmp_path_factory.mktemp("hosts")

    async def push() -> None:
        ref = parse_reference(f"{registry.host}/{REPO}:v1")
        async with RegistryClient(make_config(hosts), plain_http=True) as c:
            for blob in (config, layer):
                await c.push_blob(ref, digest_of(blob), len(blob), chunks(blob))
            await c.push_manifest(ref, manifest, MEDIA_TYPE_OCI_MANIFEST)

    trio.run(push)
    return Image(config, layer, manifest)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy.start(registry.url) as p:
        yield p


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(make_config(tmp_path), plain_http=True) as c:
        yield c


def ref_via(proxy: FaultProxy, tag: str = "v1") -> Reference:
    return parse_reference(f"{proxy.host}/{REPO}:{tag}")


def blob_gets(proxy: FaultProxy, digest: str) -> list[tuple[str | None, int, str]]:
    """(Range, status, outcome) of the blob's GETs, once the proxy is idle."""
    assert proxy.wait_idle()
    return [
        (r.range, r.status, r.outcome)
        for r in proxy.stats.log
        if r.method == "GET" and r.kind == "blob" and digest in r.path
    ]


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


# --- the proxy itself ---------------------------------------------------------------------------


async def test_passthrough_counts_and_uploads(
    proxy: FaultProxy, image: Image, tmp_path: Path
) -> None:
    async with RegistryClient(
        make_config(tmp_path),
        plain_http=True,
        monolithic_upload_limit=1 << 20,
        upload_chunk_size=400_000,
    ) as client:
        await passthrough_counts_and_uploads(proxy, client, image)


async def passthrough_counts_and_uploads(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    ref = ref_via(proxy)
    # A chunked upload through the proxy: POST, PATCHes and the closing PUT all come back to
    # the proxy, because it keeps the client's Host header and the registry's Location uses it.
    data = os.urandom(1_100_000)
    assert await client.push_blob(ref, digest_of(data), len(data), chunks(data)) is True
    assert proxy.wait_idle()
    kinds = proxy.stats.by_kind()
    assert kinds[("POST", "upload")] == 1 and kinds[("PATCH", "upload")] == 2
    assert kinds[("PUT", "upload")] == 1 and kinds[("HEAD", "blob")] == 1
    assert await client.blob_size(ref, digest_of(data)) == len(data)

    proxy.reset_stats()
    assert await client.read_blob(ref, image.layer_digest, max_size=len(image.layer)) == image.layer
    assert proxy.wait_idle()
    stats = proxy.stats
    assert stats.requests == 1 and stats.bytes_served == len(image.layer)
    (record,) = stats.log
    assert (record.method, record.kind, record.status, record.bytes) == (
        "GET",
        "blob",
        200,
        len(image.layer),
    )
    desc, raw = await client.get_manifest(ref)
    assert raw == image.manifest and desc.digest == digest_of(image.manifest)
    assert proxy.wait_idle()  # the proxy logs a request after its last byte went out
    assert proxy.stats.count("GET", "manifest") == 1


def test_chunked_request_body_and_seeded_probability(proxy: FaultProxy) -> None:
    """Raw HTTP through the proxy: a chunked PATCH body; a seeded 50% fault repeats exactly."""
    conn = http.client.HTTPConnection(proxy.host, timeout=10)
    try:
        data = os.urandom(300_000)
        conn.request("POST", f"/v2/{REPO}/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202
        location = resp.headers["Location"]
        assert location.startswith(proxy.url)
        pieces = iter([data[:70_000], data[70_000:]])
        conn.request("PATCH", location, body=pieces, encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202 and resp.headers["Range"] == f"0-{len(data) - 1}"
        sep = "&" if "?" in resp.headers["Location"] else "?"
        conn.request("PUT", f"{resp.headers['Location']}{sep}digest={digest_of(data)}", body=b"")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201

        def statuses() -> list[int]:
            handle = proxy.add_fault(
                Fault(kind="status", status=503, probability=0.5, seed=7, match=blob_get())
            )
            got = []
            for _ in range(20):
                conn.request("GET", f"/v2/{REPO}/blobs/{digest_of(data)}")
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 503 or body == data
                got.append(resp.status)
            handle.remove()
            return got

        first = statuses()
        assert first == statuses() and 3 < first.count(503) < 17
    finally:
        conn.close()


# --- transient faults are recovered -------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (502, None), (429, "0")])
async def test_status_burst_recovered(
    proxy: FaultProxy,
    client: RegistryClient,
    image: Image,
    status: int,
    retry_after: str | None,
) -> None:
    digest = image.layer_digest
    proxy.add_fault(
        Fault(
            kind="status",
            status=status,
            retry_after=retry_after,
            times=HTTP.MaxRetries,
            match=blob_get(digest),
        )
    )
    proxy.add_fault(Fault(kind="status", status=status, times=2, match=kind_is("manifest")))
    _, raw = await client.get_manifest(ref_via(proxy))
    assert raw == image.manifest
    assert await client.read_blob(ref_via(proxy), digest, max_size=len(image.layer)) == image.layer
    assert [s for _, s, _ in blob_gets(proxy, digest)] == [status] * HTTP.MaxRetries + [200]


@pytest.mark.parametrize("kind", ["drop", "truncate"])
async def test_whole_blob_resumes_after_mid_body_loss(
    proxy: FaultProxy, client: RegistryClient, image: Image, kind: str
) -> None:
    digest = image.layer_digest
    proxy.add_fault(Fault(kind=kind, after=300_000, times=2, match=blob_get(digest)))  # type: ignore[arg-type]
    streamed = b"".join([c async for c in client.fetch_blob(ref_via(proxy), digest)])
    assert streamed == image.layer
    gets = blob_gets(proxy, digest)
    assert [o for _, _, o in gets] == [
        "dropped" if kind == "drop" else "truncated",
    ] * 2 + ["ok"]
    # the retries resume where the data stopped instead of starting over
    assert gets[0][0] is None
    resumed = [resume_offset(r) for r, _, _ in gets[1:]]
    if kind == "truncate":  # FIN: everything sent arrives
        assert resumed == [300_000, 600_000]
    else:  # RST: what was in flight may be lost
        assert 0 <= resumed[0] <= 300_000 and resumed[0] <= resumed[1] <= resumed[0] + 300_000


def resume_offset(range_header: str | None) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", range_header or "bytes=0-")
    assert m is not None, range_header
    return int(m[1])


async def test_ranged_gets_retried_after_drop(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    digest = image.layer_digest
    ref = ref_via(proxy)
    proxy.add_fault(Fault(kind="drop", after=200_000, times=1, match=blob_get(digest)))
    assert await client.fetch_ranges(ref, digest, [(1000, 1_500_000)]) == [
        image.layer[1000:1_500_000]
    ]
    gets = blob_gets(proxy, digest)
    assert [(r, o) for r, _, o in gets] == [("bytes=1000-1499999", "dropped")] * 1 + [
        ("bytes=1000-1499999", "ok")
    ]
    # a multi-range (multipart) answer dropped mid-body is asked again, not half used
    proxy.reset_stats()
    asked = [(10, 20), (400_000, 900_000), (1_999_000, 2_000_000)]
    proxy.add_fault(Fault(kind="drop", after=100_000, times=1, match=blob_get(digest)))
    assert await client.fetch_ranges(ref, digest, asked) == [image.layer[s:e] for s, e in asked]
    gets = blob_gets(proxy, digest)
    assert [o for _, _, o in gets] == ["dropped", "ok"] and gets[0][0] == gets[1][0]


async def test_stall_shorter_than_read_timeout(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    digest = image.layer_digest
    proxy.add_fault(Fault(kind="stall", after=100_000, seconds=0.5, times=1, match=blob_get()))
    start = trio.current_time()
    assert await client.read_blob(ref_via(proxy), digest, max_size=len(image.layer)) == image.layer
    assert trio.current_time() - start >= 0.5
    assert len(blob_gets(proxy, digest)) == 1  # waited it out, no retry


async def test_latency(proxy: FaultProxy, client: RegistryClient, image: Image) -> None:
    proxy.set_latency(0.05)
    start = trio.current_time()
    ref = ref_via(proxy)
    _, manifest = await client.get_platform_manifest(ref)
    config = await client.read_blob(ref, manifest.config.digest, max_size=1 << 20)
    layer = await client.read_blob(ref, image.layer_digest, max_size=len(image.layer))
    elapsed = trio.current_time() - start
    assert (config, layer) == (image.config, image.layer)
    assert proxy.wait_idle()
    n = proxy.stats.requests
    assert n >= 3 and elapsed >= 0.05 * n
    assert all(r.seconds >= 0.049 for r in proxy.stats.log)


# --- persistent faults give up within the budget ------------------------------------------------


async def test_always_503_gives_up(proxy: FaultProxy, client: RegistryClient, image: Image) -> None:
    proxy.add_fault(Fault(kind="status", status=503))
    ref = ref_via(proxy)
    start = trio.current_time()
    with pytest.raises(RegistryUnavailableError, match=rf"{re.escape(proxy.host)}.*503"):
        await client.read_blob(ref, image.layer_digest, max_size=len(image.layer))
    with pytest.raises(RegistryUnavailableError, match="503"):
        await client.get_manifest(ref)
    assert trio.current_time() - start < BUDGET
    assert len(blob_gets(proxy, image.layer_digest)) == HTTP.MaxRetries + 1


async def test_retry_after_longer_than_budget_is_capped(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    proxy.add_fault(Fault(kind="status", status=429, retry_after="3600"))
    start = trio.current_time()
    with pytest.raises(RegistryUnavailableError, match="429"):
        await client.fetch_ranges(ref_via(proxy), image.layer_digest, [(0, 10)])
    assert trio.current_time() - start < BUDGET


@pytest.mark.parametrize("mode", ["refuse", "reset"])
async def test_registry_down_then_back(
    proxy: FaultProxy, client: RegistryClient, image: Image, mode: str
) -> None:
    ref = ref_via(proxy)
    assert (await client.resolve(ref)).digest == digest_of(image.manifest)  # a kept-alive conn
    proxy.down(True, mode=mode)  # type: ignore[arg-type]
    start = trio.current_time()
    with pytest.raises(RegistryUnavailableError, match=re.escape(proxy.host)):
        await client.resolve(ref)
    with pytest.raises(RegistryUnavailableError, match=re.escape(proxy.host)):
        await client.read_blob(ref, image.layer_digest, max_size=len(image.layer))
    assert trio.current_time() - start < BUDGET
    proxy.down(False)
    assert await client.read_blob(ref, image.layer_digest, max_size=len(image.layer)) == image.layer


async def test_stall_longer_than_read_timeout(
    proxy: FaultProxy, image: Image, tmp_path: Path
) -> None:
    http = replace(HTTP, ResponseHeaderTimeoutMsec=300)
    proxy.add_fault(Fault(kind="stall", after=50_000, seconds=30, match=blob_get()))
    proxy.add_fault(Fault(kind="latency", seconds=30, match=kind_is("manifest")))
    async with RegistryClient(make_config(tmp_path, http), plain_http=True) as c:
        ref = ref_via(proxy)
        start = trio.current_time()
        with pytest.raises(RegistryUnavailableError, match="ReadTimeout"):
            await c.read_blob(ref, image.layer_digest, max_size=len(image.layer))
        with pytest.raises(RegistryUnavailableError, match=re.escape(proxy.host)):
            await c.resolve(ref)  # the answer's headers never come
        assert trio.current_time() - start < BUDGET
    gets = blob_gets_now(proxy, image.layer_digest)
    assert len(gets) == HTTP.MaxRetries + 1


def blob_gets_now(proxy: FaultProxy, digest: str) -> list[str]:
    """Blob GETs started so far (stalled ones are still in flight, so not in the log)."""
    proxy.clear()  # ends nothing, but no new stalls
    proxy.stop()  # wakes the stalled requests, which then finish
    return [r.path for r in proxy.stats.log if r.method == "GET" and digest in r.path]


# --- corruption is never accepted ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, None, 1_999_999])
async def test_corrupt_blob_rejected(
    proxy: FaultProxy, client: RegistryClient, image: Image, offset: int | None
) -> None:
    proxy.add_fault(Fault(kind="corrupt", offset=offset, xor=0x01, match=blob_get()))
    ref = ref_via(proxy)
    with pytest.raises(DigestMismatchError):
        await client.read_blob(ref, image.layer_digest, max_size=len(image.layer))
    with pytest.raises(DigestMismatchError):
        async for _ in client.fetch_blob(ref, image.layer_digest):
            pass


async def test_truncated_bodies_rejected(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    ref = ref_via(proxy)
    digest = image.layer_digest
    # Every answer ends early: each resume makes a little progress, then the budget runs out.
    handle = proxy.add_fault(Fault(kind="truncate", after=100_000, match=blob_get()))
    with pytest.raises(RegistryUnavailableError, match="attempt"):
        await client.read_blob(ref, digest, max_size=len(image.layer))
    handle.remove()
    # A short body whose Content-Length was shortened too looks complete on the wire.
    handle = proxy.add_fault(
        Fault(kind="truncate", after=100_000, fix_length=True, match=blob_get())
    )
    with pytest.raises(DigestMismatchError):
        await client.read_blob(ref, digest, max_size=len(image.layer))
    with pytest.raises(RegistryResponseError):
        await client.fetch_ranges(ref, digest, [(0, 150_000)])
    handle.remove()
    proxy.add_fault(Fault(kind="truncate", after=50, fix_length=True, match=kind_is("manifest")))
    with pytest.raises(DigestMismatchError):
        await client.get_manifest(ref)


async def test_lying_headers_rejected(
    proxy: FaultProxy, client: RegistryClient, image: Image
) -> None:
    ref = ref_via(proxy)
    digest = image.layer_digest
    handle = proxy.add_fault(
        Fault(
            kind="headers",
            headers=(("Content-Range", "bytes 0-99/2000000"),),
            match=blob_get(ranged=True),
        )
    )
    with pytest.raises(RegistryResponseError, match="Content-Range"):
        await client.fetch_ranges(ref, digest, [(1000, 1100)])
    handle.remove()
    handle = proxy.add_fault(
        Fault(
            kind="headers",
            headers=(("Docker-Content-Digest", digest_of(b"other")),),
            match=kind_is("manifest"),
        )
    )
    with pytest.raises(DigestMismatchError):
        await client.get_manifest(ref)
    handle.remove()
    proxy.add_fault(
        Fault(kind="headers", headers=(("Content-Type", MEDIA_TYPE_OCI_INDEX),), match=None)
    )
    with pytest.raises(ManifestError):
        await client.get_manifest(ref)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(kind="corrupt", offset=1_234_567), DigestMismatchError),
        (Fault(kind="truncate", after=1_000_000, fix_length=True), DigestMismatchError),
        (Fault(kind="drop", after=300_000), RegistryUnavailableError),
    ],
    ids=["corrupt", "short-but-complete", "always-dropped"],
)
async def test_pull_stores_nothing_bad(
    proxy: FaultProxy,
    client: RegistryClient,
    image: Image,
    tmp_path: Path,
    fault: Fault,
    error: type[Exception],
) -> None:
    store = OciLayout.open(tmp_path / "store", create=True)
    ref = ref_via(proxy)
    proxy.add_fault(replace(fault, match=blob_get(image.layer_digest)))
    with pytest.raises(BaseException) as info:
        await RemoteStore(client, store).pull(ref)
    assert any(isinstance(e, error) for e in leaves(info.value)), info.value
    blobs = store.root / "blobs"
    assert not store.has_blob(image.layer_digest)
    assert not [p for p in blobs.rglob("*") if p.name.startswith(".tmp-")]
    assert store.tags() == []
    # the store is not poisoned: once the registry behaves, the same pull completes
    proxy.clear()
    await RemoteStore(client, store).pull(ref)
    assert store.read_blob(image.layer_digest, max_size=len(image.layer)) == image.layer
    assert not [p for p in blobs.rglob("*") if p.name.startswith(".tmp-")]


# --- bandwidth ----------------------------------------------------------------------------------


async def test_bandwidth_cap(proxy: FaultProxy, client: RegistryClient, image: Image) -> None:
    ref = ref_via(proxy)
    digest = image.layer_digest
    size = len(image.layer)
    proxy.set_bandwidth(4_000_000)
    start = trio.current_time()
    assert await client.read_blob(ref, digest, max_size=size) == image.layer
    elapsed = trio.current_time() - start
    assert 0.4 <= elapsed < 3.0
    assert proxy.wait_idle()
    assert proxy.stats.bytes_served == size == proxy.stats.bytes_of("blob", "GET")
    # the cap is shared: two transfers at once at 8 MB/s take as long as one at 4 MB/s
    proxy.set_bandwidth(8_000_000)
    proxy.reset_stats()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(partial(client.read_blob, ref, digest, max_size=size))
    assert 0.4 <= trio.current_time() - start < 3.0
    assert proxy.wait_idle()
    assert proxy.stats.bytes_served == 2 * size


async def test_manifests_read_once_per_pull(
    proxy: FaultProxy, client: RegistryClient, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer's Prepare looks the image up again: a tag's answer is reused for a few
    seconds, a digest's longer, and concurrent look-ups share one request."""
    monkeypatch.setattr(manifests, "TAG_CACHE_SECONDS", 0.5)
    ref = ref_via(proxy)
    digest = digest_of(image.manifest)

    async def lookup() -> None:
        desc, body = await client.get_manifest(ref)
        assert (desc.digest, body) == (digest, image.manifest)
        _, body = await client.get_manifest(ref.with_digest(digest))
        assert body == image.manifest
        assert (await client.resolve(ref)).digest == digest

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(lookup)
    await lookup()
    assert proxy.wait_idle()
    gets = [r.path for r in proxy.stats.log if r.kind == "manifest"]
    assert gets == [f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/manifests/{digest}"], gets
    await trio.sleep(0.6)  # the tag may have moved: asked again, the digest still cached
    await lookup()
    assert proxy.wait_idle()
    assert [r.path for r in proxy.stats.log if r.kind == "manifest"][2:] == [
        f"/v2/{REPO}/manifests/v1"
    ]
    # A tag pushed through this client is read afresh.
    other = json.loads(image.manifest)
    other["annotations"] = {"moved": "yes"}
    moved = json.dumps(other).encode()
    await client.push_manifest(ref, moved, MEDIA_TYPE_OCI_MANIFEST)
    assert (await client.get_manifest(ref))[1] == moved
    await client.push_manifest(ref, image.manifest, MEDIA_TYPE_OCI_MANIFEST)
