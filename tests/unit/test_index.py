"""Tests for snapshotter.soci.index: SOCI index manifests, prefetch artifacts, v2 conversion."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import ManifestError
from snapshotter.soci import index as si
from snapshotter.soci import oci
from snapshotter.soci.index import (
    ANNOTATION_BUILD_TOOL_IDENTIFIER,
    ANNOTATION_IMAGE_LAYER_DIGEST,
    ANNOTATION_IMAGE_MANIFEST_DIGEST,
    ANNOTATION_INDEX_DIGEST,
    ANNOTATION_SPAN_SIZE,
    EMPTY_CONFIG_BYTES,
    EMPTY_CONFIG_DIGEST,
    SOCI_INDEX_V1,
    SOCI_INDEX_V2,
    PrefetchArtifact,
    PrefetchSpan,
    SociIndex,
    add_index_to_image_index,
    encode_prefetch,
    find_soci_index_digest,
    parse_prefetch,
    parse_soci_index,
    soci_enable_manifest,
    span_size_of,
    ztoc_descriptor,
)
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
    parse_manifest,
    select_manifest,
)

LAYER1 = "sha256:" + "a1" * 32
LAYER2 = "sha256:" + "a2" * 32
LAYER3 = "sha256:" + "a3" * 32
ZTOC1 = "sha256:" + "b1" * 32
ZTOC2 = "sha256:" + "b2" * 32
PREFETCH1 = "sha256:" + "c1" * 32
IMAGE = "sha256:" + "d1" * 32
CONFIG = "sha256:" + "e1" * 32

# A SOCI v1 index as soci's Go code marshals it (compact, struct field order, sorted maps),
# written by hand from the format description.
SOCI_V1_JSON = (
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    '"config":{"mediaType":"application/vnd.amazon.soci.index.v1+json",'
    '"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",'
    '"size":2},'
    '"layers":['
    '{"mediaType":"application/octet-stream","digest":"' + ZTOC1 + '","size":1234,'
    '"annotations":{"com.amazon.soci.image-layer-digest":"' + LAYER1 + '",'
    '"com.amazon.soci.image-layer-mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",'
    '"com.amazon.soci.span-size":"4194304"}},'
    '{"mediaType":"application/octet-stream","digest":"' + ZTOC2 + '","size":5678,'
    '"annotations":{"com.amazon.soci.disable-xattrs":"true",'
    '"com.amazon.soci.image-layer-digest":"' + LAYER2 + '",'
    '"com.amazon.soci.image-layer-mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip",'
    '"com.amazon.soci.span-size":"1048576"}},'
    '{"mediaType":"application/vnd.amazon.soci.prefetch.v1+json","digest":"' + PREFETCH1 + '",'
    '"size":77,"annotations":{"com.amazon.soci.image-layer-digest":"' + LAYER1 + '"}}'
    "],"
    '"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
    + IMAGE
    + '","size":1000},'
    '"annotations":{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.4"}}'
).encode()


def build_v1() -> SociIndex:
    return SociIndex(
        version=1,
        ztocs=[
            ztoc_descriptor(
                ZTOC1,
                1234,
                layer_digest=LAYER1,
                layer_media_type=MEDIA_TYPE_OCI_LAYER_GZIP,
                span_size=4 * 1024 * 1024,
            ),
            ztoc_descriptor(
                ZTOC2,
                5678,
                layer_digest=LAYER2,
                layer_media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
                span_size=1024 * 1024,
                disable_xattrs=True,
            ),
        ],
        prefetches=[si.prefetch_descriptor(PREFETCH1, 77, layer_digest=LAYER1)],
        subject=Descriptor(MEDIA_TYPE_OCI_MANIFEST, IMAGE, 1000),
        annotations={ANNOTATION_BUILD_TOOL_IDENTIFIER: "AWS SOCI CLI v0.4"},
    )


def test_constants() -> None:
    assert hashlib.sha256(EMPTY_CONFIG_BYTES).hexdigest() == EMPTY_CONFIG_DIGEST.split(":")[1]
    assert oci.sha256_digest(b"{}") == EMPTY_CONFIG_DIGEST
    assert oci._SOCI_INDEX_V2_ARTIFACT_TYPE == SOCI_INDEX_V2
    assert SOCI_INDEX_V1 == "application/vnd.amazon.soci.index.v1+json"
    assert si.MEDIA_TYPE_ZTOC == "application/octet-stream"


def test_v1_build_matches_hand_written_json() -> None:
    idx = build_v1()
    assert idx.to_json_bytes() == SOCI_V1_JSON
    m = idx.to_manifest()
    assert m.config == Descriptor(SOCI_INDEX_V1, EMPTY_CONFIG_DIGEST, 2)
    assert m.artifact_type == ""
    assert m.digest == oci.sha256_digest(SOCI_V1_JSON)


def test_v1_parse() -> None:
    idx = parse_soci_index(SOCI_V1_JSON)
    assert idx == build_v1()
    assert idx.version == 1
    assert idx.build_tool_identifier == "AWS SOCI CLI v0.4"
    z = idx.ztoc_for_layer(LAYER2)
    assert z is not None and z.digest == ZTOC2
    assert span_size_of(z) == 1024 * 1024
    assert si.disable_xattrs_of(z)
    z1 = idx.ztoc_for_layer(LAYER1)
    assert z1 is not None and not si.disable_xattrs_of(z1)
    assert idx.ztoc_for_layer(LAYER3) is None
    p = idx.prefetch_for_layer(LAYER1)
    assert p is not None and p.digest == PREFETCH1
    assert idx.prefetch_for_layer(LAYER2) is None


def test_v1_parse_pretty_printed() -> None:
    pretty = json.dumps(json.loads(SOCI_V1_JSON), indent=4).encode()
    assert parse_soci_index(pretty) == build_v1()


def test_v2_has_no_subject() -> None:
    idx = SociIndex(version=2, ztocs=build_v1().ztocs)
    data = idx.to_json_bytes()
    obj = json.loads(data)
    assert "subject" not in obj
    assert "artifactType" not in obj
    assert obj["config"] == {
        "mediaType": SOCI_INDEX_V2,
        "digest": EMPTY_CONFIG_DIGEST,
        "size": 2,
    }
    assert parse_soci_index(data) == idx
    with pytest.raises(ManifestError):
        SociIndex(version=2, subject=Descriptor(MEDIA_TYPE_OCI_MANIFEST, IMAGE, 1))
    with pytest.raises(ManifestError):
        SociIndex(version=3)


def _mutated(mutate: object) -> bytes:
    obj = json.loads(SOCI_V1_JSON)
    assert callable(mutate)
    mutate(obj)
    return json.dumps(obj).encode()


def _set_ann(i: int, key: str, value: object) -> object:
    def f(obj: dict[str, object]) -> None:
        layers = obj["layers"]
        assert isinstance(layers, list)
        layers[i]["annotations"][key] = value

    return f


def _del_ann(i: int, key: str) -> object:
    def f(obj: dict[str, object]) -> None:
        layers = obj["layers"]
        assert isinstance(layers, list)
        del layers[i]["annotations"][key]

    return f


def _set(path: tuple[object, ...], value: object) -> object:
    def f(obj: object) -> None:
        for p in path[:-1]:
            obj = obj[p]  # type: ignore[index]
        obj[path[-1]] = value  # type: ignore[index]

    return f


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _mutated(_set(("config", "mediaType"), MEDIA_TYPE_OCI_CONFIG)),
            "not a SOCI index: config",
        ),
        (
            _mutated(_set(("config", "mediaType"), "application/vnd.amazon.soci.index.v3+json")),
            "not a SOCI",
        ),
        (_mutated(_set(("mediaType",), MEDIA_TYPE_DOCKER_MANIFEST)), "not a SOCI index"),
        (_mutated(_set(("mediaType",), MEDIA_TYPE_OCI_INDEX)), "it is a manifest"),
        (_mutated(_del_ann(0, ANNOTATION_SPAN_SIZE)), "span-size"),
        (_mutated(_del_ann(0, ANNOTATION_IMAGE_LAYER_DIGEST)), "image-layer-digest"),
        (_mutated(_del_ann(2, ANNOTATION_IMAGE_LAYER_DIGEST)), "image-layer-digest"),
        (_mutated(_set_ann(0, ANNOTATION_IMAGE_LAYER_DIGEST, "sha256:zz")), "image-layer-digest"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "4MiB")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "0")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "-1")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "+5")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, " 5")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "٣")), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, "9" * 30)), "positive decimal"),
        (_mutated(_set_ann(0, ANNOTATION_SPAN_SIZE, 4194304)), "must be a string"),
        (_mutated(_set(("layers", 0, "annotations"), None)), "span-size|image-layer-digest"),
        (_mutated(_set(("layers", 1, "mediaType"), MEDIA_TYPE_OCI_LAYER_GZIP)), "neither a zTOC"),
        (_mutated(_set(("layers", 0, "size"), "1234")), "size must be an integer"),
        (_mutated(_set(("layers",), {})), "layers must be an array"),
        (_mutated(_set(("config",), "x")), "config must be a JSON object"),
        (_mutated(_set(("annotations",), ["x"])), "annotations"),
        (_mutated(_set(("schemaVersion",), 1)), "schemaVersion"),
        (b'{"schemaVersion":2,"manifests":[]}', "expected an image manifest"),
        (b"\x00\x01", "not valid JSON"),
        (b"{" * 50000, "nested too deeply|not valid JSON"),
        (b'{"a":' * 50000 + b"1" + b"}" * 50000, "nested too deeply"),
        (SOCI_V1_JSON[:-1] + b" " * (4 * 1024 * 1024) + b"}", "more than the limit"),
    ],
)
def test_bad_indexes(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_soci_index(data)


def test_wrong_config_media_type_message() -> None:
    data = _mutated(_set(("config", "mediaType"), MEDIA_TYPE_OCI_CONFIG))
    with pytest.raises(
        ManifestError,
        match=re.escape(f"not a SOCI index: config media type '{MEDIA_TYPE_OCI_CONFIG}'"),
    ):
        parse_soci_index(data)


def test_ztoc_descriptor_validates() -> None:
    with pytest.raises(ManifestError):
        ztoc_descriptor(ZTOC1, 1, layer_digest=LAYER1, layer_media_type="x", span_size=0)
    with pytest.raises(ManifestError):
        ztoc_descriptor(ZTOC1, 1, layer_digest="sha256:x", layer_media_type="x", span_size=1)
    with pytest.raises(ManifestError):
        span_size_of(Descriptor(si.MEDIA_TYPE_ZTOC, ZTOC1, 1))


# --- prefetch -----------------------------------------------------------------------------


def test_prefetch_encode_exact() -> None:
    art = PrefetchArtifact(LAYER1, (PrefetchSpan(0, 3), PrefetchSpan(10, 10, 2)))
    data = encode_prefetch(art)
    assert data == (
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":3},'
        b'{"start_span":10,"end_span":10,"priority":2}]}'
    )  # soci's encoding: struct field order, `priority` omitted when 0
    assert parse_prefetch(data, LAYER1) == art


def test_prefetch_parse_tolerates_missing_priority() -> None:
    art = parse_prefetch(
        b'{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":2}]}', LAYER1
    )
    assert art.spans == (PrefetchSpan(1, 2, 0),)


def test_prefetch_descriptor() -> None:
    d = si.prefetch_descriptor(PREFETCH1, 5, layer_digest=LAYER1)
    assert d.media_type == "application/vnd.amazon.soci.prefetch.v1+json"
    assert dict(d.annotations) == {ANNOTATION_IMAGE_LAYER_DIGEST: LAYER1}


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"{}",
        b'{"version":"2.0","prefetch_spans":[]}',
        b'{"version":1.0,"prefetch_spans":[]}',
        b'{"version":"1.0","prefetch_spans":{}}',
        b'{"version":"1.0","prefetch_spans":[1]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":1}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2,"priority":-1}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":true,"end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":"2"}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2.0}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":1e400}]}',
        b"nope",
    ],
)
def test_prefetch_rejects(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_prefetch(data, LAYER1)


def test_prefetch_rejects_bad_layer_digest_and_size() -> None:
    with pytest.raises(ManifestError):
        parse_prefetch(b'{"version":"1.0","prefetch_spans":[]}', "sha256:x")
    with pytest.raises(ManifestError, match="limit"):
        parse_prefetch(b'{"version":"1.0","prefetch_spans":[]}', LAYER1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**40), st.integers(0, 2**20), st.integers(0, 10)).map(
            lambda t: PrefetchSpan(t[0], t[0] + t[1], t[2])
        ),
        max_size=20,
    )
)
def test_prefetch_round_trip(spans: list[PrefetchSpan]) -> None:
    art = PrefetchArtifact(LAYER2, tuple(spans))
    data = encode_prefetch(art)
    assert parse_prefetch(data, LAYER2) == art
    assert json.loads(data)["prefetch_spans"] == [
        {"start_span": s.start_span, "end_span": s.end_span}
        | ({"priority": s.priority} if s.priority else {})
        for s in spans
    ]  # soci: `priority,omitempty`


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 2**40), st.booleans(), st.sampled_from([LAYER1, LAYER2, LAYER3])),
        max_size=5,
    ),
    st.sampled_from([1, 2]),
)
def test_soci_index_round_trip(entries: list[tuple[int, bool, str]], version: int) -> None:
    idx = SociIndex(
        version=version,
        ztocs=[
            ztoc_descriptor(
                ZTOC1, 10, layer_digest=lay, layer_media_type="m", span_size=span, disable_xattrs=dx
            )
            for span, dx, lay in entries
        ],
        subject=Descriptor(MEDIA_TYPE_OCI_MANIFEST, IMAGE, 3) if version == 1 else None,
    )
    assert parse_soci_index(idx.to_json_bytes()) == idx


# --- SOCI v2 ------------------------------------------------------------------------------

DOCKER_IMAGE = {
    "schemaVersion": 2,
    "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
    "config": {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "size": 1469,
        "digest": CONFIG,
    },
    "layers": [
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 2479,
            "digest": LAYER1,
        },
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 99,
            "digest": LAYER2,
            "urls": ["https://example.com/l2"],
        },
    ],
}


def test_soci_enable_manifest() -> None:
    original = parse_manifest(json.dumps(DOCKER_IMAGE, indent=2).encode())
    assert isinstance(original, ImageManifest)
    index_digest = "sha256:" + "f1" * 32
    rewritten = soci_enable_manifest(original, index_digest)
    assert rewritten.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert rewritten.config == Descriptor(MEDIA_TYPE_OCI_CONFIG, CONFIG, 1469)
    assert rewritten.layers == original.layers
    assert dict(rewritten.annotations) == {ANNOTATION_INDEX_DIGEST: index_digest}
    assert rewritten.digest == oci.sha256_digest(rewritten.to_json_bytes())
    assert find_soci_index_digest(rewritten) == index_digest
    assert find_soci_index_digest(original) is None
    bad = ImageManifest(config=rewritten.config, annotations={ANNOTATION_INDEX_DIGEST: "nope"})
    with pytest.raises(ManifestError):
        find_soci_index_digest(bad)
    with pytest.raises(ManifestError):
        soci_enable_manifest(original, "sha256:1")


def test_add_index_single_platform_wraps() -> None:
    original = Descriptor(MEDIA_TYPE_DOCKER_MANIFEST, IMAGE, 500)
    rewritten = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "d2" * 32, 600)
    soci = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "f1" * 32, 700)
    amd64 = Platform("linux", "amd64")
    out = add_index_to_image_index(None, original, rewritten, soci, amd64)
    # Hand-written expected JSON.
    assert (
        out.to_json_bytes()
        == (
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['
            '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'
            + "d2"
            * 32
            + '","size":600,"platform":{"architecture":"amd64","os":"linux"}},'
            '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'
            + "f1"
            * 32
            + '","size":700,'
            '"annotations":{"com.amazon.soci.image-manifest-digest":"sha256:' + "d2" * 32 + '"},'
            '"platform":{"architecture":"amd64","os":"linux"},'
            '"artifactType":"application/vnd.amazon.soci.index.v2+json"}]}'
        ).encode()
    )
    assert select_manifest(out, amd64).digest == rewritten.digest
    assert [d.digest for d in si.soci_index_entries(out)] == [soci.digest]


# An image index that a SOCI v2 conversion produced, written by hand from the format facts.
V2_IMAGE_INDEX = {
    "schemaVersion": 2,
    "mediaType": MEDIA_TYPE_OCI_INDEX,
    "manifests": [
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": "sha256:" + "11" * 32,
            "size": 900,
            "platform": {"architecture": "amd64", "os": "linux"},
        },
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": "sha256:" + "22" * 32,
            "size": 901,
            "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
        },
        {
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": "sha256:" + "33" * 32,
            "size": 1200,
            "annotations": {ANNOTATION_IMAGE_MANIFEST_DIGEST: "sha256:" + "11" * 32},
            "platform": {"architecture": "amd64", "os": "linux"},
            "artifactType": SOCI_INDEX_V2,
        },
    ],
}


def test_v2_image_index_fixture() -> None:
    raw = json.dumps(V2_IMAGE_INDEX).encode()
    idx = parse_manifest(raw)
    assert isinstance(idx, ImageIndex)
    assert idx.to_json_bytes() == json.dumps(V2_IMAGE_INDEX, separators=(",", ":")).encode()
    amd64 = Platform("linux", "amd64")
    assert select_manifest(idx, amd64).digest == "sha256:" + "11" * 32
    entries = si.soci_index_entries(idx)
    assert len(entries) == 1
    assert entries[0].annotations[ANNOTATION_IMAGE_MANIFEST_DIGEST] == "sha256:" + "11" * 32


def test_add_index_multi_platform_replaces_and_is_idempotent() -> None:
    idx = parse_manifest(json.dumps(V2_IMAGE_INDEX).encode())
    assert isinstance(idx, ImageIndex)
    arm64 = Platform("linux", "arm64", "v8")
    original = idx.manifests[1]
    rewritten = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "44" * 32, 950)
    soci = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "55" * 32, 1300)
    out = add_index_to_image_index(idx, original, rewritten, soci, arm64)
    digests = [d.digest for d in out.manifests]
    assert digests == [
        "sha256:" + "11" * 32,
        "sha256:" + "44" * 32,
        "sha256:" + "33" * 32,
        "sha256:" + "55" * 32,
    ]
    assert out.manifests[1].platform == arm64
    assert out.manifests[3].artifact_type == SOCI_INDEX_V2
    assert out.manifests[3].platform == arm64
    assert out.manifests[3].annotations[ANNOTATION_IMAGE_MANIFEST_DIGEST] == rewritten.digest
    assert select_manifest(out, arm64).digest == rewritten.digest
    # Converting again (new index for the same manifest) replaces the earlier SOCI entry.
    soci2 = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "66" * 32, 1301)
    again = add_index_to_image_index(out, original, rewritten, soci2, arm64)
    assert [d.digest for d in again.manifests] == [*digests[:3], soci2.digest]


def test_add_index_rejects_unknown_manifest() -> None:
    idx = parse_manifest(json.dumps(V2_IMAGE_INDEX).encode())
    assert isinstance(idx, ImageIndex)
    stranger = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "99" * 32, 1)
    with pytest.raises(ManifestError, match="not in the image index"):
        add_index_to_image_index(idx, stranger, stranger, stranger, Platform("linux", "amd64"))


def test_docker_manifest_list_becomes_oci_index() -> None:
    idx = ImageIndex(
        manifests=[
            Descriptor(MEDIA_TYPE_DOCKER_MANIFEST, IMAGE, 5, platform=Platform("linux", "amd64"))
        ],
        media_type=oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    )
    rewritten = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "44" * 32, 6)
    soci = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "55" * 32, 7)
    out = add_index_to_image_index(
        idx, idx.manifests[0], rewritten, soci, Platform("linux", "amd64")
    )
    assert out.media_type == MEDIA_TYPE_OCI_INDEX
    assert out.manifests[0].platform == Platform("linux", "amd64")
