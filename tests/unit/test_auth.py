"""RegistryAuth: WWW-Authenticate parsing, scopes, and the Basic/Bearer flows (mock transport)."""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.config import Config, HttpConfig, RegistryConfig
from snapshotter.errors import AuthenticationError, RegistryResponseError, RegistryUnavailableError
from snapshotter.registry.auth import (
    Challenge,
    RegistryAuth,
    normalize_scopes,
    parse_challenges,
    request_scopes,
)
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.hosts import RegistryHosts
from tests.fixtures.certs import make_pki

SECRET = "p4ssw0rd-never-logged"
REGISTRY = "https://registry.example"
REALM = "https://auth.example/token"
FAST = HttpConfig(
    DialTimeoutMsec=1500,
    ResponseHeaderTimeoutMsec=2500,
    RequestTimeoutMsec=20_000,
    MaxRetries=3,
    MinWaitMsec=1,
    MaxWaitMsec=10_000,
)

# --- WWW-Authenticate ----------------------------------------------------------------------


def test_parse_bearer_and_basic() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "registry.example",
                "scope": "repository:a/b:pull,push repository:c:pull",
            },
        )
    ]
    assert parse_challenges('Basic realm="Registry Realm"') == [
        Challenge("basic", {"realm": "Registry Realm"})
    ]


def test_parse_several_challenges_escapes_and_token68() -> None:
    header = (
        'Newauth realm="apps", type=1, title="Login to \\"apps\\", ok",  '
        'BASIC Realm = "simple" , Negotiate abc+/def==, Empty'
    )
    assert parse_challenges([header, "Bearer realm=https://x/t"]) == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps", ok'}),
        Challenge("basic", {"realm": "simple"}),
        Challenge("negotiate", {}, token68="abc+/def=="),
        Challenge("empty", {}),
        Challenge("bearer", {"realm": "https://x/t"}),
    ]
    assert parse_challenges("") == []


@pytest.mark.parametrize(
    "header",
    ['Bearer realm="unterminated', "realm=x", "Bearer realm=x y", "Bearer =x", 'Bearer a="x\\'],
)
def test_parse_malformed(header: str) -> None:
    with pytest.raises(RegistryResponseError, match="WWW-Authenticate"):
        parse_challenges(header)


@given(st.text())
def test_parse_never_fails_untyped(text: str) -> None:
    try:
        result = parse_challenges(text)
    except RegistryResponseError:
        return
    assert all(isinstance(c, Challenge) and c.scheme for c in result)


TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~", min_size=1
)


@given(
    st.lists(
        st.tuples(TOKEN, st.dictionaries(TOKEN.map(str.lower), st.text(), min_size=1)), max_size=4
    )
)
def test_parse_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = ", ".join(
        scheme + " " + ", ".join(f"{k}={quote(v)}" for k, v in params.items())
        for scheme, params in challenges
    )
    parsed = parse_challenges(header)
    assert [(c.scheme, c.params) for c in parsed] == [(s.lower(), p) for s, p in challenges]


# --- scopes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "scopes"),
    [
        ("GET", "/v2/library/ubuntu/manifests/latest", ["repository:library/ubuntu:pull"]),
        ("HEAD", "/v2/a/blobs/sha256:abc", ["repository:a:pull"]),
        ("GET", "/v2/a/blobs/b/tags/list", ["repository:a/blobs/b:pull"]),
        ("GET", "/v2/a/referrers/sha256:abc", ["repository:a:pull"]),
        ("POST", "/v2/a/b/blobs/uploads/", ["repository:a/b:pull,push"]),
        ("PATCH", "/v2/a/b/blobs/uploads/uuid-1", ["repository:a/b:pull,push"]),
        ("PUT", "/v2/a/manifests/v1", ["repository:a:pull,push"]),
        (
            "POST",
            "/v2/dst/blobs/uploads/?mount=sha256:abc&from=src/x",
            ["repository:dst:pull,push", "repository:src/x:pull"],
        ),
        ("GET", "/mirror/v2/a/manifests/v1?ns=docker.io", ["repository:a:pull"]),
        ("GET", "/v2/", []),
        ("GET", "/v2/_catalog", []),
    ],
)
def test_request_scopes(method: str, url: str, scopes: list[str]) -> None:
    request = httpx.Request(method, REGISTRY + url)
    assert list(request_scopes(request)) == scopes


def test_normalize_scopes() -> None:
    assert normalize_scopes(
        ["repository:a:push", "repository:a:pull", "registry:catalog:*", "odd", "repository:a:pull"]
    ) == ("odd", "registry:catalog:*", "repository:a:pull,push")


# --- flows ------------------------------------------------------------------------------------


@dataclass
class FakeRegistry:
    """A registry on registry.example and a token server on auth.example, in memory."""

    scheme: str = "bearer"
    realm: str = REALM
    expires_in: float = 60
    token_body: Callable[[int], bytes] | None = None
    token_status: int = 200
    token_delay: float = 0.0
    token_failures: list[int | type[Exception]] = field(default_factory=list)
    """Answered (a status) or raised (an httpx exception) first, one per token request."""
    retry_after: str | None = None
    tokens_issued: int = 0
    token_requests: list[httpx.Request] = field(default_factory=list)
    registry_requests: list[httpx.Request] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)

    def challenge(self, request: httpx.Request) -> str:
        if self.scheme == "basic":
            return 'Basic realm="fake"'
        if self.scheme == "other":
            return 'Digest realm="fake", nonce="x"'
        scopes = " ".join(request_scopes(request))
        return f'Bearer realm="{self.realm}",service="registry.example",scope="{scopes}"'

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == httpx.URL(self.realm).host:
            self.token_requests.append(request)
            if self.token_delay:
                await trio.sleep(self.token_delay)
            if self.token_failures:
                failure = self.token_failures.pop(0)
                if not isinstance(failure, int):
                    raise failure("scripted", request=request)
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return httpx.Response(failure, headers=headers, text="busy")
            if self.token_status != 200:
                return httpx.Response(self.token_status, text=SECRET)
            self.tokens_issued += 1
            token = f"token-{self.tokens_issued}"
            self.valid.add(token)
            if self.token_body is not None:
                return httpx.Response(200, content=self.token_body(self.tokens_issued))
            return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})
        self.registry_requests.append(request)
        if request.url.host == "storage.example":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="s3"'})
        if request.url.path == "/v2/redirect/blobs/sha256:abc":
            return httpx.Response(307, headers={"Location": "https://storage.example/blob"})
        authz = request.headers.get("authorization", "")
        if self.scheme == "basic" and authz == basic("alice", SECRET):
            return httpx.Response(200)
        if self.scheme == "bearer" and authz.removeprefix("Bearer ") in self.valid:
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": self.challenge(request)})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Lookups:
    def __init__(self, table: dict[str, Credentials]) -> None:
        self.table = table
        self.hosts: list[str] = []

    def __call__(self, host: str) -> Credentials | None:
        self.hosts.append(host)
        return self.table.get(host)


ALICE = {"registry.example": Credentials("alice", SECRET)}


def client_for(
    fake: FakeRegistry, creds: dict[str, Credentials] | Lookups, http: HttpConfig = FAST
) -> httpx.AsyncClient:
    transport = httpx.MockTransport(fake)
    lookup = creds if isinstance(creds, Lookups) else Lookups(creds)
    auth = RegistryAuth(lookup, transport=transport, http=http)
    return httpx.AsyncClient(transport=transport, auth=auth, follow_redirects=True)


async def test_bearer_token_exchange_and_cache(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeRegistry()
    lookups = Lookups(ALICE)
    async with client_for(fake, lookups) as client:
        first = await client.get(f"{REGISTRY}/v2/a/b/manifests/v1")
        second = await client.head(f"{REGISTRY}/v2/a/b/blobs/sha256:abc")
        push = await client.post(f"{REGISTRY}/v2/a/b/blobs/uploads/")
    assert (first.status_code, second.status_code, push.status_code) == (200, 200, 200)
    assert len(fake.token_requests) == 2, "pull token reused for the HEAD; push needs its own"
    token_request = fake.token_requests[0]
    assert token_request.headers["authorization"] == basic("alice", SECRET)
    assert token_request.url.params.get_list("scope") == ["repository:a/b:pull"]
    assert token_request.url.params["service"] == "registry.example"
    assert fake.token_requests[1].url.params.get_list("scope") == ["repository:a/b:pull,push"]
    assert lookups.hosts == ["registry.example"], "credentials looked up once per host"
    assert SECRET not in caplog.text
    for request in fake.registry_requests:
        assert "basic" not in request.headers.get("authorization", "").lower()


async def test_identity_token_uses_the_oauth_post() -> None:
    fake = FakeRegistry(token_body=lambda n: json.dumps({"access_token": f"token-{n}"}).encode())
    async with client_for(fake, {"registry.example": Credentials(identity_token=SECRET)}) as c:
        response = await c.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 200
    (token_request,) = fake.token_requests
    assert token_request.method == "POST"
    form = dict(x.split("=", 1) for x in token_request.content.decode().split("&"))
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == SECRET
    assert "authorization" not in token_request.headers


async def test_anonymous_token() -> None:
    fake = FakeRegistry()
    async with client_for(fake, {}) as client:
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 200
    assert "authorization" not in fake.token_requests[0].headers


async def test_fifty_concurrent_requests_share_one_exchange() -> None:
    fake = FakeRegistry(token_delay=0.05)
    statuses: list[int] = []
    async with client_for(fake, ALICE) as client:

        async def get() -> None:
            statuses.append((await client.get(f"{REGISTRY}/v2/a/manifests/v1")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(get)
    assert statuses == [200] * 50
    assert len(fake.token_requests) == 1


async def test_token_renewed_before_expiry(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRegistry(expires_in=30)
    async with client_for(fake, ALICE) as client:
        url = f"{REGISTRY}/v2/a/manifests/v1"
        await client.get(url)
        await trio.sleep(25)
        await client.get(url)
        assert len(fake.token_requests) == 1
        await trio.sleep(3)  # 28 s: inside the renewal margin
        await client.get(url)
        assert len(fake.token_requests) == 2


async def test_rejected_cached_token_is_replaced() -> None:
    fake = FakeRegistry()
    async with client_for(fake, ALICE) as client:
        url = f"{REGISTRY}/v2/a/manifests/v1"
        await client.get(url)
        fake.valid.clear()  # the registry forgets the token (revoked, key rotated)
        response = await client.get(url)
    assert response.status_code == 200
    assert len(fake.token_requests) == 2


async def test_basic_flow_and_host_isolation() -> None:
    fake = FakeRegistry(scheme="basic")
    async with client_for(fake, ALICE) as client:
        first = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
        fake.registry_requests.clear()
        second = await client.get(f"{REGISTRY}/v2/a/manifests/v2")
        elsewhere = await client.get("https://other.example/v2/a/manifests/v1")
    assert first.status_code == second.status_code == 200
    assert [r.headers.get("authorization") for r in fake.registry_requests] == [
        basic("alice", SECRET),
        None,  # other.example: no credentials of its own, so none of registry.example's
    ]
    assert elsewhere.status_code == 401


@pytest.mark.parametrize("creds", [{"registry.example": Credentials("alice", "wrong")}, {}])
async def test_basic_refused_returns_the_401(creds: dict[str, Credentials]) -> None:
    fake = FakeRegistry(scheme="basic")
    async with client_for(fake, creds) as client:
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 401
    assert len(fake.registry_requests) == (2 if creds else 1)


async def test_unknown_scheme_returns_the_401() -> None:
    fake = FakeRegistry(scheme="other")
    async with client_for(fake, ALICE) as client:
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 401
    assert len(fake.registry_requests) == 1


async def test_redirect_target_gets_no_credentials() -> None:
    fake = FakeRegistry(scheme="basic")
    async with client_for(fake, ALICE) as client:
        await client.get(f"{REGISTRY}/v2/a/manifests/v1")
        fake.registry_requests.clear()
        response = await client.get(f"{REGISTRY}/v2/redirect/blobs/sha256:abc")
    assert response.status_code == 401
    assert [(r.url.host, r.headers.get("authorization")) for r in fake.registry_requests] == [
        ("registry.example", basic("alice", SECRET)),
        ("storage.example", None),
    ]


async def test_streamed_body_is_not_replayed() -> None:
    fake = FakeRegistry()

    async def body() -> AsyncIterator[bytes]:
        yield b"chunk"

    async with client_for(fake, ALICE) as client:
        response = await client.patch(f"{REGISTRY}/v2/a/blobs/uploads/u", content=body())
    assert response.status_code == 401
    assert fake.token_requests == []


async def test_no_credentials_to_a_plain_http_realm() -> None:
    fake = FakeRegistry(realm="http://auth.example/token")
    async with client_for(fake, ALICE) as client:
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 200
    assert "authorization" not in fake.token_requests[0].headers


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"expires_in": 5}', "no usable token"),
        (b'{"token": "a\\r\\nb"}', "no usable token"),
        (b'{"token": "t", "issued_at": 5}', "issued_at"),
        (b'{"token": "' + b"x" * (2 << 20) + b'"}', "larger than"),
    ],
)
async def test_malformed_token_responses(body: bytes, message: str) -> None:
    fake = FakeRegistry(token_body=lambda n: body)
    async with client_for(fake, ALICE) as client:
        with pytest.raises(AuthenticationError, match=message) as info:
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, AuthenticationError), (403, AuthenticationError), (503, RegistryUnavailableError)],
)
async def test_token_server_errors(status: int, error: type[Exception]) -> None:
    fake = FakeRegistry(token_status=status)
    async with client_for(fake, ALICE) as client:
        with pytest.raises(error, match=f"HTTP {status}") as info:
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert SECRET not in str(info.value)
    assert len(fake.token_requests) == (FAST.MaxRetries + 1 if status == 503 else 1)


# --- token requests follow the [http] retry and timeout policy --------------------------------


async def test_token_retries_honour_retry_after(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRegistry(token_failures=[429, 503, 502], retry_after="4")
    async with client_for(fake, ALICE) as client:
        started = trio.current_time()
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
        elapsed = trio.current_time() - started
    assert response.status_code == 200
    assert len(fake.token_requests) == 4
    assert all(r.headers["authorization"] == basic("alice", SECRET) for r in fake.token_requests)
    assert 12 <= elapsed < 13, "three waits of Retry-After: 4, not MinWaitMsec"


async def test_token_connection_errors_are_retried() -> None:
    fake = FakeRegistry(token_failures=[httpx.ConnectError, httpx.ReadTimeout])
    creds = {"registry.example": Credentials(identity_token=SECRET)}
    async with client_for(fake, creds) as client:  # the POST form is replayed too
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 200
    assert [r.method for r in fake.token_requests] == ["POST"] * 3


async def test_token_connection_errors_give_up_within_the_budget() -> None:
    fake = FakeRegistry(token_failures=[httpx.ConnectError] * 10)
    async with client_for(fake, ALICE) as client:
        with pytest.raises(RegistryUnavailableError, match=r"token server.*4 attempt"):
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert len(fake.token_requests) == FAST.MaxRetries + 1


async def test_token_501_is_not_retried() -> None:
    fake = FakeRegistry(token_failures=[501])
    async with client_for(fake, ALICE) as client:
        with pytest.raises(RegistryResponseError, match="HTTP 501"):
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert len(fake.token_requests) == 1


async def test_token_requests_use_the_http_timeouts(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRegistry()
    async with client_for(fake, ALICE) as client:
        await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert fake.token_requests[0].extensions["timeout"] == {
        "connect": 1.5,
        "read": 2.5,
        "write": 2.5,
        "pool": 1.5,
    }
    # RequestTimeoutMsec bounds the whole exchange, retries included.
    slow = FakeRegistry(token_delay=30)
    http = HttpConfig(RequestTimeoutMsec=5000, MaxRetries=0)
    async with client_for(slow, ALICE, http) as client:
        started = trio.current_time()
        with pytest.raises(RegistryUnavailableError, match="within 5 s"):
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")
        assert trio.current_time() - started == pytest.approx(5)


async def test_verify_is_asked_for_the_realm_and_the_challenging_registry() -> None:
    asked: list[tuple[str, str]] = []

    def verify(realm: str, registry: str) -> bool:
        asked.append((realm, registry))
        return True

    fake = FakeRegistry(realm="https://auth.example:8443/token")
    transport = httpx.MockTransport(fake)
    auth = RegistryAuth(Lookups(ALICE), verify=verify, transport=transport, http=FAST)
    async with httpx.AsyncClient(transport=transport, auth=auth) as client:
        response = await client.get(f"{REGISTRY}/v2/a/manifests/v1")
    assert response.status_code == 200
    assert asked == [("auth.example:8443", "registry.example")]


async def test_challenge_without_realm_or_malformed() -> None:
    fake = FakeRegistry(realm="")
    async with client_for(fake, ALICE) as client:
        with pytest.raises(RegistryResponseError, match="realm"):
            await client.get(f"{REGISTRY}/v2/a/manifests/v1")


def test_sync_clients_are_refused() -> None:
    auth = RegistryAuth(lambda host: None)
    transport = httpx.MockTransport(lambda r: httpx.Response(200))
    with httpx.Client(auth=auth, transport=transport) as c, pytest.raises(NotImplementedError):
        c.get("https://registry.example/v2/")


def test_realm_tls_from_the_challenging_endpoint(tmp_path: Path) -> None:
    """RegistryHosts.verify_for: the realm's own directory, else the challenger's TLS."""
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "certs.d"
    mirror_ca = f'[host."https://mirror.example:5000"]\nca = "{pki.ca.cert_path}"\n'
    for host, text in {
        "registry.example": "skip_verify = true\n",
        "docker.io": mirror_ca,
        "auth.example": f'ca = "{pki.ca.cert_path}"\n',
    }.items():
        (root / host).mkdir(parents=True)
        (root / host / "hosts.toml").write_text(text)
    hosts = RegistryHosts(Config(registry=RegistryConfig(config_path=str(root))))
    # The realm host has a directory of its own: that wins.
    own = hosts.verify_for("auth.example", "registry.example")
    assert isinstance(own, ssl.SSLContext) and own.verify_mode == ssl.CERT_REQUIRED
    # Else the registry's skip_verify covers its realm; an unconfigured challenger: defaults.
    assert hosts.verify_for("token.example", "registry.example") is False
    assert hosts.verify_for("token.example", "registry.example:443") is False
    assert hosts.verify_for("token.example", "other.example") is True
    assert hosts.verify_for("token.example") is True
    # A mirror that challenged: its CA, once its endpoint is known.
    hosts.endpoints("docker.io", "pull")
    mirror = hosts.verify_for("token.example", "mirror.example:5000")
    assert isinstance(mirror, ssl.SSLContext)
    assert any("pysoci test CA" in str(c["subject"]) for c in mirror.get_ca_certs())
