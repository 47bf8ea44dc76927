"""CredentialStore: Docker config.json `auths`, credential helpers, caching, secrecy."""

from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path

import pytest

from snapshotter.config import ConfigError
from snapshotter.errors import AuthenticationError
from snapshotter.registry.credentials import (
    Credentials,
    CredentialStore,
    credential_host,
    parse_user,
)

SECRET = "hunter2-very-secret"

# One script, installed under several names; its behaviour depends on the name it runs as.
HELPER = """\
#!{python}
import json, os, sys, time
name = os.path.basename(sys argv0).removeprefix("docker-credential-")
here = os.path.dirname(os.path.abspath(sys argv0))
server = sys.stdin.read().strip()
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(f"{{name}} {{' '.join(sys.argv[1:])}} {{server}}\\n")
if name == "slow":
    time.sleep(30)
if name == "broken":
    print("cannot unlock keychain for {secret}", file=sys.stderr)
    sys.exit(3)
if name == "garbage":
    print("not json {secret}")
    sys.exit(0)
with open(os.path.join(here, "store.json")) as f:
    store = json.load(f)
if server not in store:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = store[server]
print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
""".replace("sys argv0", "sys.argv[0]")


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin dir on PATH with docker-credential-{test,broken,slow,garbage}."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = HELPER.format(python=sys.executable, secret=SECRET)
    for name in ("test", "broken", "slow", "garbage"):
        path = bin_dir / f"docker-credential-{name}"
        path.write_text(script)
        path.chmod(0o755)
    (bin_dir / "store.json").write_text(
        json.dumps(
            {
                "https://index.docker.io/v1/": ["hubuser", SECRET],
                "ghcr.io": ["<token>", SECRET],
                "quay.io": ["quayuser", SECRET],
            }
        )
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir


def calls(bin_dir: Path) -> list[str]:
    log = bin_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def store_with(tmp_path: Path, config: object, **kwargs: object) -> CredentialStore:
    directory = tmp_path / "docker"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return CredentialStore(directory, **kwargs)  # type: ignore[arg-type]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auths_forms(tmp_path: Path) -> None:
    store = store_with(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64(f"hub:{SECRET}")},
                "registry.example:5000": {"username": "u", "password": SECRET},
                "https://tokens.example/v2/": {"identitytoken": SECRET},
                "colon.example": {"auth": b64("user:pa:ss")},
                "empty.example": {"email": "x@example.com"},
            }
        },
    )
    assert store.get("docker.io") == Credentials("hub", SECRET)
    assert store.get("registry-1.docker.io") == Credentials("hub", SECRET)
    assert store.get("https://registry.example:5000/v2/") == Credentials("u", SECRET)
    assert store.get("tokens.example") == Credentials(identity_token=SECRET)
    assert store.get("colon.example") == Credentials("user", "pa:ss")
    assert store.get("empty.example") is None
    assert store.get("registry.example") is None, "the port is part of the host"
    assert store.get("elsewhere.example") is None


def test_missing_config_and_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert CredentialStore(tmp_path / "nothing").get("docker.io") is None
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "config.json").write_text(
        json.dumps({"auths": {"env.example": {"auth": b64("e:" + SECRET)}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "env"))
    assert CredentialStore().get("env.example") == Credentials("e", SECRET)


def test_overrides_win(tmp_path: Path) -> None:
    store = store_with(
        tmp_path,
        {"auths": {"r.example": {"auth": b64("file:" + SECRET)}}},
        overrides={"https://r.example/": parse_user("flag:pw")},
    )
    assert store.get("r.example") == Credentials("flag", "pw")


def test_credential_helpers(tmp_path: Path, helpers: Path) -> None:
    store = store_with(
        tmp_path,
        {
            "auths": {"fallback.example": {"auth": b64("f:" + SECRET)}},
            "credHelpers": {"quay.io": "test", "ghcr.io": "test"},
            "credsStore": "test",
        },
    )
    assert store.get("quay.io") == Credentials("quayuser", SECRET)
    assert store.get("ghcr.io") == Credentials(identity_token=SECRET)
    assert store.get("registry-1.docker.io") == Credentials("hubuser", SECRET)
    assert store.get("docker.io") == Credentials("hubuser", SECRET)
    assert store.get("fallback.example") == Credentials("f", SECRET), "not found → auths"
    assert store.get("nowhere.example") is None
    assert store.get("quay.io") == Credentials("quayuser", SECRET)
    assert calls(helpers) == [
        "test get quay.io",
        "test get ghcr.io",
        "test get https://index.docker.io/v1/",
        "test get fallback.example",
        "test get nowhere.example",
    ], "one helper run per host"


@pytest.mark.parametrize(
    ("helper", "message"),
    [
        ("broken", "failed for r.example .exit status 3"),
        ("garbage", "malformed answer"),
        ("slow", "timed out"),
        ("absent", "not on PATH"),
    ],
)
def test_failing_helpers(
    tmp_path: Path,
    helpers: Path,
    helper: str,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = store_with(tmp_path, {"credHelpers": {"r.example": helper}}, helper_timeout=0.5)
    with pytest.raises(AuthenticationError, match=message) as info:
        store.get("r.example")
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    error: BaseException | None = info.value
    while error is not None:  # nothing chained to it carries the helper's output either
        assert SECRET not in repr(error) and SECRET not in str(error)
        error = error.__cause__ or error.__context__
    assert SECRET not in caplog.text


def test_bad_config_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json " + SECRET)
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        CredentialStore(tmp_path).get("r.example")
    assert SECRET not in str(info.value)
    bad_auth = {"auths": {"r.example": {"auth": SECRET + "!!"}}}
    with pytest.raises(ConfigError, match="not base64") as info:
        store_with(tmp_path, bad_auth).get("r.example")
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match="helper name"):
        store_with(tmp_path, {"credsStore": "../evil"}).get("r.example")


def test_secrets_stay_out_of_reprs() -> None:
    creds = Credentials("alice", SECRET, SECRET + "-token")
    for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"c": creds})):
        assert SECRET not in text
        assert "alice" in text


def test_parse_user() -> None:
    assert parse_user("bob:pa:ss") == Credentials("bob", "pa:ss")
    assert parse_user("bob:") == Credentials("bob", "")
    for bad in ("just-a-secret", ":nobody"):
        with pytest.raises(ConfigError) as info:
            parse_user(bad)
        assert bad not in str(info.value)


def test_credential_host() -> None:
    assert credential_host("https://index.docker.io/v1/") == "docker.io"
    assert credential_host("Registry.Example:5000/path") == "registry.example:5000"
    assert credential_host("http://[::1]:5000") == "[::1]:5000"
