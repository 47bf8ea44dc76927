"""RegistryHosts: containerd hosts.toml, soci resolver mirrors, schemes and TLS settings."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from snapshotter.config import Config, ConfigError, RegistryConfig, parse_config
from snapshotter.registry.hosts import Endpoint, RegistryHosts
from tests.fixtures.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def hosts_in(root: Path, files: dict[str, str], toml: str = "", **flags: bool) -> RegistryHosts:
    for host, text in files.items():
        (root / host).mkdir(parents=True, exist_ok=True)
        (root / host / "hosts.toml").write_text(text)
    config = parse_config(toml)[0] if toml else Config()
    config = Config(
        http=config.http,
        resolver=config.resolver,
        registry=RegistryConfig(config_path=str(root)),
    )
    return RegistryHosts(config, **flags)


def urls(endpoints: list[Endpoint]) -> list[str]:
    return [e.url + e.path_prefix for e in endpoints]


def test_defaults_without_files(tmp_path: Path) -> None:
    hosts = hosts_in(tmp_path, {})
    (endpoint,) = hosts.endpoints("ghcr.io", "pull")
    assert endpoint == Endpoint(
        url="https://ghcr.io",
        path_prefix="/v2",
        capabilities=frozenset({"pull", "resolve", "push"}),
        verify=True,
        cert=None,
        headers={},
        mirror=False,
    )
    assert endpoint.host == "ghcr.io"
    assert urls(hosts.endpoints("docker.io", "push")) == ["https://registry-1.docker.io/v2"]
    assert urls(hosts.endpoints("index.docker.io", "push")) == ["https://registry-1.docker.io/v2"]


def test_plain_http_and_skip_verify_apply_to_the_registry_itself(tmp_path: Path) -> None:
    files = {"127.0.0.1:5000": '[host."https://mirror:5000"]\n'}
    hosts = hosts_in(tmp_path, files, plain_http=True)
    assert urls(hosts.endpoints("127.0.0.1:5000", "pull")) == [
        "https://mirror:5000/v2",
        "http://127.0.0.1:5000/v2",
    ]
    hosts = hosts_in(
        tmp_path, {"registry.test": '[host."https://mirror:5000"]\n'}, skip_verify=True
    )
    mirror, own = hosts.endpoints("registry.test", "pull")
    assert mirror.verify is True
    assert own.verify is False


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:5000",
        "127.0.0.1",
        "127.0.0.1:41483",
        "127.1.2.3:80",
        "[::1]:5000",
        "[::1]",
        "LOCALHOST:5000",
    ],
)
def test_loopback_registries_are_plain_http_by_default(tmp_path: Path, host: str) -> None:
    """As containerd's docker.MatchLocalhost (and soci, stargz): no hosts.toml needed."""
    (own,) = hosts_in(tmp_path, {}).endpoints(host, "pull")
    assert own.url == f"http://{host.lower()}"
    assert own.verify is True  # not used for http, and never loosened


@pytest.mark.parametrize(
    "host", ["registry.test:5000", "127.example.com", "localhost.example", "10.0.0.1:5000", "[::2]"]
)
def test_other_registries_stay_https(tmp_path: Path, host: str) -> None:
    (own,) = hosts_in(tmp_path, {}).endpoints(host, "pull")
    assert own.url.startswith("https://")


def test_hosts_toml_wins_over_the_loopback_default(tmp_path: Path, pki: Pki) -> None:
    files = {
        "127.0.0.1:5000": 'server = "https://127.0.0.1:5000"\n',
        "127.0.0.1:5001": f'ca = "{pki.ca.cert_path}"\n',
        "127.0.0.1:5002": 'server = "http://127.0.0.1:5002"\n[host."https://mirror:5000"]\n',
    }
    hosts = hosts_in(tmp_path, files)
    assert urls(hosts.endpoints("127.0.0.1:5000", "pull")) == ["https://127.0.0.1:5000/v2"]
    (with_ca,) = hosts.endpoints("127.0.0.1:5001", "pull")
    assert with_ca.url == "https://127.0.0.1:5001"  # a CA for it says it speaks TLS
    assert urls(hosts.endpoints("127.0.0.1:5002", "pull")) == [
        "https://mirror:5000/v2",
        "http://127.0.0.1:5002/v2",
    ]
    # A Docker-style certs directory with a CA says the same.
    (tmp_path / "localhost:6000").mkdir()
    (tmp_path / "localhost:6000" / "ca.crt").write_bytes(pki.ca.cert_path.read_bytes())
    (own,) = hosts_in(tmp_path, {}).endpoints("localhost:6000", "pull")
    assert own.url == "https://localhost:6000"
    # skip_verify, in the file or as a flag, asks for TLS too.
    (own,) = hosts_in(tmp_path, {"127.0.0.1:7000": "skip_verify = true\n"}).endpoints(
        "127.0.0.1:7000", "pull"
    )
    assert (own.url, own.verify) == ("https://127.0.0.1:7000", False)
    (own,) = hosts_in(tmp_path / "none", {}, skip_verify=True).endpoints("127.0.0.1:7001", "pull")
    assert (own.url, own.verify) == ("https://127.0.0.1:7001", False)


def test_mirror_order_capabilities_and_server(tmp_path: Path) -> None:
    text = """
server = "https://registry.example.com"
capabilities = ["pull", "resolve", "push"]

[host."https://pull-only.example"]
capabilities = ["pull"]

[host."http://insecure.example:8080"]
capabilities = ["pull", "resolve"]
[host."http://insecure.example:8080".header]
x-mirror = "yes"
x-multi = ["a", "b"]

[host."first-in-name-order.example"]
"""
    hosts = hosts_in(tmp_path, {"docker.io": text})
    assert urls(hosts.endpoints("docker.io", "pull")) == [
        "https://pull-only.example/v2",
        "http://insecure.example:8080/v2",
        "https://first-in-name-order.example/v2",
        "https://registry.example.com/v2",
    ]
    assert urls(hosts.endpoints("docker.io", "resolve")) == [
        "http://insecure.example:8080/v2",
        "https://first-in-name-order.example/v2",
        "https://registry.example.com/v2",
    ]
    assert urls(hosts.endpoints("docker.io", "push")) == [
        "https://first-in-name-order.example/v2",
        "https://registry.example.com/v2",
    ]
    insecure = hosts.endpoints("docker.io", "resolve")[0]
    assert insecure.mirror
    assert insecure.headers == {"x-mirror": "yes", "x-multi": "a, b"}
    assert not hosts.endpoints("docker.io", "push")[-1].mirror
    with pytest.raises(ValueError, match="capability"):
        hosts.endpoints("docker.io", "delete")


def test_paths_and_override_path(tmp_path: Path) -> None:
    text = """
server = "https://proxy.example/registry"
[host."https://a.example/sub/v2"]
[host."https://b.example/custom/api"]
override_path = true
"""
    hosts = hosts_in(tmp_path, {"r.example": text})
    assert urls(hosts.endpoints("r.example", "pull")) == [
        "https://a.example/sub/v2",
        "https://b.example/custom/api",
        "https://proxy.example/registry/v2",
    ]


def test_default_directory(tmp_path: Path) -> None:
    hosts = hosts_in(
        tmp_path,
        {"_default": 'capabilities = ["pull", "resolve"]\n', "own.example": ""},
    )
    assert hosts.endpoints("any.example", "push") == []
    assert urls(hosts.endpoints("any.example", "pull")) == ["https://any.example/v2"]
    assert urls(hosts.endpoints("own.example", "push")) == ["https://own.example/v2"]


def test_ca_and_client_forms(tmp_path: Path, pki: Pki) -> None:
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "r.example").mkdir(parents=True)
    (hosts_dir / "r.example" / "ca.pem").write_bytes(pki.ca.cert_path.read_bytes())
    both = hosts_dir / "r.example" / "client-both.pem"
    both.write_bytes(pki.client.cert_path.read_bytes() + pki.client.key_path.read_bytes())
    text = f"""
ca = "ca.pem"
client = [["{pki.client.cert_path}", "{pki.client.key_path}"]]

[host."https://m1.example"]
ca = ["{pki.ca.cert_path}", "ca.pem"]
client = "client-both.pem"

[host."https://m2.example"]
client = ["client-both.pem", "client-both.pem"]
skip_verify = true
"""
    hosts = hosts_in(hosts_dir, {"r.example": text})
    m1, m2, own = hosts.endpoints("r.example", "pull")
    assert own.cert == (str(pki.client.cert_path), str(pki.client.key_path))
    assert m1.cert == (str(both), "")
    assert m2.cert == (str(both), "")
    for endpoint in (m1, own):
        assert isinstance(endpoint.verify, ssl.SSLContext)
        assert endpoint.verify.verify_mode == ssl.CERT_REQUIRED
        subjects = [str(c["subject"]) for c in endpoint.verify.get_ca_certs()]
        assert any("pysoci test CA" in subject for subject in subjects)
    assert isinstance(m2.verify, ssl.SSLContext)
    assert m2.verify.verify_mode == ssl.CERT_NONE
    assert not m2.verify.check_hostname
    # parsed once: the same objects come back
    assert hosts.endpoints("r.example", "pull")[0] is m1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [", "not valid TOML"),
        ("server = 5", "server"),
        ('capabilities = ["pull", "fly"]', "capabilities"),
        ("capabilities = 'pull'", "capabilities"),
        ("skip_verify = 'yes'", "skip_verify"),
        ("ca = 5", "ca"),
        ("client = [[1, 2]]", "client"),
        ("client = 5", "client"),
        ('client = [["a", "b", "c"]]', "client"),
        ("header = 'x'", "header"),
        ("[header]\nx = 1", "header.x"),
        ("host = 1", "host"),
        ('[host."ftp://x"]', "http"),
        ('[host."https://x?y=1"]', "invalid host URL"),
        ('ca = "missing.pem"', "missing.pem"),
        ('client = "missing.pem"', "missing.pem"),
    ],
)
def test_bad_hosts_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    hosts = hosts_in(tmp_path, {"r.example": text})
    with pytest.raises(ConfigError, match=message) as info:
        hosts.endpoints("r.example", "pull")
    assert str(tmp_path / "r.example" / "hosts.toml") in str(info.value)


def test_unknown_keys_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hosts = hosts_in(tmp_path, {"r.example": 'colour = "blue"\n[host."m.example"]\nserver = "x"'})
    hosts.endpoints("r.example", "pull")
    assert "unknown key colour" in caplog.text
    assert 'unknown key host."m.example".server' in caplog.text


def test_resolver_mirrors_from_the_soci_config(tmp_path: Path) -> None:
    toml = """
[[resolver.host."docker.io".mirrors]]
host = "mirror.example:5000"
insecure = true
request_timeout_sec = 7
header = { x-from = "soci" }

[[resolver.host."docker.io".mirrors]]
host = "secure-mirror.example"
"""
    files = {"docker.io": '[host."https://toml-mirror.example"]\ncapabilities = ["pull"]\n'}
    hosts = hosts_in(tmp_path, files, toml)
    pull = hosts.endpoints("docker.io", "pull")
    assert urls(pull) == [
        "https://toml-mirror.example/v2",
        "http://mirror.example:5000/v2",
        "https://secure-mirror.example/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert pull[1].headers == {"x-from": "soci"}
    assert pull[1].request_timeout == 7.0
    assert pull[1].capabilities == frozenset({"pull", "resolve"})
    assert pull[2].request_timeout is None
    assert urls(hosts.endpoints("docker.io", "push")) == ["https://registry-1.docker.io/v2"]
    assert urls(hosts.endpoints("quay.io", "pull")) == ["https://quay.io/v2"]


def test_verify_for_token_realm_hosts(tmp_path: Path, pki: Pki) -> None:
    hosts = hosts_in(tmp_path, {"auth.example": f'ca = "{pki.ca.cert_path}"\n'})
    assert isinstance(hosts.verify_for("auth.example"), ssl.SSLContext)
    assert hosts.verify_for("other.example") is True


def test_docker_style_certs_directory(tmp_path: Path, pki: Pki) -> None:
    host_dir = tmp_path / "r.example:5000"
    host_dir.mkdir()
    (host_dir / "ca.crt").write_bytes(pki.ca.cert_path.read_bytes())
    (host_dir / "client.cert").write_bytes(pki.client.cert_path.read_bytes())
    (host_dir / "client.key").write_bytes(pki.client.key_path.read_bytes())
    hosts = hosts_in(tmp_path, {"_default": 'capabilities = ["pull"]'})
    (endpoint,) = hosts.endpoints("r.example:5000", "push")
    assert endpoint.cert == (str(host_dir / "client.cert"), str(host_dir / "client.key"))
    assert isinstance(endpoint.verify, ssl.SSLContext)
    assert hosts.endpoints("other.example", "push") == [], "_default for hosts without a dir"
    (host_dir / "client.key").unlink()
    with pytest.raises(ConfigError, match=r"no client\.key"):
        hosts_in(tmp_path, {}).endpoints("r.example:5000", "pull")
