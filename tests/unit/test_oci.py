"""Tests for snapshotter.soci.oci: descriptors, manifests, indexes, digests, platforms."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import DigestMismatchError, ManifestError
from snapshotter.soci import oci
from snapshotter.soci.oci import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    parse_manifest,
    parse_platform,
    select_manifest,
    sha256_digest,
    validate_digest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
D4 = "sha256:" + "4" * 64
D5 = "sha256:" + "5" * 64
D6 = "sha256:" + "6" * 64


def desc_obj(**over: object) -> dict[str, object]:
    obj: dict[str, object] = {"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": D1, "size": 10}
    obj.update(over)
    return obj


# --- digests ------------------------------------------------------------------------------


def test_sha256_digest_matches_hashlib() -> None:
    assert sha256_digest(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("digest", [D1, "sha512:" + "a" * 128])
def test_validate_digest_accepts(digest: str) -> None:
    assert validate_digest(digest) == digest


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "SHA256:" + "a" * 64,
        "sha256:../../etc/passwd",
        " sha256:" + "a" * 64,
        "sha256:" + "a" * 64 + "\n",
    ],
)
def test_validate_digest_rejects(digest: str) -> None:
    with pytest.raises(ManifestError):
        validate_digest(digest)


def test_validate_digest_names_unsupported_algorithm() -> None:
    with pytest.raises(ManifestError, match="unsupported digest algorithm 'md5'"):
        validate_digest("md5:" + "a" * 32)


def test_validate_digest_non_string() -> None:
    with pytest.raises(ManifestError):
        validate_digest(123)


# --- descriptors --------------------------------------------------------------------------


def test_descriptor_full_round_trip_and_field_order() -> None:
    obj = {
        "artifactType": "application/x-art",
        "platform": {
            "variant": "v8",
            "os.features": ["f1"],
            "os.version": "10.0",
            "os": "linux",
            "architecture": "arm64",
        },
        "data": "e30=",
        "annotations": {"b": "2", "a": "1"},
        "urls": ["https://example.com/x"],
        "size": 2,
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "mediaType": "application/json",
    }
    d = Descriptor.from_json_obj(obj)
    assert d.data == b"{}"
    assert d.verified_data() == b"{}"
    assert d.platform == Platform("linux", "arm64", "v8", "10.0", ("f1",))
    out = oci.canonical_json(d.to_json_obj())
    assert out == (
        b'{"mediaType":"application/json",'
        b'"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",'
        b'"size":2,"urls":["https://example.com/x"],"annotations":{"a":"1","b":"2"},'
        b'"data":"e30=","platform":{"architecture":"arm64","os":"linux","os.version":"10.0",'
        b'"os.features":["f1"],"variant":"v8"},"artifactType":"application/x-art"}'
    )
    assert Descriptor.from_json_obj(json.loads(out)) == d


def test_descriptor_minimal_omits_empty_optionals() -> None:
    d = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, D1, 0)
    assert oci.canonical_json(d.to_json_obj()) == (
        b'{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'
        + D1.encode()
        + b'","size":0}'
    )


def test_descriptor_annotations_are_read_only() -> None:
    src = {"a": "1"}
    d = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, D1, 1, src)
    src["b"] = "2"
    assert dict(d.annotations) == {"a": "1"}
    with pytest.raises(TypeError):
        d.annotations["c"] = "3"  # type: ignore[index]


def test_descriptor_verified_data_mismatch() -> None:
    d = Descriptor("application/json", D1, 2, data=b"{}")
    with pytest.raises(DigestMismatchError):
        d.verified_data()
    d = Descriptor("application/json", D1, 3, data=b"{}")
    with pytest.raises(DigestMismatchError):
        d.verified_data()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "must be a JSON object"),
        ("x", "must be a JSON object"),
        (desc_obj(mediaType=None), "mediaType is missing"),
        (desc_obj(mediaType=5), "mediaType must be a string"),
        (desc_obj(digest=None), "digest is missing"),
        (desc_obj(digest=5), "digest"),
        (desc_obj(digest="sha256:abc"), "invalid sha256 digest"),
        (desc_obj(digest="md5:" + "0" * 32), "unsupported digest algorithm"),
        (desc_obj(size=None), "size is missing"),
        (desc_obj(size=True), "size must be an integer"),
        (desc_obj(size=1.0), "size must be an integer"),
        (desc_obj(size="10"), "size must be an integer"),
        (desc_obj(size=-1), "out of range"),
        (desc_obj(size=2**63), "out of range"),
        (desc_obj(annotations=[]), "annotations must be a JSON object"),
        (desc_obj(annotations={"a": 1}), "annotations"),
        (desc_obj(annotations={"a": None}), "annotations"),
        (desc_obj(urls="http://x"), "urls must be an array"),
        (desc_obj(urls=[1]), r"urls\[0\] must be a string"),
        (desc_obj(platform="linux"), "platform must be a JSON object"),
        (desc_obj(platform={"os": "linux"}), "architecture is missing"),
        (desc_obj(platform={"os": "linux", "architecture": 1}), "architecture must be a string"),
        (desc_obj(platform={"os": "l", "architecture": "a", "os.features": "x"}), "os.features"),
        (desc_obj(data="not base64!"), "base64"),
        (desc_obj(data=5), "base64"),
        (desc_obj(data="é"), "base64"),
        (desc_obj(artifactType=[]), "artifactType must be a string"),
        (desc_obj(mediaType="a\ud800"), "invalid unicode"),
        (desc_obj(annotations={"\udc00": "x"}), "invalid unicode"),
    ],
)
def test_descriptor_rejects(obj: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Descriptor.from_json_obj(obj)


def test_descriptor_constructor_validates() -> None:
    with pytest.raises(ManifestError):
        Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, "sha256:nope", 1)
    with pytest.raises(ManifestError):
        Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, D1, -1)


def test_descriptor_null_optionals_are_absent() -> None:
    d = Descriptor.from_json_obj(
        desc_obj(annotations=None, urls=None, platform=None, artifactType=None, data=None)
    )
    assert d == Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, D1, 10)


# --- manifests ----------------------------------------------------------------------------

OCI_MANIFEST = {
    "schemaVersion": 2,
    "mediaType": MEDIA_TYPE_OCI_MANIFEST,
    "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": D1, "size": 100},
    "layers": [
        {"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": D2, "size": 2000},
        {"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": D3, "size": 3000},
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}


def test_manifest_canonical_field_order_and_raw_bytes() -> None:
    # Pretty-printed and with fields in a scrambled order: raw bytes are kept verbatim.
    scrambled = {
        "annotations": {"z": "1", "a": "2"},
        "subject": {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": D4, "size": 5},
        "layers": [{"size": 1, "digest": D2, "mediaType": MEDIA_TYPE_OCI_LAYER_GZIP}],
        "config": {"size": 2, "digest": D1, "mediaType": "application/x-cfg"},
        "artifactType": "application/x-art",
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "schemaVersion": 2,
        "unknownField": {"kept": "in raw only"},
    }
    raw = json.dumps(scrambled, indent=3).encode()
    m = parse_manifest(raw)
    assert isinstance(m, ImageManifest)
    assert m.raw_bytes() == raw
    assert m.digest == sha256_digest(raw)
    assert m.to_json_bytes() == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"artifactType":"application/x-art",'
        b'"config":{"mediaType":"application/x-cfg","digest":"' + D1.encode() + b'","size":2},'
        b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'
        + D2.encode()
        + b'","size":1}],'
        b'"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
        + D4.encode()
        + b'","size":5},'
        b'"annotations":{"a":"2","z":"1"}}'
    )
    desc = m.descriptor()
    assert (desc.digest, desc.size, desc.media_type) == (sha256_digest(raw), len(raw), m.media_type)
    assert desc.artifact_type == "application/x-art"


def test_replace_drops_raw_bytes() -> None:
    raw = json.dumps(OCI_MANIFEST, indent=2).encode()
    m = parse_manifest(raw)
    assert isinstance(m, ImageManifest)
    changed = dataclasses.replace(m, annotations={"x": "y"})
    assert changed.raw_bytes() == changed.to_json_bytes()
    assert changed.digest != m.digest
    # Equality ignores the raw bytes: a reparsed canonical form equals the original.
    assert parse_manifest(m.to_json_bytes()) == m


def test_built_manifest_digest_is_of_canonical_bytes() -> None:
    m = ImageManifest(config=Descriptor(MEDIA_TYPE_OCI_CONFIG, D1, 1))
    assert m.raw_bytes() == m.to_json_bytes()
    assert m.digest == sha256_digest(m.to_json_bytes())
    assert b'"layers":[]' in m.to_json_bytes()


def test_go_html_escaping() -> None:
    m = ImageManifest(
        config=Descriptor(MEDIA_TYPE_OCI_CONFIG, D1, 1),
        annotations={"k": "<a>&b\u2028\u2029 é \n\x01\x7f"},
    )
    out = m.to_json_bytes()
    assert b'"k":"\\u003ca\\u003e\\u0026b\\u2028\\u2029 \xc3\xa9 \\n\\u0001\x7f"' in out
    assert parse_manifest(out) == m


def test_docker_manifest() -> None:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 1469,
                "digest": D1,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": 2479,
                    "digest": D2,
                }
            ],
        },
        indent=3,
    ).encode()
    m = parse_manifest(raw, media_type_hint=MEDIA_TYPE_DOCKER_MANIFEST)
    assert isinstance(m, ImageManifest)
    assert m.is_docker
    assert [d.digest for d in m.layers] == [D2]


DOCKER_MANIFEST_LIST = {
    "schemaVersion": 2,
    "mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    "manifests": [
        {
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "size": 527,
            "digest": D1,
            "platform": {"architecture": "amd64", "os": "linux"},
        },
        {
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "size": 527,
            "digest": D2,
            "platform": {"architecture": "arm", "os": "linux", "variant": "v6"},
        },
        {
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "size": 527,
            "digest": D3,
            "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
        },
        {
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "size": 527,
            "digest": D4,
            "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
        },
        {
            "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
            "size": 1125,
            "digest": D5,
            "platform": {
                "architecture": "amd64",
                "os": "windows",
                "os.version": "10.0.17763.5576",
            },
        },
    ],
}


def test_docker_manifest_list_select() -> None:
    idx = parse_manifest(json.dumps(DOCKER_MANIFEST_LIST).encode())
    assert isinstance(idx, ImageIndex)
    assert idx.media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == D1
    assert select_manifest(idx, Platform("linux", "x86_64")).digest == D1
    assert select_manifest(idx, parse_platform("linux/arm/v6")).digest == D2
    assert select_manifest(idx, parse_platform("linux/arm")).digest == D3  # v7 by default
    assert select_manifest(idx, parse_platform("linux/arm64")).digest == D4
    assert select_manifest(idx, Platform("linux", "aarch64")).digest == D4
    assert select_manifest(idx, parse_platform("windows/amd64")).digest == D5
    with pytest.raises(ManifestError) as info:
        select_manifest(idx, parse_platform("linux/s390x"))
    msg = str(info.value)
    assert "linux/s390x" in msg
    for p in ("linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "windows/amd64"):
        assert p in msg


OCI_INDEX_WITH_ATTESTATIONS = {
    "schemaVersion": 2,
    "mediaType": MEDIA_TYPE_OCI_INDEX,
    "manifests": [
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": D1,
            "size": 100,
            "platform": {"architecture": "amd64", "os": "linux"},
        },
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": D2,
            "size": 100,
            "platform": {"architecture": "arm64", "os": "linux"},
        },
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": D3,
            "size": 839,
            "annotations": {
                "vnd.docker.reference.digest": D1,
                "vnd.docker.reference.type": "attestation-manifest",
            },
            "platform": {"architecture": "unknown", "os": "unknown"},
        },
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": D4,
            "size": 839,
            "annotations": {
                "vnd.docker.reference.digest": D2,
                "vnd.docker.reference.type": "attestation-manifest",
            },
            "platform": {"architecture": "unknown", "os": "unknown"},
        },
    ],
}


def test_oci_index_with_attestations() -> None:
    raw = json.dumps(OCI_INDEX_WITH_ATTESTATIONS).encode()
    idx = parse_manifest(raw)
    assert isinstance(idx, ImageIndex)
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == D1
    assert select_manifest(idx, parse_platform("linux/arm64/v8")).digest == D2
    with pytest.raises(ManifestError) as info:
        select_manifest(idx, Platform("unknown", "unknown"))
    assert "unknown/unknown" not in str(info.value).split("available:")[1]
    # json.dumps with these separators gives Go's encoding of the same structs.
    compact = json.dumps(OCI_INDEX_WITH_ATTESTATIONS, separators=(",", ":")).encode()
    assert idx.to_json_bytes() == compact


def test_select_skips_soci_v2_index_entries() -> None:
    idx = ImageIndex(
        manifests=[
            Descriptor(
                MEDIA_TYPE_OCI_MANIFEST,
                D6,
                10,
                platform=Platform("linux", "amd64"),
                artifact_type=oci._SOCI_INDEX_V2_ARTIFACT_TYPE,
            ),
            Descriptor(MEDIA_TYPE_OCI_MANIFEST, D1, 10, platform=Platform("linux", "amd64")),
        ]
    )
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == D1


def test_select_prefers_exact_variant_then_platformless() -> None:
    idx = ImageIndex(
        manifests=[
            Descriptor(MEDIA_TYPE_OCI_MANIFEST, D1, 1),
            Descriptor(MEDIA_TYPE_OCI_MANIFEST, D2, 1, platform=Platform("linux", "amd64")),
            Descriptor(MEDIA_TYPE_OCI_MANIFEST, D3, 1, platform=Platform("linux", "amd64", "v3")),
        ]
    )
    assert select_manifest(idx, Platform("linux", "amd64", "v3")).digest == D3
    assert select_manifest(idx, Platform("linux", "amd64", "v2")).digest == D2
    assert select_manifest(idx, Platform("linux", "amd64")).digest == D2
    assert select_manifest(idx, Platform("linux", "riscv64")).digest == D1


def test_parse_without_media_type_dispatches_on_fields() -> None:
    man = {k: v for k, v in OCI_MANIFEST.items() if k != "mediaType"}
    m = parse_manifest(json.dumps(man).encode())
    assert isinstance(m, ImageManifest)
    assert m.media_type == ""
    assert b"mediaType" not in m.to_json_bytes()[:30]
    idx = parse_manifest(b'{"schemaVersion":2,"manifests":[]}')
    assert isinstance(idx, ImageIndex)
    assert idx.to_json_bytes() == b'{"schemaVersion":2,"manifests":[]}'
    hinted = parse_manifest(
        b'{"schemaVersion":2,"manifests":[]}', media_type_hint=MEDIA_TYPE_OCI_INDEX
    )
    assert isinstance(hinted, ImageIndex)


def test_unknown_hint_is_ignored() -> None:
    m = parse_manifest(json.dumps(OCI_MANIFEST).encode(), media_type_hint="application/json")
    assert isinstance(m, ImageManifest)


def test_same_kind_hint_is_tolerated() -> None:
    m = parse_manifest(
        json.dumps(OCI_MANIFEST).encode(), media_type_hint=MEDIA_TYPE_DOCKER_MANIFEST
    )
    assert isinstance(m, ImageManifest)
    assert m.media_type == MEDIA_TYPE_OCI_MANIFEST


def test_parse_image_manifest_and_index_wrappers() -> None:
    with pytest.raises(ManifestError, match="expected an image manifest"):
        oci.parse_image_manifest(b'{"schemaVersion":2,"manifests":[]}')
    with pytest.raises(ManifestError, match="expected an image index"):
        oci.parse_image_index(json.dumps(OCI_MANIFEST).encode())


def _nested(depth: int) -> bytes:
    return b'{"schemaVersion":2,"annotations":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("data", "hint", "message"),
    [
        (b"", None, "not valid JSON"),
        (b"not json", None, "not valid JSON"),
        (b"\xff\xfe{}", None, "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", None, "not valid JSON"),
        (b"[]", None, "must be a JSON object"),
        (b"null", None, "must be a JSON object"),
        (b'{"schemaVersion":2}', None, "cannot tell"),
        (b'{"schemaVersion":2,"manifests":[],"layers":[]}', None, "cannot tell"),
        (b'{"schemaVersion":1,"manifests":[]}', None, "schemaVersion must be 2"),
        (b'{"schemaVersion":"2","manifests":[]}', None, "schemaVersion must be 2"),
        (b'{"schemaVersion":true,"manifests":[]}', None, "schemaVersion must be 2"),
        (b'{"schemaVersion":2.0,"manifests":[]}', None, "schemaVersion must be 2"),
        (b'{"manifests":[]}', None, "schemaVersion must be 2"),
        (b'{"schemaVersion":2,"manifests":{}}', None, "manifests must be an array"),
        (b'{"schemaVersion":2,"manifests":[1]}', None, "must be a JSON object"),
        (b'{"schemaVersion":2,"config":null,"layers":[]}', None, "config is missing"),
        (
            b'{"schemaVersion":2,"mediaType":"' + MEDIA_TYPE_OCI_MANIFEST.encode() + b'"}',
            None,
            "config is missing",
        ),
        (b'{"schemaVersion":2,"config":{},"layers":[]}', None, "mediaType is missing"),
        (b'{"schemaVersion":2,"mediaType":5,"manifests":[]}', None, "mediaType must be a string"),
        (b'{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}', None, "unsupported"),
        (
            b'{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}',
            None,
            "schema1",
        ),
        (
            b'{"schemaVersion":2,"mediaType":"'
            + MEDIA_TYPE_OCI_INDEX.encode()
            + b'","manifests":[]}',
            MEDIA_TYPE_OCI_MANIFEST,
            "served as",
        ),
        (
            b'{"schemaVersion":2,"mediaType":"' + MEDIA_TYPE_OCI_INDEX.encode() + b'","layers":[]}',
            None,
            "it is a manifest",
        ),
        (
            b'{"schemaVersion":2,"manifests":[],"mediaType":"'
            + MEDIA_TYPE_OCI_MANIFEST.encode()
            + b'"}',
            None,
            "it is an index",
        ),
        (b'{"schemaVersion":2,"manifests":[],"annotations":{"a":NaN}}', None, "NaN"),
        (b'{"schemaVersion":2,"manifests":[],"x":Infinity}', None, "Infinity"),
        (b'{"schemaVersion":2,"manifests":[],"x":1' + b"0" * 5000 + b"}", None, "not valid JSON"),
        (_nested(100_000), None, "nested too deeply"),
        (b'{"schemaVersion":2,"manifests":[],"annotations":{"a":"\\ud800"}}', None, "unicode"),
        (b'{"schemaVersion":2,"manifests":[],"annotations":"x"}', None, "annotations"),
        (b'{"schemaVersion":2,"manifests":[],"subject":[]}', None, "subject"),
    ],
)
def test_parse_manifest_rejects(data: bytes, hint: str | None, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, media_type_hint=hint)


def test_parse_manifest_size_limit() -> None:
    data = json.dumps(OCI_MANIFEST).encode()
    parse_manifest(data, max_size=len(data))
    with pytest.raises(ManifestError, match="more than the limit"):
        parse_manifest(data, max_size=len(data) - 1)
    huge = b'{"schemaVersion":2,"manifests":[],"x":"' + b"a" * (4 * 1024 * 1024) + b'"}'
    with pytest.raises(ManifestError, match="more than the limit"):
        parse_manifest(huge)


# --- platforms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
        ("linux/arm64", Platform("linux", "arm64", "v8")),
        ("linux/aarch64", Platform("linux", "arm64", "v8")),
        ("linux/arm64/8", Platform("linux", "arm64", "v8")),
        ("Linux/ARM64/V8", Platform("linux", "arm64", "v8")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/arm/6", Platform("linux", "arm", "v6")),
        ("linux/armv7l", Platform("linux", "arm", "v7")),
        ("linux/i386", Platform("linux", "386")),
        ("windows/amd64", Platform("windows", "amd64")),
        ("linux/s390x", Platform("linux", "s390x")),
    ],
)
def test_parse_platform(spec: str, expected: Platform) -> None:
    assert parse_platform(spec) == expected


def test_parse_platform_partial() -> None:
    host = oci.host_platform()
    assert parse_platform("linux") == Platform("linux", host.architecture, host.variant)
    assert parse_platform("arm64") == Platform(host.os, "arm64", "v8")


@pytest.mark.parametrize("spec", ["", "/", "linux/", "a/b/c/d", "linux/amd 64", "linux//v7"])
def test_parse_platform_rejects(spec: str) -> None:
    with pytest.raises(ManifestError):
        parse_platform(spec)


def test_platform_matching() -> None:
    assert Platform("linux", "arm64").matches(Platform("linux", "aarch64", "v8"))
    assert not Platform("linux", "arm64").matches(Platform("linux", "arm64", "v9"))
    assert not Platform("linux", "arm", "v6").matches(Platform("linux", "arm", "v7"))
    assert not Platform("linux", "amd64").matches(Platform("windows", "amd64"))
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"


def test_host_platform_is_normalised() -> None:
    host = oci.host_platform()
    assert host == host.normalized()
    assert host.os == "linux"
    assert host.architecture not in ("x86_64", "aarch64")


# --- hypothesis round trips ---------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_digests = st.sampled_from([D1, D2, D3, "sha512:" + "ab" * 64])
_platforms = st.builds(
    Platform,
    os=_text.filter(bool),
    architecture=_text.filter(bool),
    variant=_text,
    os_version=_text,
    os_features=st.lists(_text, max_size=2).map(tuple),
)
_descriptors = st.builds(
    Descriptor,
    media_type=_text,
    digest=_digests,
    size=st.integers(0, 2**63 - 1),
    annotations=st.dictionaries(_text, _text, max_size=3),
    platform=st.none() | _platforms,
    artifact_type=_text,
    urls=st.lists(_text, max_size=2).map(tuple),
    data=st.none() | st.binary(min_size=1, max_size=8),
)
_manifests = st.builds(
    ImageManifest,
    config=_descriptors,
    layers=st.lists(_descriptors, max_size=3),
    media_type=st.sampled_from([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST, ""]),
    artifact_type=_text,
    subject=st.none() | _descriptors,
    annotations=st.dictionaries(_text, _text, max_size=3),
)
_indexes = st.builds(
    ImageIndex,
    manifests=st.lists(_descriptors, max_size=3),
    media_type=st.sampled_from([MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST, ""]),
    artifact_type=_text,
    subject=st.none() | _descriptors,
    annotations=st.dictionaries(_text, _text, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(_manifests | _indexes)
def test_round_trip(doc: ImageManifest | ImageIndex) -> None:
    data = doc.to_json_bytes()
    parsed = parse_manifest(data)
    assert parsed == doc
    assert parsed.to_json_bytes() == data
    assert parsed.raw_bytes() == data
    # Independent check of the compact encoding: Python's encoder agrees up to Go's
    # HTML escapes.
    assert json.loads(data) == json.loads(
        json.dumps(doc.to_json_obj(), ensure_ascii=False, separators=(",", ":"))
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_only_raises_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=10,
    ),
    st.sampled_from(["config", "layers", "manifests", "subject", "annotations", "mediaType"]),
)
def test_wrong_field_types_only_raise_manifest_error(value: object, key: str) -> None:
    for base in (OCI_MANIFEST, {"schemaVersion": 2, "manifests": []}):
        doc = dict(base)
        doc[key] = value
        with contextlib.suppress(ManifestError):
            parse_manifest(json.dumps(doc).encode())
