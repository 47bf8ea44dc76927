"""pysoci create / push / convert / index against a real registry, checked with skopeo."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.images import ZSTD_LAYER, Layer, gzip_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.tars import random_tar
from tests.fixtures.token_server import TokenServer, User

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
SOCI_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_V2 = "application/vnd.amazon.soci.index.v2+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def pysoci(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PYSOCI, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def skopeo_raw(ref: str) -> dict[str, object]:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def big_tar(seed: int) -> bytes:
    while True:
        tar = random_tar(random.Random(seed), max_file_size=200_000, max_entries=60)
        if len(gzip_blob(tar)) > 300_000:
            return tar
        seed += 1000


def push_test_image(tmp_path: Path, registry: Registry, repo: str) -> str:
    layout = tmp_path / "src"
    small = random_tar(random.Random(2), max_file_size=100, max_entries=3)
    write_image(
        layout,
        "v1",
        [Layer.from_tar(big_tar(1)), Layer.from_tar(small), Layer.from_tar(big_tar(3), ZSTD_LAYER)],
    )
    ref = f"{registry.host}/{repo}:v1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return ref


def test_create_then_push_v1(tmp_path: Path, registry: Registry) -> None:
    ref = push_test_image(tmp_path, registry, "app")
    root = tmp_path / "root"
    common = ["--plain-http", "--root", str(root)]
    res = pysoci("create", ref, *common, "--min-layer-size", "100KiB", "--span-size", "64KiB")
    assert "built" in res.stdout and "zstd" in res.stdout and "min layer size" in res.stdout
    listing = pysoci("index", "list", "--root", str(root), "--ref", ref).stdout.splitlines()
    assert len(listing) == 2 and listing[1].split()[1] == "v1"
    index_digest = listing[1].split()[0]
    pysoci("push", ref, *common)
    manifest_digest = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{ref}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The referrers fallback tag lists the index, as soci and containerd look it up.
    fallback = skopeo_raw(f"{registry.host}/app:sha256-{manifest_digest.split(':')[1]}")
    entries = fallback["manifests"]
    assert isinstance(entries, list)
    assert [(e["digest"], e["artifactType"]) for e in entries] == [(index_digest, SOCI_V1)]
    index = skopeo_raw(f"{registry.host}/app@{index_digest}")
    assert index["config"]["mediaType"] == SOCI_V1  # type: ignore[index]
    assert index["subject"]["digest"] == manifest_digest  # type: ignore[index]
    # Pushing again is idempotent: the tag still lists the index once.
    pysoci("push", ref, *common)
    again = skopeo_raw(f"{registry.host}/app:sha256-{manifest_digest.split(':')[1]}")["manifests"]
    assert again == entries


def test_convert_pushes_a_soci_enabled_image(tmp_path: Path, registry: Registry) -> None:
    ref = push_test_image(tmp_path, registry, "conv")
    dst = f"{registry.host}/conv:v1-soci"
    root = tmp_path / "root"
    pysoci("convert", ref, dst, "--plain-http", "--root", str(root), "--min-layer-size", "100KiB")
    top = skopeo_raw(dst)
    manifests = top["manifests"]
    assert isinstance(manifests, list) and len(manifests) == 2
    image, index = manifests
    assert index["artifactType"] == SOCI_V2
    rewritten = skopeo_raw(f"{registry.host}/conv@{image['digest']}")
    assert rewritten["annotations"]["com.amazon.soci.index-digest"] == index["digest"]  # type: ignore[index]
    original = skopeo_raw(ref)
    assert rewritten["layers"] == original["layers"]
    # The converted image is complete: skopeo copies every blob of it.
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://{dst}",
            f"oci:{tmp_path}/out:x",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_convert_to_another_repository_mounts_its_layers(
    tmp_path: Path, registry: Registry
) -> None:
    """In the same registry, the layers are mounted from the source repository (a POST with
    ?mount= answered 201), never uploaded again; the result is a complete image."""
    ref = push_test_image(tmp_path, registry, "from")
    dst = f"{registry.host}/elsewhere/to:soci"
    layers = [str(layer["digest"]) for layer in skopeo_raw(ref)["layers"]]  # type: ignore[index]
    log_start = registry.log.stat().st_size
    pysoci(
        "convert",
        ref,
        dst,
        "--plain-http",
        "--root",
        str(tmp_path / "r"),
        "--min-layer-size",
        "100KiB",
    )
    log = registry.log.read_bytes()[log_start:].decode(errors="replace")
    access = [line for line in log.splitlines() if line.startswith("127.0.0.1 - -")]
    for digest in layers:
        quoted = urllib.parse.quote(digest, safe="")
        mounted = [
            line
            for line in access
            if f"POST /v2/elsewhere/to/blobs/uploads/?mount={quoted}&from=from " in line
        ]
        assert mounted and all('" 201 ' in line for line in mounted), (digest, mounted)
        assert not [line for line in access if "PUT " in line and f"digest={quoted}" in line]
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://{dst}",
            f"oci:{tmp_path}/out:x",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_registry_errors_are_clear(tmp_path: Path, registry: Registry) -> None:
    res = pysoci(
        "create", f"{registry.host}/nope:v1", "--plain-http", "--root", str(tmp_path), ok=False
    )
    assert res.returncode == 1 and "nope" in res.stderr and "Traceback" not in res.stderr
    res = pysoci(
        "push",
        f"{registry.host}/never-created:v1",
        "--plain-http",
        "--root",
        str(tmp_path),
        ok=False,
    )
    assert res.returncode == 1 and "pysoci create" in res.stderr
    res = pysoci("create", "Not A Reference!", "--root", str(tmp_path), ok=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr


# --- the same commands against registries with TLS and authentication -------------------------

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("basic")
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


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("token")
    users = {
        "alice": User(PASSWORD, {"*": {"pull", "push"}}),
        "bob": User("bob-pw", {"*": {"pull"}}),
    }
    server = TokenServer(workdir / "token", users, anonymous={})
    reg = start_registry(workdir / "registry", auth=server.registry_auth())
    yield reg
    reg.stop()
    server.stop()


def skopeo_push(layout: Path, ref: str, creds: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            creds,
            f"oci:{layout}:v1",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def make_layout(tmp_path: Path) -> Path:
    layout = tmp_path / "src"
    write_image(layout, "v1", [Layer.from_tar(big_tar(1))])
    return layout


def test_tls_with_ca_from_hosts_toml_and_basic_auth(
    tmp_path: Path, basic_registry: Registry, pki: Pki
) -> None:
    ref = f"{basic_registry.host}/team/app:v1"
    skopeo_push(make_layout(tmp_path), ref, f"alice:{PASSWORD}")
    certs = tmp_path / "certs.d"
    (certs / basic_registry.host).mkdir(parents=True)
    (certs / basic_registry.host / "hosts.toml").write_text(f'ca = "{pki.ca.cert_path}"\n')
    config = tmp_path / "config.toml"
    config.write_text(pysoci_config(f'[registry]\nconfig_path = "{certs}"\n'))
    root = ["--root", str(tmp_path / "root"), "--config", str(config)]
    pysoci("create", ref, *root, "--user", f"alice:{PASSWORD}", "--min-layer-size", "100KiB")
    pysoci("push", ref, *root, "--user", f"alice:{PASSWORD}")
    listing = pysoci("index", "list", "--root", str(tmp_path / "root")).stdout.splitlines()
    index_digest = listing[1].split()[0]
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            f"alice:{PASSWORD}",
            f"docker://{basic_registry.host}/team/app@{index_digest}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert json.loads(raw)["config"]["mediaType"] == SOCI_V1
    # Without any hosts.toml a loopback registry is reached over plain HTTP (as containerd
    # does): a TLS one says so, with what to set.
    res = pysoci(
        "create", ref, "--root", str(tmp_path / "r2"), "--user", f"alice:{PASSWORD}", ok=False
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (
        "speaks HTTPS" in res.stderr and f'server = "https://{basic_registry.host}"' in res.stderr
    )
    # With a hosts.toml saying https but no CA, the registry's certificate is refused, clearly.
    (certs / basic_registry.host / "hosts.toml").write_text(
        f'server = "https://{basic_registry.host}"\n'
    )
    res = pysoci("create", ref, *root, "--user", f"alice:{PASSWORD}", ok=False)
    assert (
        res.returncode == 1
        and "certificate" in res.stderr.lower()
        and "Traceback" not in res.stderr
    )
    (certs / basic_registry.host / "hosts.toml").write_text(f'ca = "{pki.ca.cert_path}"\n')
    # Wrong credentials: an authentication error that does not echo the password.
    res = pysoci("create", ref, *root, "--user", "alice:wrong-pw", ok=False)
    assert res.returncode == 1 and "wrong-pw" not in res.stderr and "Traceback" not in res.stderr


def test_token_auth_convert_and_push_rights(tmp_path: Path, token_registry: Registry) -> None:
    src = f"{token_registry.host}/team/app:v1"
    skopeo_push(make_layout(tmp_path), src, f"alice:{PASSWORD}")
    dst = f"{token_registry.host}/team/app:soci"
    common = ["--plain-http", "--root", str(tmp_path / "root"), "--min-layer-size", "100KiB"]
    pysoci("convert", src, dst, *common, "--user", f"alice:{PASSWORD}")
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            f"alice:{PASSWORD}",
            f"docker://{dst}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert [m.get("artifactType") for m in json.loads(raw)["manifests"]] == [None, SOCI_V2]
    # bob may pull but not push: the conversion fails at the push, with a clear message.
    res = pysoci(
        "convert",
        src,
        f"{token_registry.host}/team/app:bob",
        *common,
        "--user",
        "bob:bob-pw",
        ok=False,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr and "bob-pw" not in res.stderr
