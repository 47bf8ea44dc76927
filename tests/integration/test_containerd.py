"""The snapshotter with real containerd 1.6, runc, ctr-remote and nerdctl.

One image does most of the work: a Debian rootfs (gzip, lazy) with three more layers on top —
a small gzip layer below the min layer size (no zTOC: pysoci unpacks it), a zstd layer (no
zTOC), an uncompressed tar layer (lazy through its TarZinfo) — and a whiteout of a base file.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.containerd import Containerd, Pysoci, start_containerd
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, TAR_LAYER, ZSTD_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.registry import Registry, start_registry

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = ["/usr/bin/python3", "-c", "import json, sqlite3, email; print('ready')"]
# Prints a digest of the whole visible tree (names, modes, owners, sizes, contents, links).
TREE = (
    "import hashlib, os, stat\n"
    "h = hashlib.sha256()\n"
    "for d, dirs, files in os.walk('/', topdown=True):\n"
    "    skip = ('proc', 'sys', 'dev', 'run', 'tmp') if d == '/' else ()\n"
    "    dirs[:] = sorted(x for x in dirs if x not in skip)\n"
    "    for n in sorted(dirs + files):\n"
    "        p = os.path.join(d, n); st = os.lstat(p)\n"
    "        h.update(repr((p, st.st_mode, st.st_uid, st.st_gid)).encode())\n"
    "        if stat.S_ISREG(st.st_mode): h.update(open(p, 'rb').read())\n"
    "        elif stat.S_ISLNK(st.st_mode): h.update(os.readlink(p).encode())\n"
    "print(h.hexdigest())\n"
)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_BASE: list[Layer] = []


def _base_layer() -> Layer:
    """The Debian rootfs as one gzip layer (built once per test run)."""
    if not _BASE:
        tar = rootfs_tar().read_bytes()
        digest = "sha256:" + hashlib.sha256(tar).hexdigest()
        _BASE.append(Layer(pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, digest))
    return _BASE[0]


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, Pysoci, Containerd, Path]]:
    tmp = tmp_path_factory.mktemp("containerd")
    reg = start_registry(tmp / "registry")
    certs = tmp / "certs.d" / reg.host
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    config = tmp / "pysoci.toml"
    # No background fetching: what was fetched is what the containers read.
    config.write_text(
        f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
    )
    pysoci = Pysoci(tmp / "pysoci", tmp / "pysoci.sock", tmp / "pysoci.log", config)
    pysoci.start()
    cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
    try:
        yield reg, pysoci, cd, tmp
    finally:
        cd.stop()
        pysoci.stop()
        reg.stop()


@pytest.fixture(scope="module")
def images(rig: tuple[Registry, Pysoci, Containerd, Path]) -> dict[str, str]:
    """References of the test images, converted and not."""
    reg, _, _, tmp = rig
    base_tar = rootfs_tar().read_bytes()
    base = Layer(
        pigz_blob(base_tar, blocksize_kib=1024),
        GZIP_LAYER,
        "sha256:" + hashlib.sha256(base_tar).hexdigest(),
    )
    rng = random.Random(9)
    layers = [
        base,
        Layer.from_tar(_tar({"etc/small-layer": b"small\n", "etc/.wh.issue": b""})),
        Layer.from_tar(_tar({"opt/zstd/data": rng.randbytes(200_000)}), ZSTD_LAYER),
        Layer.from_tar(_tar({"opt/tar/data": rng.randbytes(12 << 20)}), TAR_LAYER),
    ]
    write_image(tmp / "src", "v1", layers)
    refs = {"plain": f"{reg.host}/mixed:v1", "soci": f"{reg.host}/mixed:soci"}
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{tmp}/src:v1",
            f"docker://{refs['plain']}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [
            PYSOCI,
            "convert",
            refs["plain"],
            refs["soci"],
            "--plain-http",
            "--root",
            str(tmp / "build"),
            "-q",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return refs


def layer_digests(cd: Containerd, ref: str) -> list[str]:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True,
        capture_output=True,
    ).stdout
    top = json.loads(raw)
    if "manifests" in top:
        first = top["manifests"][0]["digest"]
        raw = subprocess.run(
            [
                "skopeo",
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{ref.rsplit(':', 1)[0]}@{first}",
            ],
            check=True,
            capture_output=True,
        ).stdout
        top = json.loads(raw)
    return [layer["digest"] for layer in top["layers"]]


def test_ctr_remote_rpull_and_run_lazily(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    _, pysoci, cd, _ = rig
    ref = images["soci"]
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
    out = cd.ctr("run", "--rm", "--snapshotter", "soci", ref, "rpull-run", *WORKLOAD).stdout
    assert out.strip() == "ready"
    # The lazily served layers never entered containerd's content store.
    content = cd.ctr("content", "ls", "-q").stdout.split()
    digests = layer_digests(cd, images["plain"])
    assert digests[0] not in content and digests[3] not in content
    # Each layer of the image: committed by pysoci; the lazy ones labelled remote.
    snaps = cd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
    assert len(snaps.strip().splitlines()) == 1 + 4
    # The workload read a fraction of the base layer.
    statuses = [
        json.loads(p.read_text()) for p in (pysoci.root / "fuse" / ".status").glob("*.json")
    ]
    base = next(s for s in statuses if s["digest"] == digests[0])
    assert 0 < base["fetchedSize"] < base["size"] / 2, base


def test_files_from_every_layer_kind_and_whiteouts(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    _, _, cd, _ = rig
    ref = images["soci"]
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
    script = (
        "import os, hashlib\n"
        "print(open('/etc/small-layer').read().strip())\n"
        "print(os.path.exists('/etc/issue'))\n"
        "print(len(open('/opt/zstd/data','rb').read()), len(open('/opt/tar/data','rb').read()))\n"
    )
    out = cd.ctr(
        "run", "--rm", "--snapshotter", "soci", ref, "kinds", "/usr/bin/python3", "-c", script
    ).stdout
    assert out.split("\n")[:3] == ["small", "False", f"200000 {12 << 20}"]


def test_lazy_tree_equals_overlayfs(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    _, _, cd, _ = rig
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", images["soci"])
    lazy = cd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        images["soci"],
        "tree-soci",
        "/usr/bin/python3",
        "-c",
        TREE,
    ).stdout
    cd.ctr("image", "pull", "--plain-http", images["plain"])  # overlayfs, containerd's own
    full = cd.ctr(
        "run", "--rm", images["plain"], "tree-overlay", "/usr/bin/python3", "-c", TREE
    ).stdout
    assert lazy.strip() == full.strip() and len(lazy.strip()) == 64


def test_image_without_index_is_pulled_normally(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    _, _, cd, _ = rig
    cd.ctr("image", "pull", "--plain-http", "--snapshotter", "soci", images["plain"])
    out = cd.ctr(
        "run", "--rm", "--snapshotter", "soci", images["plain"], "noindex", *WORKLOAD
    ).stdout
    assert out.strip() == "ready"
    content = cd.ctr("content", "ls", "-q").stdout.split()
    assert layer_digests(cd, images["plain"])[0] in content  # downloaded: nothing was lazy


def test_nerdctl_pull_and_run_lazily(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    _, _, cd, _ = rig
    ref = images["soci"]
    cd.nerdctl("--snapshotter", "soci", "--insecure-registry", "pull", ref)
    out = cd.nerdctl(
        "--snapshotter",
        "soci",
        "--insecure-registry",
        "run",
        "--rm",
        "--net",
        "none",
        ref,
        *WORKLOAD,
    ).stdout
    assert out.strip() == "ready"


def test_nerdctl_with_soci_index_digest(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """An explicit v1 index (`--soci-index-digest`): the label path, not the v2 annotation."""
    reg, pysoci, cd, tmp = rig
    # The Debian base plus a layer no other test image has, so its snapshot is new here.
    unique = Layer.from_tar(_tar({"opt/unique": random.Random(77).randbytes(12 << 20)}))
    write_image(tmp / "unique", "v1", [_base_layer(), unique])
    ref = f"{reg.host}/unique:v1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp}/unique:v1", f"docker://{ref}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    root = ["--plain-http", "--root", str(tmp / "v1")]
    subprocess.run(
        [PYSOCI, "create", ref, *root, "-q"], check=True, capture_output=True, timeout=600
    )
    subprocess.run([PYSOCI, "push", ref, *root], check=True, capture_output=True, timeout=300)
    listing = subprocess.run(
        [PYSOCI, "index", "list", "--root", str(tmp / "v1")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    index_digest = listing[1].split()[0]
    nerd = ["--snapshotter", "soci", "--insecure-registry"]
    cd.nerdctl(*nerd, "pull", "--soci-index-digest", index_digest, ref)
    script = "print(len(open('/opt/unique','rb').read()))"
    out = cd.nerdctl(
        *nerd, "run", "--rm", "--net", "none", ref, "/usr/bin/python3", "-c", script
    ).stdout
    assert out.strip() == str(12 << 20)
    unique_digest = layer_digests(cd, ref)[1]
    assert unique_digest not in cd.ctr("content", "ls", "-q").stdout.split()
    log = pysoci.log.read_text()
    assert f"SOCI index {index_digest}, found by explicit" in log
    assert f"layer {unique_digest} served lazily" in log


def test_multi_platform_image(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    reg, _, cd, tmp = rig
    src = f"{reg.host}/mixed:v1"
    multi = f"{reg.host}/multi:v1"
    # An index with this host's image and an arm64 sibling that will never be pulled here.
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{src}", f"oci:{tmp}/multi:host"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    from snapshotter.content.layout import OciLayout
    from snapshotter.soci import oci

    layout = OciLayout.open(tmp / "multi")
    host = layout.resolve("host")
    arm = oci.Platform(os="linux", architecture="arm64", variant="v8")
    arm_desc = write_image(
        tmp / "multi", "arm", [Layer.from_tar(_tar({"arm": b"x" * 100}))], platform=arm
    )
    index = oci.ImageIndex(
        manifests=[
            oci.Descriptor(host.media_type, host.digest, host.size, platform=oci.host_platform()),
            oci.Descriptor(arm_desc.media_type, arm_desc.digest, arm_desc.size, platform=arm),
        ]
    )
    data = index.to_json_bytes()
    layout.set_tag(
        "multi", oci.Descriptor(oci.MEDIA_TYPE_OCI_INDEX, layout.write_blob(data), len(data))
    )
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--all",
            "--dest-tls-verify=false",
            f"oci:{tmp}/multi:multi",
            f"docker://{multi}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    soci = f"{reg.host}/multi:soci"
    subprocess.run(
        [
            PYSOCI,
            "convert",
            multi,
            soci,
            "--plain-http",
            "--all-platforms",
            "--root",
            str(tmp / "mb"),
            "--min-layer-size",
            "10MiB",
            "-q",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", soci)
    out = cd.ctr("run", "--rm", "--snapshotter", "soci", soci, "multi", *WORKLOAD).stdout
    assert out.strip() == "ready"
