"""create/convert over OCI layouts, checked with skopeo and umoci as independent readers."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from snapshotter.content.indexing import (
    IndexOptions,
    LayoutIndexer,
    NoZtocsError,
    iter_soci_indexes,
)
from snapshotter.content.layout import OciLayout
from snapshotter.errors import CompressionError, DigestMismatchError, ManifestError
from snapshotter.soci import index as soci_index
from snapshotter.soci import oci
from snapshotter.soci.reader import ZtocReader
from snapshotter.soci.ztoc import decode_ztoc
from tests.fixtures.images import TAR_LAYER, ZSTD_LAYER, Layer, gzip_blob, write_image, zstd_blob
from tests.fixtures.tars import random_tar

SPAN = 64 << 10
MIN = 100 << 10  # layers below this get no zTOC in these tests


def big_tar(seed: int) -> bytes:
    while True:
        tar = random_tar(random.Random(seed), max_file_size=200_000, max_entries=60)
        if len(gzip_blob(tar)) > 2 * MIN and len(zstd_blob(tar)) > 2 * MIN:
            return tar
        seed += 1000


def small_tar(seed: int) -> bytes:
    return random_tar(random.Random(seed), max_file_size=100, max_entries=3)


def options(**kw: object) -> IndexOptions:
    return IndexOptions(span_size=SPAN, min_layer_size=MIN, workers=2, **kw)  # type: ignore[arg-type]


def skopeo_raw(layout: Path, tag: str) -> dict[str, object]:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:{tag}"], check=True, capture_output=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, list[Layer]]:
    layers = [
        Layer.from_tar(big_tar(1)),
        Layer.from_tar(small_tar(2)),
        Layer.from_tar(big_tar(3), TAR_LAYER),
        Layer.from_tar(big_tar(4), ZSTD_LAYER),
    ]
    write_image(tmp_path / "img", "v1", layers)
    return tmp_path / "img", layers


def test_create_v1(image: tuple[Path, list[Layer]]) -> None:
    path, layers = image
    layout = OciLayout.open(path)
    results = LayoutIndexer(layout, options()).create("v1")
    assert len(results) == 1
    r = results[0]
    assert [o.status for o in r.layers] == ["built", "skipped", "built", "skipped"]
    assert "min layer size" in r.layers[1].reason and "zstd" in r.layers[3].reason
    idx = soci_index.parse_soci_index(layout.read_blob(r.index_descriptor.digest, max_size=1 << 20))
    assert idx.version == 1
    assert idx.subject is not None and idx.subject.digest == layout.resolve("v1").digest
    assert [d.annotations[soci_index.ANNOTATION_IMAGE_LAYER_DIGEST] for d in idx.ztocs] == [
        r.layers[0].layer.digest,
        r.layers[2].layer.digest,
    ]
    assert layout.has_blob(soci_index.EMPTY_CONFIG_DIGEST)
    # The zTOCs really describe the layers: read every file of the gzip layer through one.
    blob = layers[0].blob
    ztoc = decode_ztoc(layout.read_blob(idx.ztocs[0].digest, max_size=1 << 30))
    reader = ZtocReader(ztoc, lambda s, e: blob[s:e])
    for f in ztoc.files:
        if f.type == "reg":
            reader.read_file(f)
    # Listed in index.json, so it is found again.
    assert [i.subject for i in iter_soci_indexes(layout)] == [idx.subject]


def test_convert_v2_is_readable_by_skopeo(
    image: tuple[Path, list[Layer]],
) -> None:
    path, _ = image
    layout = OciLayout.open(path)
    original = layout.resolve("v1")
    _desc, results = LayoutIndexer(layout, options()).convert("v1", "v1-soci")
    raw = skopeo_raw(path, "v1-soci")
    assert raw["mediaType"] == oci.MEDIA_TYPE_OCI_INDEX
    manifests = raw["manifests"]
    assert isinstance(manifests, list) and len(manifests) == 2
    image_desc, index_desc = manifests
    assert index_desc["artifactType"] == soci_index.SOCI_INDEX_V2
    assert index_desc["mediaType"] == oci.MEDIA_TYPE_OCI_MANIFEST
    assert (
        index_desc["annotations"][soci_index.ANNOTATION_IMAGE_MANIFEST_DIGEST]
        == image_desc["digest"]
    )
    assert index_desc["digest"] == results[0].index_descriptor.digest
    rewritten = json.loads(layout.read_blob(image_desc["digest"], max_size=1 << 20))
    assert rewritten["annotations"][soci_index.ANNOTATION_INDEX_DIGEST] == index_desc["digest"]
    orig = json.loads(layout.read_blob(original.digest, max_size=1 << 20))
    assert rewritten["layers"] == orig["layers"], "layers must be shared with the original"
    v2 = soci_index.parse_soci_index(layout.read_blob(index_desc["digest"], max_size=1 << 20))
    assert v2.version == 2 and v2.subject is None
    # Converting again is refused: it is already SOCI-enabled.
    with pytest.raises(ManifestError, match="already SOCI-enabled"):
        LayoutIndexer(layout, options()).convert("v1-soci", "again")


def test_skopeo_copies_a_converted_image(tmp_path: Path) -> None:
    """A converted image (gzip and zstd layers) copies with every manifest byte for byte.

    skopeo 1.9's image-index type has no artifactType, so it re-encodes the top-level index
    without it; every manifest the index lists keeps its digest and annotations. (Uncompressed
    layers are left out here: skopeo compresses them on copy, changing the image manifest.)
    """
    path = tmp_path / "img"
    write_image(path, "v1", [Layer.from_tar(big_tar(1)), Layer.from_tar(big_tar(4), ZSTD_LAYER)])
    LayoutIndexer(OciLayout.open(path), options()).convert("v1", "v1-soci")
    manifests = skopeo_raw(path, "v1-soci")["manifests"]
    assert isinstance(manifests, list) and len(manifests) == 2
    dst = tmp_path / "copy"
    subprocess.run(
        ["skopeo", "copy", "--all", f"oci:{path}:v1-soci", f"oci:{dst}:x"],
        check=True,
        capture_output=True,
    )
    copied = skopeo_raw(dst, "x")["manifests"]
    assert isinstance(copied, list)
    assert [(m["digest"], m.get("annotations")) for m in copied] == [
        (m["digest"], m.get("annotations")) for m in manifests
    ]


def test_ztocs_are_reused_per_layer_and_span_size(image: tuple[Path, list[Layer]]) -> None:
    path, _ = image
    layout = OciLayout.open(path)
    first = LayoutIndexer(layout, options()).create("v1")[0]
    second = LayoutIndexer(layout, options()).convert("v1", "soci")[1][0]
    assert [o.status for o in second.layers] == ["reused", "skipped", "reused", "skipped"]
    assert [d.digest for d in first.index.ztocs] == [d.digest for d in second.index.ztocs]
    other = LayoutIndexer(layout, IndexOptions(span_size=2 * SPAN, min_layer_size=MIN)).create(
        "v1"
    )[0]
    assert [o.status for o in other.layers] == ["built", "skipped", "built", "skipped"]


def test_no_indexable_layer_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "img", "t", [Layer.from_tar(small_tar(1))])
    with pytest.raises(NoZtocsError):
        LayoutIndexer(OciLayout.open(tmp_path / "img"), options()).create("t")


def test_corrupt_layer_blob_is_detected(tmp_path: Path) -> None:
    write_image(tmp_path / "img", "t", [Layer.from_tar(big_tar(9))])
    layout = OciLayout.open(tmp_path / "img")
    manifest = json.loads(layout.read_blob(layout.resolve("t").digest, max_size=1 << 20))
    blob_path = layout.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(blob_path.read_bytes())
    data[-20] ^= 1  # inside the gzip trailer: inflate may not notice, the digest must
    blob_path.write_bytes(bytes(data))
    # Either the gzip CRC check or the blob digest check catches it; both are typed errors.
    with pytest.raises((DigestMismatchError, CompressionError)):
        LayoutIndexer(layout, options()).create("t")


def test_multi_platform_image(tmp_path: Path) -> None:
    path = tmp_path / "img"
    amd = oci.Platform(os="linux", architecture="amd64")
    arm = oci.Platform(os="linux", architecture="arm64", variant="v8")
    d_amd = write_image(path, "amd", [Layer.from_tar(big_tar(21))], platform=amd)
    d_arm = write_image(path, "arm", [Layer.from_tar(big_tar(22))], platform=arm)
    layout = OciLayout.open(path)
    index = oci.ImageIndex(
        manifests=[
            oci.Descriptor(d_amd.media_type, d_amd.digest, d_amd.size, platform=amd),
            oci.Descriptor(d_arm.media_type, d_arm.digest, d_arm.size, platform=arm),
        ]
    )
    data = index.to_json_bytes()
    layout.set_tag(
        "multi", oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, layout.write_blob(data), len(data))
    )
    only_arm = LayoutIndexer(layout, options(platforms=(arm,))).create("multi")
    assert [r.manifest.digest for r in only_arm] == [d_arm.digest]
    _desc, results = LayoutIndexer(layout, options(all_platforms=True)).convert(
        "multi", "multi-soci"
    )
    assert len(results) == 2
    raw = skopeo_raw(path, "multi-soci")
    manifests = raw["manifests"]
    assert isinstance(manifests, list)
    kinds = [(m["platform"]["architecture"], m.get("artifactType", "image")) for m in manifests]
    assert sorted(kinds) == sorted(
        [
            ("amd64", "image"),
            ("arm64", "image"),
            ("amd64", soci_index.SOCI_INDEX_V2),
            ("arm64", soci_index.SOCI_INDEX_V2),
        ]
    )
    with pytest.raises(ManifestError):
        LayoutIndexer(
            layout, options(platforms=(oci.Platform(os="linux", architecture="s390x"),))
        ).create("multi")


def test_umoci_built_image(tmp_path: Path) -> None:
    """An image made by umoci (an independent writer) indexes like ours."""
    path = tmp_path / "umoci"
    subprocess.run(["umoci", "init", "--layout", str(path)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{path}:base"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{path}:base", str(bundle)], check=True
    )
    rootfs = bundle / "rootfs"
    rng = random.Random(5)
    (rootfs / "data").mkdir()
    for i in range(20):
        (rootfs / "data" / f"f{i}").write_bytes(rng.randbytes(20_000))
    subprocess.run(
        ["umoci", "repack", "--refresh-bundle", "--image", f"{path}:base", str(bundle)], check=True
    )
    results = LayoutIndexer(OciLayout.open(path), options()).create("base")
    built = [o for o in results[0].layers if o.status == "built"]
    assert len(built) == 1


def test_platforms_without_indexable_layers_are_left_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "img"
    amd = oci.Platform(os="linux", architecture="amd64")
    arm = oci.Platform(os="linux", architecture="arm64", variant="v8")
    d_amd = write_image(path, "amd", [Layer.from_tar(big_tar(31))], platform=amd)
    d_arm = write_image(path, "arm", [Layer.from_tar(small_tar(32))], platform=arm)
    layout = OciLayout.open(path)
    index = oci.ImageIndex(
        manifests=[
            oci.Descriptor(d_amd.media_type, d_amd.digest, d_amd.size, platform=amd),
            oci.Descriptor(d_arm.media_type, d_arm.digest, d_arm.size, platform=arm),
        ]
    )
    data = index.to_json_bytes()
    layout.set_tag(
        "multi", oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, layout.write_blob(data), len(data))
    )
    _, results = LayoutIndexer(layout, options(all_platforms=True)).convert("multi", "soci")
    assert [r.manifest.digest for r in results] == [d_amd.digest]
    raw = skopeo_raw(path, "soci")["manifests"]
    assert isinstance(raw, list)
    # The arm64 manifest is listed unchanged, the amd64 one rewritten, plus one SOCI index.
    assert d_arm.digest in [m["digest"] for m in raw] and d_amd.digest not in [
        m["digest"] for m in raw
    ]
    assert len(raw) == 3
    with pytest.raises(NoZtocsError):
        LayoutIndexer(layout, options(platforms=(arm,))).create("multi")
