"""RegistryClient against a real docker-registry (distribution 2.8) and a fault-injecting server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from snapshotter.config import (
    BlobConfig,
    Config,
    HostResolverConfig,
    HttpConfig,
    MirrorConfig,
    RegistryConfig,
    ResolverConfig,
)
from snapshotter.errors import (
    AuthenticationError,
    DigestMismatchError,
    ManifestError,
    RegistryNotFoundError,
    RegistryResponseError,
    RegistryUnavailableError,
)
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.ranges import parse_multipart_byteranges
from snapshotter.registry.reference import parse_reference
from snapshotter.registry.transport import backoff_seconds, retry_after_seconds
from snapshotter.soci.oci import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
)
from tests.fixtures.faulty_server import FaultyServer, Script, digest_of
from tests.fixtures.registry import Registry, start_registry

HTTP = HttpConfig(
    DialTimeoutMsec=2000,
    ResponseHeaderTimeoutMsec=2000,
    RequestTimeoutMsec=20000,
    MaxRetries=3,
    MinWaitMsec=1,
    MaxWaitMsec=20,
)


def make_config(tmp: Path, mirrors: dict[str, str] | None = None) -> Config:
    resolver = ResolverConfig(
        host={
            reg: HostResolverConfig(mirrors=(MirrorConfig(host=m, insecure=True),))
            for reg, m in (mirrors or {}).items()
        }
    )
    return Config(http=HTTP, resolver=resolver, registry=RegistryConfig(config_path=str(tmp)))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def faulty() -> Iterator[FaultyServer]:
    with FaultyServer() as server:
        yield server


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(make_config(tmp_path), plain_http=True) as c:
        yield c


def chunks(data: bytes, size: int = 100_000):  # type: ignore[no-untyped-def]
    def open_data() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), size):
                yield data[i : i + size]

        return gen()

    return open_data


async def push_image(
    client: RegistryClient, ref_text: str, layer: bytes, arch: str = "amd64"
) -> tuple[Descriptor, ImageManifest]:
    ref = parse_reference(ref_text)
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers"}}
    ).encode()
    for blob in (config, layer):
        await client.push_blob(ref, digest_of(blob), len(blob), chunks(blob))
    manifest = ImageManifest(
        config=Descriptor(MEDIA_TYPE_OCI_CONFIG, digest_of(config), len(config)),
        layers=[Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, digest_of(layer), len(layer))],
    )
    data = manifest.to_json_bytes()
    desc = await client.push_manifest(ref, data, MEDIA_TYPE_OCI_MANIFEST)
    return desc, manifest


# --- real registry ---------------------------------------------------------------------------


async def test_push_pull_blob_monolithic(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/blobs:x")
    data = os.urandom(300_000)
    digest = digest_of(data)
    assert not await client.blob_exists(ref, digest)
    assert await client.push_blob(ref, digest, len(data), chunks(data)) is True
    assert await client.push_blob(ref, digest, len(data), chunks(data)) is False
    assert await client.blob_exists(ref, digest)
    assert await client.blob_size(ref, digest) == len(data)
    assert await client.read_blob(ref, digest, max_size=len(data)) == data
    streamed = b"".join([c async for c in client.fetch_blob(ref, digest)])
    assert streamed == data
    with pytest.raises(RegistryResponseError, match="limit"):
        await client.read_blob(ref, digest, max_size=len(data) - 1)


async def test_push_chunked_and_mount(registry: Registry, tmp_path: Path) -> None:
    async with RegistryClient(
        make_config(tmp_path),
        plain_http=True,
        monolithic_upload_limit=1 << 20,
        upload_chunk_size=1 << 20,
    ) as client:
        await push_chunked_and_mount(registry, client)


async def push_chunked_and_mount(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/chunked:x")
    data = os.urandom(2_500_000)
    digest = digest_of(data)
    assert await client.push_blob(ref, digest, len(data), chunks(data, 300_000)) is True
    assert await client.read_blob(ref, digest, max_size=len(data)) == data
    other = parse_reference(f"{registry.host}/pysoci/mounted:x")
    assert not await client.blob_exists(other, digest)
    assert (
        await client.push_blob(other, digest, len(data), chunks(data), mount_from="pysoci/chunked")
        is False
    )
    assert await client.blob_size(other, digest) == len(data)


async def test_push_rejects_wrong_data(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/wrong:x")
    data = b"hello world"
    with pytest.raises(DigestMismatchError):
        await client.push_blob(ref, digest_of(b"other data!"), len(data), chunks(data))
    with pytest.raises(ValueError):
        await client.push_blob(ref, digest_of(data), len(data) + 1, chunks(data))
    assert not await client.blob_exists(ref, digest_of(data))


async def test_manifests(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/image:v1")
    desc, manifest = await push_image(client, str(ref), os.urandom(1000))
    resolved = await client.resolve(ref)
    assert resolved == Descriptor(MEDIA_TYPE_OCI_MANIFEST, desc.digest, desc.size)
    got_desc, data = await client.get_manifest(ref)
    assert got_desc.digest == desc.digest and data == manifest.to_json_bytes()
    by_digest = ref.with_tag(None).with_digest(desc.digest)
    assert (await client.get_manifest(by_digest))[1] == data
    assert (await client.resolve(by_digest)).digest == desc.digest
    # PUT by digest
    other = ImageManifest(config=manifest.config, layers=manifest.layers, annotations={"a": "b"})
    raw = other.to_json_bytes()
    pushed = await client.push_manifest(
        by_digest.with_digest(other.digest), raw, MEDIA_TYPE_OCI_MANIFEST
    )
    assert pushed.digest == other.digest
    assert (await client.get_manifest(ref.with_digest(other.digest)))[1] == raw
    _, parsed = await client.get_platform_manifest(ref)
    assert parsed.raw_bytes() == data


async def test_platform_manifest_from_index(registry: Registry, client: RegistryClient) -> None:
    base = f"{registry.host}/pysoci/multi"
    amd, _ = await push_image(client, base + ":amd64", os.urandom(500), "amd64")
    arm, arm_manifest = await push_image(client, base + ":arm64", os.urandom(500), "arm64")
    index = ImageIndex(
        manifests=[
            Descriptor(amd.media_type, amd.digest, amd.size, platform=Platform("linux", "amd64")),
            Descriptor(
                arm.media_type, arm.digest, arm.size, platform=Platform("linux", "arm64", "v8")
            ),
        ]
    )
    ref = parse_reference(base + ":latest")
    await client.push_manifest(ref, index.to_json_bytes(), MEDIA_TYPE_OCI_INDEX)
    assert (await client.resolve(ref)).media_type == MEDIA_TYPE_OCI_INDEX
    desc, manifest = await client.get_platform_manifest(ref, Platform("linux", "arm64"))
    assert desc.digest == arm.digest and desc.platform == Platform("linux", "arm64", "v8")
    assert manifest.layers == arm_manifest.layers
    with pytest.raises(ManifestError, match="no manifest for platform"):
        await client.get_platform_manifest(ref, Platform("linux", "s390x"))


async def test_ranges_on_distribution(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/ranges:x")
    data = os.urandom(200_000)
    digest = digest_of(data)
    await client.push_blob(ref, digest, len(data), chunks(data))
    assert await client.fetch_ranges(ref, digest, [(10, 20)]) == [data[10:20]]
    asked = [(150_000, 150_100), (0, 5), (1000, 1000), (4, 9), (199_990, 200_000)]
    assert await client.fetch_ranges(ref, digest, asked) == [data[s:e] for s, e in asked]
    # distribution 2.8 (filesystem driver, Go's ServeContent) answers multipart/byteranges,
    # so the client never had to fall back to single ranges.
    assert not client.ranges.single_range_hosts
    assert await client.fetch_ranges(ref, digest, []) == []
    with pytest.raises(RegistryResponseError):
        await client.fetch_ranges(ref, digest, [(199_990, 200_001)])


async def test_referrers_fallback_tag(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/refs:v1")
    subject, _ = await push_image(client, str(ref), os.urandom(100))
    assert await client.referrers(ref, subject.digest) == []
    art, _ = await push_image(client, f"{registry.host}/pysoci/refs:art", os.urandom(100))
    soci = "application/vnd.amazon.soci.index.v1+json"
    entry = Descriptor(art.media_type, art.digest, art.size, artifact_type=soci)
    other = Descriptor(art.media_type, art.digest, art.size, artifact_type="application/x-other")
    fallback = ImageIndex(manifests=[entry, other])
    tag = ref.with_tag("sha256-" + subject.digest.split(":")[1])
    await client.push_manifest(tag, fallback.to_json_bytes(), MEDIA_TYPE_OCI_INDEX)
    assert await client.referrers(ref, subject.digest) == [entry, other]
    assert await client.referrers(ref, subject.digest, soci) == [entry]
    assert await client.referrers(ref, subject.digest, "application/x-none") == []


async def test_not_found(registry: Registry, client: RegistryClient) -> None:
    ref = parse_reference(f"{registry.host}/pysoci/absent:nope")
    missing = digest_of(b"missing")
    with pytest.raises(RegistryNotFoundError, match="absent:nope"):
        await client.resolve(ref)
    with pytest.raises(RegistryNotFoundError, match="absent"):
        await client.get_manifest(ref)
    with pytest.raises(RegistryNotFoundError):
        await client.get_manifest(ref.with_digest(missing))
    with pytest.raises(RegistryNotFoundError, match=missing):
        await client.blob_size(ref, missing)
    with pytest.raises(RegistryNotFoundError):
        await client.read_blob(ref, missing, max_size=10)
    with pytest.raises(RegistryNotFoundError):
        await client.fetch_ranges(ref, missing, [(0, 1)])
    assert not await client.blob_exists(ref, missing)


async def test_mirror_falls_back_to_registry(
    registry: Registry, faulty: FaultyServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {registry.host: faulty.host})
    async with RegistryClient(config, plain_http=True) as c:
        ref = parse_reference(f"{registry.host}/pysoci/mirrored:x")
        data = os.urandom(1000)
        await c.push_blob(ref, digest_of(data), len(data), chunks(data))
        assert await c.read_blob(ref, digest_of(data), max_size=1000) == data
        assert faulty.count("GET", path="/blobs/") == 1
        assert "ns=" in faulty.requests[0].path
        cached = os.urandom(1000)
        faulty.add_blob(cached)
        assert await c.read_blob(ref, digest_of(cached), max_size=1000) == cached


# --- fault injection ---------------------------------------------------------------------------


@pytest.fixture
async def fclient(faulty: FaultyServer, tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(make_config(tmp_path), plain_http=True) as c:
        yield c


BLOB = bytes(range(256)) * 400
ASK = [(5000, 5100), (10, 20), (90_000, 90_050)]


def fref(server: FaultyServer) -> object:
    return parse_reference(f"{server.host}/faulty/repo:x")


@pytest.mark.parametrize("mode", ["multipart", "reversed", "coalesced", "ignore"])
async def test_multi_range_answers(
    faulty: FaultyServer, fclient: RegistryClient, mode: str
) -> None:
    digest = faulty.add_blob(BLOB, Script(multi_range=mode))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.fetch_ranges(ref, digest, ASK) == [BLOB[s:e] for s, e in ASK]
    assert faulty.count("GET") == 1
    assert faulty.requests[0].headers["range"] == "bytes=10-19,5000-5099,90000-90049"
    assert faulty.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("mode", ["416", "501", "garbage", "first_only"])
async def test_multi_range_fallback(
    faulty: FaultyServer, fclient: RegistryClient, mode: str
) -> None:
    digest = faulty.add_blob(BLOB, Script(multi_range=mode))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.fetch_ranges(ref, digest, ASK) == [BLOB[s:e] for s, e in ASK]
    assert faulty.count("GET") == 1 + len(ASK)
    faulty.reset_log()
    assert await fclient.fetch_ranges(ref, digest, ASK) == [BLOB[s:e] for s, e in ASK]
    assert faulty.count("GET") == len(ASK)  # remembered: single ranges only


async def test_force_single_range(faulty: FaultyServer, tmp_path: Path) -> None:
    digest = faulty.add_blob(BLOB)
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    async with RegistryClient(make_config(tmp_path), plain_http=True, force_single_range=True) as c:
        assert await c.fetch_ranges(ref, digest, ASK) == [BLOB[s:e] for s, e in ASK]
    assert all("," not in r.headers["range"] for r in faulty.requests)


async def test_wrong_content_range(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(wrong_content_range=True))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(RegistryResponseError, match="Content-Range"):
        await fclient.fetch_ranges(ref, digest, [(100, 200)])


async def test_single_range_ignored(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(ignore_range=True))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.fetch_ranges(ref, digest, [(100, 200)]) == [BLOB[100:200]]


async def test_retries_5xx_then_success(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(statuses=[500, 502, 503]))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.read_blob(ref, digest, max_size=len(BLOB)) == BLOB
    assert faulty.count("GET") == 4


async def test_retry_after(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(statuses=[429], retry_after="0"))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.fetch_ranges(ref, digest, [(0, 10)]) == [BLOB[:10]]
    assert faulty.count("GET") == 2


async def test_501_not_retried(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(statuses=[501]))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(RegistryResponseError, match="501"):
        await fclient.read_blob(ref, digest, max_size=len(BLOB))
    assert faulty.count("GET") == 1


async def test_persistent_503_gives_up(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(statuses=[503] * 10))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(RegistryUnavailableError, match="503"):
        await fclient.fetch_ranges(ref, digest, [(0, 10)])
    assert faulty.count("GET") == HTTP.MaxRetries + 1


async def test_connection_refused(tmp_path: Path) -> None:
    from tests.fixtures.registry import free_port

    ref = parse_reference(f"127.0.0.1:{free_port()}/a/b:c")
    async with RegistryClient(make_config(tmp_path), plain_http=True) as c:
        with pytest.raises(RegistryUnavailableError, match=r"127\.0\.0\.1.*4 attempt"):
            await c.resolve(ref)


async def test_reset_mid_body_resumes(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(resets=2))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    streamed = b"".join([c async for c in fclient.fetch_blob(ref, digest)])
    assert streamed == BLOB
    gets = [r for r in faulty.requests if r.method == "GET"]
    assert len(gets) == 3 and gets[1].headers.get("range", "").startswith("bytes=")


async def test_reset_during_range(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(resets=1))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    assert await fclient.fetch_ranges(ref, digest, [(0, 50_000)]) == [BLOB[:50_000]]
    assert faulty.count("GET") == 2


async def test_truncated_body(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(truncations=100))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(RegistryResponseError, match="more than"):  # Content-Length > range
        await fclient.fetch_ranges(ref, digest, [(0, 100)])
    # The body ends early; resuming at the real end gets 416: never accepted as complete.
    with pytest.raises((RegistryUnavailableError, RegistryResponseError)):
        await fclient.read_blob(ref, digest, max_size=2 * len(BLOB))


async def test_corrupt_blob(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(corrupt=True))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(DigestMismatchError):
        await fclient.read_blob(ref, digest, max_size=len(BLOB))


async def test_redirects_cached_and_reresolved(faulty: FaultyServer, tmp_path: Path) -> None:
    digest = faulty.add_blob(BLOB, Script(redirect=True, url_uses=2))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    auth = httpx.BasicAuth("user", "s3cret")
    async with RegistryClient(make_config(tmp_path), plain_http=True, auth=auth) as c:
        assert await c.fetch_ranges(ref, digest, [(0, 10)]) == [BLOB[:10]]
        assert await c.fetch_ranges(ref, digest, [(10, 20)]) == [BLOB[10:20]]
        assert faulty.count("GET", "registry") == 1  # second one went straight to storage
        assert await c.fetch_ranges(ref, digest, [(20, 30), (40, 50)]) == [BLOB[20:30], BLOB[40:50]]
        assert faulty.count("GET", "registry") == 2  # the URL expired (403) and was re-resolved
        assert await c.read_blob(ref, digest, max_size=len(BLOB)) == BLOB
    storage = [r for r in faulty.requests if r.server == "storage"]
    assert storage and all("authorization" not in r.headers for r in storage)
    assert all(r.headers.get("range") for r in storage[:3])
    assert all("authorization" in r.headers for r in faulty.requests if r.server == "registry")


@pytest.mark.parametrize("valid_interval", [0, 1])
async def test_redirect_cache_lasts_valid_interval(
    faulty: FaultyServer, tmp_path: Path, valid_interval: int
) -> None:
    digest = faulty.add_blob(BLOB, Script(redirect=True))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    config = dataclasses.replace(
        make_config(tmp_path), blob=BlobConfig(valid_interval=valid_interval)
    )
    async with RegistryClient(config, plain_http=True) as c:
        for i in range(2):
            assert await c.fetch_ranges(ref, digest, [(i, i + 10)]) == [BLOB[i : i + 10]]
        assert faulty.count("GET", "registry") == (2 if valid_interval == 0 else 1)
        await trio.sleep(1.1)
        assert await c.fetch_ranges(ref, digest, [(5, 15)]) == [BLOB[5:15]]
        assert faulty.count("GET", "registry") == (3 if valid_interval == 0 else 2)
    assert faulty.count("GET", "storage") == 3, "the storage URL itself never expired"


async def test_redirect_loop(faulty: FaultyServer, fclient: RegistryClient) -> None:
    digest = faulty.add_blob(BLOB, Script(redirect_loop=True))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    with pytest.raises(RegistryResponseError, match="redirects"):
        await fclient.fetch_ranges(ref, digest, [(0, 10)])


async def test_auth_error_hides_credentials(faulty: FaultyServer, tmp_path: Path) -> None:
    digest = faulty.add_blob(BLOB, Script(statuses=[401]))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    async with RegistryClient(
        make_config(tmp_path), plain_http=True, auth=httpx.BasicAuth("user", "s3cret")
    ) as c:
        with pytest.raises(AuthenticationError) as info:
            await c.read_blob(ref, digest, max_size=len(BLOB))
        assert "s3cret" not in str(info.value) and "s3cret" not in repr(c)


def manifest_bytes(extra: int = 0) -> bytes:
    m = ImageManifest(
        config=Descriptor(MEDIA_TYPE_OCI_CONFIG, digest_of(b"{}"), 2),
        annotations={"pad": "x" * extra} if extra else {},
    )
    return m.to_json_bytes()


async def test_manifest_faults(faulty: FaultyServer, fclient: RegistryClient) -> None:
    base = f"{faulty.host}/faulty/repo"
    good = manifest_bytes()
    faulty.add_manifest("good", good, MEDIA_TYPE_OCI_MANIFEST, script=Script(statuses=[503]))
    desc, data = await fclient.get_manifest(parse_reference(base + ":good"))
    assert data == good and desc.digest == digest_of(good)
    faulty.add_manifest("big", manifest_bytes(5 << 20), MEDIA_TYPE_OCI_MANIFEST)
    with pytest.raises(RegistryResponseError, match="limit"):
        await fclient.get_manifest(parse_reference(base + ":big"))
    faulty.add_manifest(
        "bigchunked",
        manifest_bytes(5 << 20),
        MEDIA_TYPE_OCI_MANIFEST,
        {"Transfer-Encoding": "chunked"},
    )
    with pytest.raises(RegistryResponseError, match="limit"):
        await fclient.get_manifest(parse_reference(base + ":bigchunked"))
    wrong = digest_of(b"not it")
    faulty.add_manifest(wrong, good, MEDIA_TYPE_OCI_MANIFEST)
    with pytest.raises(DigestMismatchError):
        await fclient.get_manifest(parse_reference(f"{base}@{wrong}"))
    faulty.add_manifest("lying", good, MEDIA_TYPE_OCI_MANIFEST, {"Docker-Content-Digest": wrong})
    with pytest.raises(DigestMismatchError):
        await fclient.get_manifest(parse_reference(base + ":lying"))
    faulty.add_manifest("json", b"{not json", MEDIA_TYPE_OCI_MANIFEST)
    with pytest.raises(ManifestError):
        await fclient.get_manifest(parse_reference(base + ":json"))
    faulty.add_manifest("kind", good, MEDIA_TYPE_OCI_INDEX)
    with pytest.raises(ManifestError):
        await fclient.get_manifest(parse_reference(base + ":kind"))
    # HEAD without a digest header falls back to GET, which gives the digest of the body
    docker = good.replace(MEDIA_TYPE_OCI_MANIFEST.encode(), MEDIA_TYPE_DOCKER_MANIFEST.encode())
    faulty.add_manifest(
        "nodigest", docker, MEDIA_TYPE_DOCKER_MANIFEST, {"Docker-Content-Digest": None}
    )
    faulty.reset_log()
    resolved = await fclient.resolve(parse_reference(base + ":nodigest"))
    assert resolved == Descriptor(MEDIA_TYPE_DOCKER_MANIFEST, digest_of(docker), len(docker))
    assert [r.method for r in faulty.requests] == ["HEAD", "GET"]
    # An empty digest header is not "no header": a registry that lies is refused
    faulty.add_manifest(
        "emptydigest", docker, MEDIA_TYPE_DOCKER_MANIFEST, {"Docker-Content-Digest": ""}
    )
    with pytest.raises(RegistryResponseError, match="Docker-Content-Digest"):
        await fclient.resolve(parse_reference(base + ":emptydigest"))
    with pytest.raises(RegistryNotFoundError, match="unknown"):
        await fclient.get_manifest(parse_reference(base + ":missing"))


# --- the referrers API (distribution 2.8 has none: the fault server answers it) -------------

SOCI_V1 = "application/vnd.amazon.soci.index.v1+json"


def referrer(n: int, artifact_type: str = SOCI_V1) -> Descriptor:
    return Descriptor(
        MEDIA_TYPE_OCI_MANIFEST, digest_of(b"ref %d" % n), 100 + n, artifact_type=artifact_type
    )


def referrers_page(*entries: Descriptor) -> tuple[str, bytes]:
    return MEDIA_TYPE_OCI_INDEX, ImageIndex(manifests=list(entries)).to_json_bytes()


async def test_referrers_api_pages(faulty: FaultyServer, fclient: RegistryClient) -> None:
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    subject = digest_of(b"subject")
    other = referrer(3, "application/x-other")
    faulty.add_referrers(
        subject,
        [referrers_page(referrer(1), other), referrers_page(), referrers_page(referrer(2))],
    )
    assert await fclient.referrers(ref, subject) == [referrer(1), other, referrer(2)]
    gets = [r.path for r in faulty.requests]
    assert len(gets) == 3 and all(f"/v2/faulty/repo/referrers/{subject}" in g for g in gets)
    assert all(r.headers["accept"] == MEDIA_TYPE_OCI_INDEX for r in faulty.requests)
    assert faulty.count(path="/manifests/") == 0, "no fallback tag when the API answers"
    faulty.reset_log()
    assert await fclient.referrers(ref, subject, SOCI_V1) == [referrer(1), referrer(2)]
    assert all("artifactType=" in r.path for r in faulty.requests), "filter asked of the server"


async def test_referrers_api_empty_or_missing(
    faulty: FaultyServer, fclient: RegistryClient
) -> None:
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    subject = digest_of(b"lonely subject")
    faulty.add_referrers(subject, [referrers_page()])
    assert await fclient.referrers(ref, subject) == []
    assert faulty.count(path="/manifests/") == 0
    # 404 (no referrers API) and a first answer that is no index: the fallback tag
    for pages in (None, [("text/html", b"<html>hello</html>")]):
        faulty.reset_log()
        unknown = digest_of(b"unknown %r" % pages)
        if pages is not None:
            faulty.add_referrers(unknown, pages)
        tag = unknown.replace(":", "-")
        media_type, body = referrers_page(referrer(4))
        faulty.add_manifest(tag, body, media_type)
        assert await fclient.referrers(ref, unknown) == [referrer(4)]
        assert faulty.count("GET", path=f"/manifests/{tag}") == 1


@pytest.mark.parametrize(
    "pages",
    [
        "later page not an index",
        "manifest as index",
        "not json",
        "link elsewhere",
        "later page missing",
    ],
)
async def test_referrers_api_bad_answers(
    faulty: FaultyServer, fclient: RegistryClient, pages: str
) -> None:
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    subject = digest_of(b"subject")
    first = referrers_page(referrer(1))
    answers = {
        "later page not an index": [first, ("application/json", b"{}")],
        "manifest as index": [(MEDIA_TYPE_OCI_INDEX, manifest_bytes())],
        "not json": [(MEDIA_TYPE_OCI_INDEX, b"{not json")],
        "link elsewhere": [first, first],
        "later page missing": [first, first],
    }[pages]
    faulty.add_referrers(subject, answers)
    if pages == "link elsewhere":
        faulty.next_link = f"http://{faulty.storage_host}/v2/faulty/repo/referrers/{subject}"
    if pages == "later page missing":
        faulty.next_link = f"/v2/faulty/repo/referrers/{subject}?page=7"
    with pytest.raises((RegistryResponseError, RegistryNotFoundError)) as info:
        await fclient.referrers(ref, subject)
    if pages == "later page missing":
        assert isinstance(info.value, RegistryNotFoundError)
    else:
        assert isinstance(info.value, RegistryResponseError)
    assert faulty.count(server="storage") == 0
    assert faulty.count(path="/manifests/") == 0, "a broken API answer is not a missing API"


# --- pure helpers ----------------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_backoff_bounds() -> None:
    for attempt in range(40):
        for r in (0.0, 0.5, 0.999):
            wait = backoff_seconds(HTTP, attempt, lambda r=r: r)
            assert HTTP.MinWaitMsec / 1000 <= wait <= HTTP.MaxWaitMsec / 1000


def test_multipart_parser_rejects_lies() -> None:
    good = (
        b"--B\r\nContent-Range: bytes 0-2/10\r\n\r\nabc\r\n--B\r\n"
        b"Content-Range: bytes 5-5/10\r\n\r\nf\r\n--B--\r\n"
    )
    assert parse_multipart_byteranges(good, b"B", "x") == [(0, b"abc"), (5, b"f")]
    for bad in (
        good.replace(b"0-2/10", b"0-3/10"),
        good.replace(b"0-2/10", b"2-0/10"),
        good.replace(b"5-5/10", b"5-5/5"),
        good[:20],
        b"",
        good.replace(b"Content-Range", b"Content-Rang"),
    ):
        with pytest.raises(RegistryResponseError):
            parse_multipart_byteranges(bad, b"B", "x")
    assert hashlib  # keep import used


class RecordingSink:
    """A RangeSink keeping what the fetch fed it since its last restart."""

    def __init__(self) -> None:
        self.restarts = 0
        self.fed = bytearray()

    def restart(self) -> None:
        self.restarts += 1
        self.fed.clear()

    def data(self, chunk: bytes) -> None:
        self.fed += chunk


async def test_a_one_range_fetch_streams_to_its_sink(
    registry: Registry, client: RegistryClient
) -> None:
    """The span manager inflates a span while it arrives: the sink sees exactly the range's
    bytes, in order; with several ranges it is not used."""
    ref = parse_reference(f"{registry.host}/pysoci/stream:x")
    data = os.urandom(3 << 20)
    digest = digest_of(data)
    await client.push_blob(ref, digest, len(data), chunks(data))
    sink = RecordingSink()
    assert await client.fetch_ranges(ref, digest, [(1000, 2_500_000)], sink) == [
        data[1000:2_500_000]
    ]
    assert sink.restarts == 1 and bytes(sink.fed) == data[1000:2_500_000]
    other = RecordingSink()
    await client.fetch_ranges(ref, digest, [(0, 10), (100, 200)], other)
    assert other.restarts == 0 and not other.fed


async def test_a_retried_range_restarts_its_sink(
    faulty: FaultyServer, fclient: RegistryClient
) -> None:
    """A connection reset after half the body: the retry restarts the sink, which then holds
    the range once, not the broken half followed by the whole."""
    digest = faulty.add_blob(BLOB, Script(resets=1))
    ref = parse_reference(f"{faulty.host}/faulty/repo:x")
    sink = RecordingSink()
    assert await fclient.fetch_ranges(ref, digest, [(100, 90_000)], sink) == [BLOB[100:90_000]]
    assert sink.restarts == 2 and bytes(sink.fed) == BLOB[100:90_000]
