"""Tests for snapshotter.content.layout, checked against umoci and skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.content.layout import OciLayout, validate_tag
from snapshotter.errors import ContentNotFoundError, DigestMismatchError, FormatError, ManifestError
from snapshotter.soci.oci import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    parse_image_manifest,
    parse_manifest,
    sha256_digest,
)

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")
needs_umoci = pytest.mark.skipif(UMOCI is None, reason="umoci not installed")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")


def run(*args: str) -> bytes:
    proc = subprocess.run(args, capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, f"{args} failed: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def leftover_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip tar layer and its diff ID."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = buf.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_digest(tar_bytes)


def write_image(layout: OciLayout, files: dict[str, bytes]) -> ImageManifest:
    layer, diff_id = make_layer(files)
    layer_digest, layer_size = layout.write_blob_from_stream(
        layer[i : i + 100] for i in range(0, len(layer), 100)
    )
    assert layer_size == len(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_digest = layout.write_blob(config)
    manifest = ImageManifest(
        config=Descriptor(MEDIA_TYPE_OCI_CONFIG, config_digest, len(config)),
        layers=[Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, layer_digest, layer_size)],
        annotations={"org.example.note": "<made & tested>"},
    )
    layout.put_manifest(manifest)
    return manifest


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[OciLayout]:
    lay = OciLayout.open(tmp_path / "layout", create=True)
    yield lay
    assert leftover_temp_files(lay.root) == []


# --- reading layouts written by umoci and skopeo --------------------------------------------


@needs_umoci
def test_read_umoci_layout(tmp_path: Path) -> None:
    root = tmp_path / "umoci"
    run("umoci", "init", "--layout", str(root))
    run("umoci", "new", "--image", f"{root}:t1")
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello from umoci")
    run(
        "umoci",
        "config",
        "--image",
        f"{root}:t1",
        "--tag",
        "t2",
        "--manifest.annotation",
        "x=<a>&b",
    )
    run("umoci", "insert", "--rootless", "--image", f"{root}:t2", str(src), "/hello.txt")

    lay = OciLayout.open(root)
    assert lay.tags() == ["t1", "t2"]
    # umoci is Go: our canonical encoding reproduces its index.json and manifests byte for byte.
    raw_index = (root / "index.json").read_bytes()
    assert lay.index().to_json_bytes() == raw_index.rstrip(b"\n")  # Go's Encoder adds \n
    assert lay.index().raw_bytes() == raw_index

    desc = lay.resolve("t2")
    assert desc.annotations[ANNOTATION_REF_NAME] == "t2"
    raw = lay.read_blob(desc.digest, max_size=1 << 20)
    manifest = parse_image_manifest(raw, media_type_hint=desc.media_type)
    assert manifest.to_json_bytes() == raw.rstrip(b"\n")
    assert manifest.digest == desc.digest
    assert manifest.annotations["x"] == "<a>&b"
    config = json.loads(lay.read_blob(manifest.config.digest, max_size=1 << 20))
    assert config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest.layers) == 1

    with lay.open_blob(manifest.layers[0].digest) as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
        # umoci 0.4.7 `insert` writes no end-of-archive blocks, so read only the first entry.
        info = tar.next()
        assert info is not None and info.name == "hello.txt"
        member = tar.extractfile(info)
        assert member is not None and member.read() == b"hello from umoci"

    assert lay.resolve(desc.digest) == desc
    with pytest.raises(ContentNotFoundError, match="available tags: t1, t2"):
        lay.resolve("nope")


@needs_umoci
@needs_skopeo
def test_read_skopeo_layout(tmp_path: Path) -> None:
    src = tmp_path / "umoci"
    run("umoci", "init", "--layout", str(src))
    run("umoci", "new", "--image", f"{src}:t1")
    dst = tmp_path / "skopeo"
    run("skopeo", "copy", "--quiet", f"oci:{src}:t1", f"oci:{dst}:copied")
    lay = OciLayout.open(dst)
    desc = lay.resolve("copied")
    manifest = parse_image_manifest(lay.read_blob(desc.digest, max_size=1 << 20))
    assert lay.has_blob(manifest.config.digest)
    assert run("skopeo", "inspect", "--raw", f"oci:{dst}:copied") == manifest.raw_bytes()


# --- writing layouts that umoci and skopeo read ---------------------------------------------


@needs_umoci
@needs_skopeo
def test_written_layout_is_read_by_umoci_and_skopeo(layout: OciLayout, tmp_path: Path) -> None:
    manifest = write_image(layout, {"hello.txt": b"hello from pysoci"})
    layout.set_tag("v1", manifest.descriptor())
    root = str(layout.root)

    assert run("umoci", "ls", "--layout", root).split() == [b"v1"]
    assert run("skopeo", "inspect", "--raw", f"oci:{root}:v1") == manifest.raw_bytes()
    info = json.loads(run("skopeo", "inspect", f"oci:{root}:v1"))
    assert info["Digest"] == manifest.digest
    assert info["Layers"] == [manifest.layers[0].digest]
    # umoci verifies every blob digest and the diff ID while unpacking.
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--rootless", "--image", f"{root}:v1", str(bundle))
    assert (bundle / "rootfs" / "hello.txt").read_bytes() == b"hello from pysoci"

    # Retagging replaces; more tags show up; removing one hides it.
    second = write_image(layout, {"other.txt": b"2"})
    layout.set_tag("v1", second.descriptor())
    layout.set_tag("v2", manifest.descriptor())
    assert sorted(run("umoci", "ls", "--layout", root).split()) == [b"v1", b"v2"]
    assert run("skopeo", "inspect", "--raw", f"oci:{root}:v1") == second.raw_bytes()
    assert layout.resolve("v1").digest == second.digest
    layout.remove_tag("v2")
    assert run("umoci", "ls", "--layout", root).split() == [b"v1"]
    with pytest.raises(ContentNotFoundError):
        layout.remove_tag("v2")


@needs_umoci
def test_add_manifest_keeps_blobs_through_umoci_gc(layout: OciLayout) -> None:
    manifest = write_image(layout, {"a": b"a"})
    desc = manifest.descriptor()
    layout.add_manifest(desc)
    layout.add_manifest(desc)
    assert [d.digest for d in layout.index().manifests] == [desc.digest]
    orphan = layout.write_blob(b"orphan")
    run("umoci", "gc", "--layout", str(layout.root))
    assert not layout.has_blob(orphan)
    for d in (desc, manifest.config, *manifest.layers):
        assert layout.has_blob(d.digest)
    # An untagged entry is resolvable by digest, and a tag does not count as a duplicate.
    assert layout.resolve(desc.digest).digest == desc.digest
    layout.set_tag("t", desc)
    layout.add_manifest(desc)
    assert len(layout.index().manifests) == 2


# --- blobs ---------------------------------------------------------------------------------


def test_blob_round_trip_and_idempotence(layout: OciLayout) -> None:
    digest = layout.write_blob(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert layout.blob_path(digest) == layout.root / "blobs" / "sha256" / digest[7:]
    assert layout.write_blob(b"hello") == digest
    assert layout.write_blob_from_stream([b"he", b"", b"llo"]) == (digest, 5)
    assert layout.read_blob(digest, max_size=5) == b"hello"
    with pytest.raises(FormatError):
        layout.read_blob(digest, max_size=4)
    assert layout.has_blob(digest)
    assert not layout.has_blob("sha256:" + "0" * 64)


def test_stream_sha512_and_expected_digest(layout: OciLayout) -> None:
    want = "sha512:" + hashlib.sha512(b"data").hexdigest()
    assert layout.write_blob_from_stream([b"da", b"ta"], expected_digest=want) == (want, 4)
    assert layout.read_blob(want, max_size=10) == b"data"
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatchError):
        layout.write_blob_from_stream([b"data"], expected_digest=wrong)
    assert not layout.has_blob(wrong)


def test_stream_failure_leaves_nothing(layout: OciLayout) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("network went away")

    with pytest.raises(OSError, match="network went away"):
        layout.write_blob_from_stream(chunks())
    assert list((layout.root / "blobs" / "sha256").iterdir()) == []


def test_corrupted_and_missing_blobs(layout: OciLayout) -> None:
    digest = layout.write_blob(b"precious bytes")
    path = layout.blob_path(digest)
    path.write_bytes(b"precious bytez")
    with pytest.raises(DigestMismatchError):
        layout.read_blob(digest, max_size=100)
    # write_blob trusts an existing blob of the right size but replaces a wrong-size one.
    path.write_bytes(b"short")
    layout.write_blob(b"precious bytes")
    assert layout.read_blob(digest, max_size=100) == b"precious bytes"

    missing = "sha256:" + "f" * 64
    with pytest.raises(ContentNotFoundError):
        layout.read_blob(missing, max_size=100)
    with pytest.raises(ContentNotFoundError):
        layout.open_blob(missing)
    with pytest.raises(ContentNotFoundError):
        layout.resolve(missing)


@pytest.mark.parametrize(
    "digest", ["sha256:../../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32, "x"]
)
def test_blob_path_rejects_bad_digests(layout: OciLayout, digest: str) -> None:
    with pytest.raises(ManifestError):
        layout.blob_path(digest)


# --- index.json ----------------------------------------------------------------------------


def test_create_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "new"
    lay = OciLayout.open(root, create=True)
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert lay.index() == ImageIndex(media_type=MEDIA_TYPE_OCI_INDEX)
    lay.set_tag("keep", Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "1" * 64, 3))
    again = OciLayout.open(root, create=True)  # must not reset an existing layout
    assert again.tags() == ["keep"]
    assert leftover_temp_files(root) == []


def test_open_rejects_non_layouts(tmp_path: Path) -> None:
    with pytest.raises(ContentNotFoundError):
        OciLayout.open(tmp_path / "absent")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "oci-layout").write_text('{"imageLayoutVersion":"2.0.0"}')
    (bad / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
    with pytest.raises(ManifestError, match="imageLayoutVersion"):
        OciLayout.open(bad)
    (bad / "oci-layout").write_text("[")
    with pytest.raises(ManifestError):
        OciLayout.open(bad)
    (bad / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (bad / "index.json").unlink()
    with pytest.raises(ManifestError, match=r"index\.json"):
        OciLayout.open(bad)
    (bad / "index.json").write_text('{"schemaVersion":2,"manifests":"x"}')
    lay = OciLayout.open(bad)
    with pytest.raises(ManifestError, match=r"index\.json"):
        lay.index()


def test_set_tag_replaces_and_keeps_other_entries(layout: OciLayout) -> None:
    d1 = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "1" * 64, 1, {"keep": "me"})
    d2 = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "2" * 64, 2)
    layout.set_tag("a", d1)
    layout.set_tag("b", d1)
    layout.set_tag("a", d2)
    assert layout.tags() == ["b", "a"]
    assert layout.resolve("a").digest == d2.digest
    assert dict(layout.resolve("b").annotations) == {"keep": "me", ANNOTATION_REF_NAME: "b"}
    raw = (layout.root / "index.json").read_bytes()
    assert parse_manifest(raw) == layout.index()


def test_resolve_blob_only_digest(layout: OciLayout) -> None:
    manifest = ImageManifest(config=Descriptor(MEDIA_TYPE_OCI_CONFIG, "sha256:" + "3" * 64, 5))
    digest = layout.write_blob(manifest.to_json_bytes())
    desc = layout.resolve(digest)
    assert desc == manifest.descriptor()
    not_manifest = layout.write_blob(b"\x00binary")
    with pytest.raises(ManifestError):
        layout.resolve(not_manifest)


def test_resolve_containerd_image_name(layout: OciLayout) -> None:
    d = Descriptor(
        MEDIA_TYPE_OCI_MANIFEST,
        "sha256:" + "4" * 64,
        4,
        {"io.containerd.image.name": "docker.io/library/alpine:3"},
    )
    layout.add_manifest(d)
    assert layout.resolve("docker.io/library/alpine:3").digest == d.digest


@pytest.mark.parametrize("tag", ["", "-x", "a b", "a/", "x\n", "a" * 5000, "/a", "a..b"])
def test_invalid_tags(layout: OciLayout, tag: str) -> None:
    with pytest.raises(ManifestError):
        validate_tag(tag)
    with pytest.raises(ManifestError):
        layout.set_tag(tag, Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "1" * 64, 1))


@pytest.mark.parametrize(
    "tag", ["latest", "v1.2.3", "docker.io/library/alpine:3.19", "a--b", "a@b+c"]
)
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


def test_concurrent_set_tag(layout: OciLayout) -> None:
    d = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "5" * 64, 5)

    def worker(n: int) -> None:
        for i in range(5):
            OciLayout.open(layout.root).set_tag(f"t{n}-{i}", d)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(layout.tags()) == sorted(f"t{n}-{i}" for n in range(6) for i in range(5))


def test_remove_manifest(layout: OciLayout) -> None:
    d1 = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "1" * 64, 1)
    d2 = Descriptor(MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "2" * 64, 2)
    layout.add_manifest(d1)
    layout.set_tag("t", d1)
    layout.set_tag("u", d2)
    assert layout.remove_manifest(d1.digest)
    assert [d.digest for d in layout.index().manifests] == [d2.digest]
    assert not layout.remove_manifest(d1.digest)
    with pytest.raises(ManifestError):
        layout.remove_manifest("sha256:bad")
