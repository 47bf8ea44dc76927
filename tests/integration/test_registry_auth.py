"""RegistryAuth and RegistryHosts against a real docker-registry: TLS, htpasswd, bearer tokens.

Most requests go through raw httpx clients (`verify=endpoint.verify`, `auth=RegistryAuth(...)`),
so these tests exercise the auth and hosts layers on their own; the HTTPS token realm tests use
the registry clients the CLI and the daemon build, as wired in production.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
import trio

from snapshotter.cli.registry_args import registry_client as cli_registry_client
from snapshotter.config import Config, HttpConfig, RegistryConfig
from snapshotter.daemon import registry_client as daemon_registry_client
from snapshotter.errors import RegistryResponseError, RegistryUnavailableError
from snapshotter.registry.auth import RegistryAuth
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.hosts import RegistryHosts
from snapshotter.registry.reference import parse_reference
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.token_server import TokenServer, User

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pässword"
IDENTITY_TOKEN = "refresh-token-for-carol"


def ca_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca.cert_path))


def creds_for(table: dict[str, Credentials]) -> RegistryAuth:
    return RegistryAuth(table.get)


async def push_blob(client: httpx.AsyncClient, base: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = await client.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = httpx.URL(base).join(start.headers["location"])
    done = await client.put(location.copy_merge_params({"digest": digest}), content=data)
    assert done.status_code == 201, done.text
    return digest


async def push_image(client: httpx.AsyncClient, base: str, repo: str, tag: str) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = f"layer of {repo}".encode()
    config_digest = await push_blob(client, base, repo, config)
    layer_digest = await push_blob(client, base, repo, layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    response = await client.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert response.status_code == 201, response.text


# --- TLS with the test CA ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Registry]:
    reg = start_registry(
        tmp_path_factory.mktemp("tls-registry"),
        tls=(pki.server.cert_path, pki.server.key_path),
        ca=pki.ca.cert_path,
    )
    yield reg
    reg.stop()


def hosts_with(tmp_path: Path, host: str, text: str) -> RegistryHosts:
    (tmp_path / host).mkdir(parents=True)
    (tmp_path / host / "hosts.toml").write_text(text)
    return RegistryHosts(Config(registry=RegistryConfig(config_path=str(tmp_path))))


async def test_tls_verified_with_the_ca_from_hosts_toml(
    tls_registry: Registry, pki: Pki, tmp_path: Path
) -> None:
    hosts = hosts_with(tmp_path, tls_registry.host, f'ca = "{pki.ca.cert_path}"\n')
    (endpoint,) = hosts.endpoints(tls_registry.host, "pull")
    assert endpoint.url == f"https://{tls_registry.host}"
    async with httpx.AsyncClient(verify=endpoint.verify) as client:
        response = await client.get(f"{endpoint.url}{endpoint.path_prefix}/")
    assert response.status_code == 200


async def test_tls_without_the_ca_fails_clearly(tls_registry: Registry, tmp_path: Path) -> None:
    # On the loopback, only a hosts.toml saying https makes pysoci try TLS.
    hosts = hosts_with(tmp_path, tls_registry.host, f'server = "https://{tls_registry.host}"\n')
    (endpoint,) = hosts.endpoints(tls_registry.host, "pull")
    assert endpoint.verify is True
    async with httpx.AsyncClient(verify=endpoint.verify) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"{endpoint.url}/v2/")
    chain = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain


async def test_tls_to_a_plain_http_registry_says_what_helps(tmp_path: Path) -> None:
    """HTTPS to a registry that speaks plain HTTP: the error names --plain-http and the
    hosts.toml server line, not a CA (the old hint helped nobody)."""
    reg = start_registry(tmp_path / "plain")
    try:
        (tmp_path / "certs.d" / reg.host).mkdir(parents=True)
        (tmp_path / "certs.d" / reg.host / "hosts.toml").write_text(
            f'server = "https://{reg.host}"\n'
        )
        config = Config(registry=RegistryConfig(config_path=str(tmp_path / "certs.d")))
        async with daemon_registry_client(config) as client:
            with pytest.raises(RegistryUnavailableError) as info:
                await client.get_manifest(parse_reference(f"{reg.host}/any/repo:tag"))
        message = str(info.value)
        assert "TLS failed" in message and "--plain-http" in message
        assert f'server = "http://{reg.host}"' in message and "CA" not in message
    finally:
        reg.stop()


async def test_tls_skip_verify(tls_registry: Registry, tmp_path: Path) -> None:
    from_file = hosts_with(tmp_path, tls_registry.host, "skip_verify = true\n")
    from_flag = RegistryHosts(
        Config(registry=RegistryConfig(config_path=str(tmp_path / "none"))), skip_verify=True
    )
    for hosts in (from_file, from_flag):
        (endpoint,) = hosts.endpoints(tls_registry.host, "resolve")
        async with httpx.AsyncClient(verify=endpoint.verify) as client:
            response = await client.get(f"{endpoint.url}/v2/")
        assert response.status_code == 200


# --- htpasswd (basic auth over TLS) ---------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("basic-registry")
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    reg = start_registry(
        workdir / "run",
        tls=(pki.server.cert_path, pki.server.key_path),
        ca=pki.ca.cert_path,
        auth={"htpasswd": {"realm": "pysoci-tests", "path": str(htpasswd)}},
    )
    yield reg
    reg.stop()


async def test_basic_auth_right_credentials(basic_registry: Registry, pki: Pki) -> None:
    statuses: list[int] = []

    async def record(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    auth = creds_for({basic_registry.host: Credentials("alice", PASSWORD)})
    async with httpx.AsyncClient(
        auth=auth, verify=ca_context(pki), event_hooks={"response": [record]}
    ) as client:
        await push_image(client, basic_registry.url, "team/app", "v1")
        statuses.clear()
        response = await client.get(f"{basic_registry.url}/v2/team/app/tags/list")
    assert response.status_code == 200
    assert response.json()["tags"] == ["v1"]
    assert statuses == [200], "Basic is sent up front once the host is known to want it"


@pytest.mark.parametrize("creds", [Credentials("alice", "wrong"), None])
async def test_basic_auth_refused(
    basic_registry: Registry, pki: Pki, creds: Credentials | None
) -> None:
    table = {basic_registry.host: creds} if creds else {}
    async with httpx.AsyncClient(auth=creds_for(table), verify=ca_context(pki)) as client:
        response = await client.get(f"{basic_registry.url}/v2/team/app/tags/list")
    assert response.status_code == 401
    assert "basic" in response.headers["www-authenticate"].lower()


# --- bearer tokens ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TokenServer, Registry]]:
    workdir = tmp_path_factory.mktemp("token-registry")
    users = {
        "alice": User(PASSWORD, {"*": {"pull", "push"}}),
        "bob": User("bob-password", {"*": {"pull"}}),
        "carol": User("unused", {"*": {"pull"}}, refresh_token=IDENTITY_TOKEN),
    }
    server = TokenServer(workdir / "token", users, anonymous={"public/*": {"pull"}})
    reg = start_registry(workdir / "registry", auth=server.registry_auth())
    yield server, reg
    reg.stop()
    server.stop()


@pytest.fixture(scope="module")
def pushed(token_rig: tuple[TokenServer, Registry]) -> tuple[TokenServer, Registry]:
    server, reg = token_rig

    async def push() -> None:
        auth = creds_for({reg.host: Credentials("alice", PASSWORD)})
        async with httpx.AsyncClient(auth=auth) as client:
            await push_image(client, reg.url, "private/app", "v1")
            await push_image(client, reg.url, "public/app", "v1")

    trio.run(push)
    return server, reg


async def test_token_anonymous(pushed: tuple[TokenServer, Registry]) -> None:
    _, reg = pushed
    async with httpx.AsyncClient(auth=creds_for({})) as client:
        refused = await client.get(f"{reg.url}/v2/private/app/tags/list")
        allowed = await client.get(f"{reg.url}/v2/public/app/tags/list")
    assert refused.status_code == 401
    assert allowed.status_code == 200


async def test_token_pull_with_credentials_and_push_grant(
    pushed: tuple[TokenServer, Registry], caplog: pytest.LogCaptureFixture
) -> None:
    _, reg = pushed
    caplog.set_level(logging.DEBUG)
    bob = creds_for({reg.host: Credentials("bob", "bob-password")})
    async with httpx.AsyncClient(auth=bob) as client:
        pulled = await client.get(f"{reg.url}/v2/private/app/tags/list")
        push = await client.post(f"{reg.url}/v2/private/app/blobs/uploads/")
    assert pulled.status_code == 200
    assert pulled.json()["tags"] == ["v1"]
    assert push.status_code == 401, "bob has no push grant"
    assert "bob-password" not in caplog.text


async def test_token_wrong_password_is_an_authentication_error(
    pushed: tuple[TokenServer, Registry],
) -> None:
    from snapshotter.errors import AuthenticationError

    _, reg = pushed
    auth = creds_for({reg.host: Credentials("alice", "not-it")})
    async with httpx.AsyncClient(auth=auth) as client:
        with pytest.raises(AuthenticationError, match="refused the credentials") as info:
            await client.get(f"{reg.url}/v2/private/app/tags/list")
    assert "not-it" not in str(info.value)


async def test_token_identity_token(pushed: tuple[TokenServer, Registry]) -> None:
    server, reg = pushed
    server.reset()
    auth = creds_for({reg.host: Credentials(identity_token=IDENTITY_TOKEN)})
    async with httpx.AsyncClient(auth=auth) as client:
        response = await client.get(f"{reg.url}/v2/private/app/tags/list")
    assert response.status_code == 200
    assert [r["method"] for r in server.requests] == ["POST"]


async def test_token_cross_repository_mount(pushed: tuple[TokenServer, Registry]) -> None:
    server, reg = pushed
    auth = creds_for({reg.host: Credentials("alice", PASSWORD)})
    async with httpx.AsyncClient(auth=auth) as client:
        digest = await push_blob(client, reg.url, "private/app", b"a blob to mount")
        server.reset()
        response = await client.post(
            f"{reg.url}/v2/other/app/blobs/uploads/",
            params={"mount": digest, "from": "private/app"},
        )
    assert response.status_code == 201, response.text
    (exchange,) = server.requests
    assert sorted(exchange["scope"]) == [
        "repository:other/app:pull,push",
        "repository:private/app:pull",
    ]


async def test_token_one_exchange_for_fifty_concurrent_requests(
    pushed: tuple[TokenServer, Registry],
) -> None:
    server, reg = pushed
    server.reset()
    auth = creds_for({reg.host: Credentials("bob", "bob-password")})
    statuses: list[int] = []
    async with httpx.AsyncClient(auth=auth, limits=httpx.Limits(max_connections=100)) as client:

        async def get() -> None:
            response = await client.get(
                f"{reg.url}/v2/private/app/manifests/v1",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(get)
    assert statuses == [200] * 50
    assert server.count == 1


async def test_token_refreshed_after_expiry(pushed: tuple[TokenServer, Registry]) -> None:
    server, reg = pushed
    server.reset()
    server.expires_in = 2
    try:
        auth = creds_for({reg.host: Credentials("bob", "bob-password")})
        async with httpx.AsyncClient(auth=auth) as client:
            url = f"{reg.url}/v2/private/app/tags/list"
            assert (await client.get(url)).status_code == 200
            assert (await client.get(url)).status_code == 200
            assert server.count == 1
            await trio.sleep(2.0)
            assert (await client.get(url)).status_code == 200
            assert server.count == 2
    finally:
        server.expires_in = 300


# --- bearer tokens from an HTTPS realm (TLS registry and token server, the test CA) ------------

FAST_HTTP = HttpConfig(
    DialTimeoutMsec=2000,
    ResponseHeaderTimeoutMsec=2000,
    RequestTimeoutMsec=20000,
    MaxRetries=3,
    MinWaitMsec=1,
    MaxWaitMsec=50,
)


@pytest.fixture(scope="module")
def tls_token_rig(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[TokenServer, Registry]]:
    workdir = tmp_path_factory.mktemp("tls-token-registry")
    users = {"alice": User(PASSWORD, {"*": {"pull", "push"}})}
    server = TokenServer(
        workdir / "token", users, anonymous={}, tls=(pki.server.cert_path, pki.server.key_path)
    )
    assert server.realm.startswith("https://")
    reg = start_registry(
        workdir / "registry",
        tls=(pki.server.cert_path, pki.server.key_path),
        ca=pki.ca.cert_path,
        auth=server.registry_auth(),
    )

    async def push() -> None:
        auth = RegistryAuth(
            {reg.host: Credentials("alice", PASSWORD)}.get,
            verify=lambda *_: ca_context(pki),
        )
        async with httpx.AsyncClient(auth=auth, verify=ca_context(pki)) as client:
            await push_image(client, reg.url, "private/app", "v1")

    trio.run(push)
    yield server, reg
    reg.stop()
    server.stop()


def tls_config(tmp_path: Path, registry_host: str, ca: Path | None) -> Config:
    """Config whose hosts.toml gives `registry_host` the CA (none: no hosts.toml at all)."""
    certs = tmp_path / "certs.d"
    certs.mkdir()
    if ca is not None:
        (certs / registry_host).mkdir()
        (certs / registry_host / "hosts.toml").write_text(f'ca = "{ca}"\n')
    return Config(
        http=FAST_HTTP,
        registry=RegistryConfig(config_path=str(certs), docker_config=str(tmp_path / "docker")),
    )


def cli_args(*, skip_verify: bool = False) -> argparse.Namespace:
    return argparse.Namespace(user=f"alice:{PASSWORD}", plain_http=False, skip_verify=skip_verify)


async def test_https_token_realm_needs_its_tls_settings(
    tls_token_rig: tuple[TokenServer, Registry], pki: Pki
) -> None:
    """Without the realm's TLS settings the exchange fails at once, with a clear typed error."""
    server, reg = tls_token_rig
    server.reset()
    auth = creds_for({reg.host: Credentials("alice", PASSWORD)})
    async with httpx.AsyncClient(auth=auth, verify=ca_context(pki)) as client:
        with pytest.raises(RegistryUnavailableError, match="TLS failed") as info:
            await client.get(f"{reg.url}/v2/private/app/tags/list")
    assert PASSWORD not in str(info.value)
    assert server.count == 0


@pytest.mark.parametrize("how", ["registry-ca", "skip-verify"])
async def test_cli_client_gets_tokens_from_an_https_realm(
    tls_token_rig: tuple[TokenServer, Registry], pki: Pki, tmp_path: Path, how: str
) -> None:
    """`pysoci` commands: the registry's hosts.toml CA, or --skip-verify, covers its realm."""
    server, reg = tls_token_rig
    server.reset()
    ref = parse_reference(f"{reg.host}/private/app:v1")
    ca = pki.ca.cert_path if how == "registry-ca" else None
    args = cli_args(skip_verify=how == "skip-verify")
    async with cli_registry_client(args, tls_config(tmp_path, reg.host, ca), [ref]) as client:
        desc, _ = await client.get_manifest(ref)
    assert desc.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert [r["status"] for r in server.requests] == [200]
    assert server.requests[0]["user"] == "alice"


async def test_daemon_client_gets_tokens_from_an_https_realm(
    tls_token_rig: tuple[TokenServer, Registry], pki: Pki, tmp_path: Path
) -> None:
    server, reg = tls_token_rig
    server.reset()
    config = tls_config(tmp_path, reg.host, pki.ca.cert_path)
    docker = Path(config.registry.docker_config)
    docker.mkdir()
    pair = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": pair}}}))
    ref = parse_reference(f"{reg.host}/private/app:v1")
    async with daemon_registry_client(config) as client:
        resolved = await client.resolve(ref)
    assert resolved.digest.startswith("sha256:")
    assert [r["user"] for r in server.requests] == ["alice"]


async def test_token_requests_are_retried_like_registry_requests(
    tls_token_rig: tuple[TokenServer, Registry], pki: Pki, tmp_path: Path
) -> None:
    """429/5xx from the token server are retried within [http] MaxRetries; 501 is not."""
    server, reg = tls_token_rig
    ref = parse_reference(f"{reg.host}/private/app:v1")
    config = tls_config(tmp_path, reg.host, pki.ca.cert_path)
    server.reset()
    server.fail_with = [503, 429, 502]
    server.retry_after = "0"
    async with cli_registry_client(cli_args(), config, [ref]) as client:
        await client.get_manifest(ref)
    assert [r["status"] for r in server.requests] == [503, 429, 502, 200]

    server.reset()
    server.fail_with = [503] * (FAST_HTTP.MaxRetries + 1)
    async with cli_registry_client(cli_args(), config, [ref]) as client:
        with pytest.raises(RegistryUnavailableError, match="HTTP 503"):
            await client.get_manifest(ref)
    assert server.count == FAST_HTTP.MaxRetries + 1

    server.reset()
    server.fail_with = [501]
    async with cli_registry_client(cli_args(), config, [ref]) as client:
        with pytest.raises(RegistryResponseError, match="HTTP 501"):
            await client.get_manifest(ref)
    assert server.count == 1
