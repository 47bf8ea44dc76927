"""Image reference parsing and normalisation."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from snapshotter.errors import InvalidReferenceError
from snapshotter.registry.reference import Reference, parse_reference

D = "sha256:" + "a" * 64

VALID = [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("library/ubuntu", "docker.io/library/ubuntu:latest"),
    ("user/app", "docker.io/user/app:latest"),
    ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
    ("index.docker.io/ubuntu:20.04", "docker.io/library/ubuntu:20.04"),
    ("index.docker.io/user/app", "docker.io/user/app:latest"),
    ("public.ecr.aws/docker/library/redis:7", "public.ecr.aws/docker/library/redis:7"),
    ("ghcr.io/owner/repo/sub/image:v1.2.3", "ghcr.io/owner/repo/sub/image:v1.2.3"),
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/foo/bar:t", "localhost:5000/foo/bar:t"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
    ("[::1]:5000/a/b:x", "[::1]:5000/a/b:x"),
    ("[2001:db8::1]/img", "[2001:db8::1]/img:latest"),
    (f"host:5000/a/b@{D}", f"host:5000/a/b@{D}"),
    (f"ubuntu:22.04@{D}", f"docker.io/library/ubuntu:22.04@{D}"),
    ("a/b__c/d-e/f.g/h--i", "docker.io/a/b__c/d-e/f.g/h--i:latest"),
    ("MyHost/app", "MyHost/app:latest"),
    ("registry.example.com:443/x:" + "T" * 128, "registry.example.com:443/x:" + "T" * 128),
    ("foo/bar:_tag", "docker.io/foo/bar:_tag"),
]

INVALID = [
    "",
    "Ubuntu",
    "ubuntu:",
    "ubuntu@",
    "ubuntu@sha256:abc",
    "ubuntu@md5:" + "a" * 32,
    "ubuntu:.tag",
    "ubuntu:-tag",
    "ubuntu:" + "t" * 129,
    "a//b",
    "a/b/",
    "/a",
    "a_/b",
    "a/-b",
    "a/b..c",
    "a/b___c",
    "host:port/a",
    "-host.com/a",
    "a" * 64,
    "example.com/" + "a" * 250,
    "ubuntu:tag:tag",
    "ubuntu tag",
    "UPPER.example.com/Repo",
]


@pytest.mark.parametrize(("text", "canonical"), VALID)
def test_valid(text: str, canonical: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("text", INVALID)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(text)


def test_parts() -> None:
    ref = parse_reference(f"host:5000/a/b:t@{D}")
    assert ref == Reference("host:5000", "a/b", "t", D)
    assert ref.locator == "host:5000/a/b"
    assert ref.object == D
    assert parse_reference("a/b:t").object == "t"
    assert parse_reference(f"a/b@{D}").tag is None
    assert parse_reference("a/b", default_tag=None).tag is None
    with pytest.raises(InvalidReferenceError):
        _ = parse_reference("a/b", default_tag=None).object


def test_with() -> None:
    ref = parse_reference("a/b:t")
    assert str(ref.with_digest(D)) == f"docker.io/a/b:t@{D}"
    assert ref.with_digest(D).with_tag("x") == Reference("docker.io", "a/b", "x", None)
    with pytest.raises(InvalidReferenceError):
        ref.with_digest("sha256:zz")
    with pytest.raises(InvalidReferenceError):
        ref.with_tag("bad tag")


def test_error_message_is_clear() -> None:
    with pytest.raises(InvalidReferenceError, match="must be lowercase"):
        parse_reference("docker.io/Library/ubuntu")
    with pytest.raises(InvalidReferenceError, match="tag"):
        parse_reference("ubuntu:-x")


_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,5}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_host = st.sampled_from(["", "example.com/", "localhost:5000/", "[::1]:80/", "a.b.c:1/"])


@given(_host, st.lists(_component, min_size=1, max_size=4), st.none() | _tag, st.booleans())
def test_roundtrip(host: str, components: list[str], tag: str | None, with_digest: bool) -> None:
    # Without a host, a first component with a dot would itself be read as a registry.
    assume(host or len(components) == 1 or "." not in components[0])
    text = host + "/".join(components)
    if tag is not None:
        text += ":" + tag
    if with_digest:
        text += "@" + D
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    assert ref.repository.endswith("/".join(components))
    assert ref.tag == (tag if tag is not None else (None if with_digest else "latest"))


@given(st.text(max_size=80))
def test_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        return
    assert parse_reference(str(ref)) == ref
