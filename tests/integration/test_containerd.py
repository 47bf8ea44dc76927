"""The snapshotter with real containerd 1.6, runc, ctr-remote and nerdctl.

One image does most of the work: a Debian rootfs (gzip, lazy) with three more layers on top —
a small gzip layer below the min layer size (no zTOC: pysoci unpacks it), a zstd layer (no
zTOC), an uncompressed tar layer (lazy through its TarZinfo) — and a whiteout of a base file.
The small and tar layers also hold a hardlink, an xattr, a fifo and a device node.

containerd skips Prepare for a layer whose chain it already has, so a test that must see a
layer served lazily (or not) gives its image a layer no other test image has (`_fresh_layer`),
and checks that layer: absent from containerd's content store (never downloaded) and named in
pysoci's log.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.containerd import Containerd, Pysoci, start_containerd
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, TAR_LAYER, ZSTD_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
WORKLOAD = ["/usr/bin/python3", "-c", "import json, sqlite3, email; print('ready')"]
# Prints one line per entry of the whole visible tree: its path, mode, owner, mtime (ns), rdev,
# xattrs, link count, for non-directories the size and which earlier path shares the inode
# (hardlinks, by (st_dev, st_ino) within this tree: the numbers themselves differ between
# filesystems), and a digest of the file's contents or the symlink's target. (overlayfs reports
# nlink 1 for a merged directory such as /opt: the layers are the same in both trees, so that
# is the same too.)
# Left out, because they legitimately differ: ctime and atime (set when a layer is unpacked or
# read, not by the image), st_dev/st_ino values, and the size of directories (ext4 counts its
# directory blocks, 4096 and up; FUSE reports 0).
TREE = (
    "import hashlib, os, stat\n"
    "inodes = {}\n"
    "for d, dirs, files in os.walk('/', topdown=True):\n"
    "    skip = ('proc', 'sys', 'dev', 'run', 'tmp') if d == '/' else ()\n"
    "    dirs[:] = sorted(x for x in dirs if x not in skip)\n"
    "    for n in sorted(dirs + files):\n"
    "        p = os.path.join(d, n); st = os.lstat(p); isdir = stat.S_ISDIR(st.st_mode)\n"
    "        try:\n"
    "            xa = sorted((k, os.getxattr(p, k, follow_symlinks=False))\n"
    "                        for k in os.listxattr(p, follow_symlinks=False))\n"
    "        except OSError as e:\n"
    "            xa = e.errno\n"
    "        key = (st.st_dev, st.st_ino)\n"
    "        same = None if isdir else (st.st_size, inodes.setdefault(key, p))\n"
    "        data = b''\n"
    "        if stat.S_ISREG(st.st_mode): data = open(p, 'rb').read()\n"
    "        elif stat.S_ISLNK(st.st_mode): data = os.readlink(p).encode()\n"
    "        print(repr((p, oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev,\n"
    "                    xa, st.st_nlink, same, hashlib.sha256(data).hexdigest()[:16])))\n"
)
MTIME = 1_700_000_000.123456
"""Of every entry of the test layers: a fraction, so the trees compare nanoseconds."""


def _tar(
    files: dict[str, bytes],
    *,
    special: tuple[tarfile.TarInfo, ...] = (),
    xattrs: dict[str, dict[str, str]] | None = None,
) -> bytes:
    """A PAX tar: every parent directory as its own entry, then `files` (0644, with the
    `xattrs` given per name), then `special` entries (links, fifos, devices); all at MTIME.
    Explicit directories keep the trees comparable: an implied one gets whatever time and mode
    the unpacker picks."""
    names = [*files, *(info.name for info in special)]
    dirs = sorted({str(parent) for n in names for parent in Path(n).parents} - {"."})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            t.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).get(name, {}).items()
            }
            t.addfile(info, io.BytesIO(data))
        for info in special:
            info.mtime = MTIME
            t.addfile(info)
    return buf.getvalue()


def _entry(name: str, kind: bytes, *, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


_BASE: list[Layer] = []


def _base_layer() -> Layer:
    """The Debian rootfs as one gzip layer (built once per test run)."""
    if not _BASE:
        tar = rootfs_tar().read_bytes()
        digest = "sha256:" + hashlib.sha256(tar).hexdigest()
        _BASE.append(Layer(pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, digest))
    return _BASE[0]


def _fresh_layer(name: str, size: int = 12 << 20) -> Layer:
    """A gzip layer no other test image has: `/opt/<name>`, `size` random bytes (the default
    is above the min layer size, so it gets a zTOC)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return Layer.from_tar(_tar({f"opt/{name}": random.Random(seed).randbytes(size)}))


def _push(reg: Registry, tmp: Path, name: str, layers: list[Layer]) -> str:
    """Push a single-platform image to the test registry as `<name>:v1`; its reference."""
    write_image(tmp / "layouts" / name, "v1", layers)
    ref = f"{reg.host}/{name}:v1"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{tmp}/layouts/{name}:v1",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return ref


def _size_of(cd: Containerd, ref: str, name: str, snapshotter: str = "soci") -> str:
    """Run `len(open('/opt/<name>').read())` in the image; its output."""
    script = f"print(len(open('/opt/{name}','rb').read()))"
    return cd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        ref,
        f"size-{name}",
        "/usr/bin/python3",
        "-c",
        script,
    ).stdout.strip()


def _content(cd: Containerd) -> list[str]:
    """The digests in containerd's content store (what it downloaded)."""
    return cd.ctr("content", "ls", "-q").stdout.split()


def _assert_served_lazily(cd: Containerd, pysoci: Pysoci, digest: str) -> None:
    assert digest not in _content(cd), f"containerd downloaded {digest}"
    assert f"layer {digest} served lazily" in pysoci.log.read_text()


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, Pysoci, Containerd, Path]]:
    tmp = tmp_path_factory.mktemp("containerd")
    reg = start_registry(tmp / "registry")
    # No hosts.toml at all: a registry on the loopback is plain HTTP for pysoci, as it is for
    # containerd (`docker.MatchLocalhost`); the empty directory keeps the node's own out.
    (tmp / "certs.d").mkdir()
    config = tmp / "pysoci.toml"
    # No background fetching: what was fetched is what the containers read.
    config.write_text(
        pysoci_config(
            f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{tmp / "certs.d"}"\n'
        )
    )
    pysoci = Pysoci(tmp / "pysoci", tmp / "pysoci.sock", tmp / "pysoci.log", config)
    pysoci.start()
    cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
    try:
        yield reg, pysoci, cd, tmp
    finally:
        cd.stop()
        pysoci.stop_all()
        reg.stop()


@pytest.fixture(scope="module")
def images(rig: tuple[Registry, Pysoci, Containerd, Path]) -> dict[str, str]:
    """References of the test images, converted and not."""
    reg, _, _, tmp = rig
    rng = random.Random(9)
    small = _tar(
        {"etc/small-layer": b"small\n", "etc/.wh.issue": b""},
        special=(_entry("etc/small-link", tarfile.LNKTYPE, link="etc/small-layer"),),
        xattrs={"etc/small-layer": {"user.pysoci": "local"}},
    )
    uncompressed = _tar(
        {"opt/tar/data": rng.randbytes(12 << 20)},
        special=(
            _entry("opt/tar/data-link", tarfile.LNKTYPE, link="opt/tar/data"),
            _entry("opt/tar/fifo", tarfile.FIFOTYPE, mode=0o600),
            _entry("opt/tar/null", tarfile.CHRTYPE, mode=0o666),
        ),
        xattrs={"opt/tar/data": {"user.pysoci": "lazy"}},
    )
    layers = [
        _base_layer(),
        Layer.from_tar(small),
        Layer.from_tar(_tar({"opt/zstd/data": rng.randbytes(200_000)}), ZSTD_LAYER),
        Layer.from_tar(uncompressed, TAR_LAYER),
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
    _, pysoci, cd, _ = rig
    ref = images["soci"]
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
    script = (
        "import os, hashlib\n"
        "print(open('/etc/small-layer').read().strip())\n"
        "print(os.path.exists('/etc/issue'))\n"
        "print(len(open('/opt/zstd/data','rb').read()), len(open('/opt/tar/data','rb').read()))\n"
        "print(os.stat('/etc/small-link').st_nlink, os.getxattr('/opt/tar/data', 'user.pysoci'))\n"
    )
    out = cd.ctr(
        "run", "--rm", "--snapshotter", "soci", ref, "kinds", "/usr/bin/python3", "-c", script
    ).stdout
    assert out.split("\n")[:4] == ["small", "False", f"200000 {12 << 20}", "2 b'lazy'"]
    # The small and the zstd layer have no zTOC: pysoci fetched and unpacked them itself (so
    # containerd downloaded neither), and the uncompressed one was served lazily.
    _, small, zstd, uncompressed = layer_digests(cd, ref)
    content = _content(cd)
    log = pysoci.log.read_text()
    for digest in (small, zstd):
        assert digest not in content
        assert f"layer {digest} has no zTOC; unpacked locally" in log
        assert (pysoci.root / "layers" / digest.replace(":", "-")).is_dir()
    _assert_served_lazily(cd, pysoci, uncompressed)


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
    lazy_entries, full_entries = lazy.splitlines(), full.splitlines()
    assert len(full_entries) > 5000  # the whole Debian tree was walked
    diff = list(difflib.unified_diff(full_entries, lazy_entries, "overlayfs", "pysoci", n=0))
    assert not diff, "\n".join(diff[:40])
    # What the test layers add is in it, so the comparison covers hardlinks, xattrs, devices
    # and nanosecond mtimes of lazy (opt/tar) and locally unpacked (etc) layers.
    entries = {e[0]: e for e in map(ast.literal_eval, lazy_entries)}
    assert entries["/opt/tar/data-link"][7:9] == (2, (12 << 20, "/opt/tar/data"))
    assert entries["/etc/small-link"][7:9] == (2, (6, "/etc/small-layer"))
    assert ("user.pysoci", b"lazy") in entries["/opt/tar/data"][6]
    assert ("user.pysoci", b"local") in entries["/etc/small-layer"][6]
    assert entries["/opt/tar/null"][5] == os.makedev(1, 3)
    assert entries["/opt/tar/fifo"][1] == oct(stat.S_IFIFO | 0o600)
    assert (
        entries["/opt/tar/data"][4] == entries["/etc/small-layer"][4] == 1_700_000_000_123_456_000
    )


def test_image_without_index_is_pulled_normally(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """ctr-remote sends the remote-snapshot labels; without an index pysoci answers as an
    overlay snapshotter, so containerd downloads and unpacks the layer itself."""
    reg, pysoci, cd, tmp = rig
    ref = _push(reg, tmp, "noindex", [_base_layer(), _fresh_layer("noindex", 1 << 20)])
    fresh = layer_digests(cd, ref)[1]
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
    assert _size_of(cd, ref, "noindex") == str(1 << 20)
    assert fresh in _content(cd)  # downloaded by containerd: nothing was lazy
    log = pysoci.log.read_text()
    assert f"has no SOCI index; containerd unpacks layer {fresh}" in log
    assert f"layer {fresh} served lazily" not in log


def test_nerdctl_pull_and_run_lazily(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """A SOCI-enabled image (index v2, found by the manifest's annotation)."""
    reg, pysoci, cd, tmp = rig
    plain = _push(reg, tmp, "nerd", [_base_layer(), _fresh_layer("nerd")])
    ref = f"{reg.host}/nerd:soci"
    subprocess.run(
        [PYSOCI, "convert", plain, ref, "--plain-http", "--root", str(tmp / "nerd"), "-q"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    nerd = ["--snapshotter", "soci", "--insecure-registry"]
    cd.nerdctl(*nerd, "pull", ref)
    script = "import json, sqlite3, email; print(len(open('/opt/nerd','rb').read()))"
    out = cd.nerdctl(
        *nerd, "run", "--rm", "--net", "none", ref, "/usr/bin/python3", "-c", script
    ).stdout
    assert out.strip() == str(12 << 20)
    fresh = layer_digests(cd, ref)[1]
    _assert_served_lazily(cd, pysoci, fresh)
    assert "found by v2-annotation" in pysoci.log.read_text()


def test_loopback_registry_needs_no_hosts_toml(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """nerdctl with no hosts.toml anywhere and no --insecure-registry: containerd's side and
    pysoci's both reach the 127.0.0.1 registry over plain HTTP, and the layer is lazy."""
    reg, pysoci, cd, tmp = rig
    assert not any((tmp / "certs.d").iterdir())
    plain = _push(reg, tmp, "loopback", [_base_layer(), _fresh_layer("loopback")])
    ref = f"{reg.host}/loopback:soci"
    subprocess.run(
        [PYSOCI, "convert", plain, ref, "--root", str(tmp / "loopback"), "-q"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    cd.nerdctl("--snapshotter", "soci", "pull", ref)
    script = "print(len(open('/opt/loopback','rb').read()))"
    out = cd.nerdctl(
        "--snapshotter",
        "soci",
        "run",
        "--rm",
        "--net",
        "none",
        ref,
        "/usr/bin/python3",
        "-c",
        script,
    ).stdout
    assert out.strip() == str(12 << 20)
    _assert_served_lazily(cd, pysoci, layer_digests(cd, ref)[1])
    assert "LAZY MOUNT FAILED" not in pysoci.log.read_text()


def test_nerdctl_with_soci_index_digest(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """An explicit v1 index (`--soci-index-digest`): the label path, not the v2 annotation."""
    reg, pysoci, cd, tmp = rig
    ref = _push(reg, tmp, "unique", [_base_layer(), _fresh_layer("unique")])
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
    _assert_served_lazily(cd, pysoci, unique_digest)
    assert f"SOCI index {index_digest}, found by explicit" in pysoci.log.read_text()


def test_index_only_in_the_local_content_store(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    """`pysoci create --root` into the daemon's own root, never pushed: the registry has no
    index, and the daemon finds it (and its zTOCs) in ROOT/content."""
    reg, pysoci, cd, tmp = rig
    ref = _push(reg, tmp, "localindex", [_base_layer(), _fresh_layer("localindex")])
    subprocess.run(
        [PYSOCI, "create", ref, "--plain-http", "--root", str(pysoci.root), "-q"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    listing = subprocess.run(
        [PYSOCI, "index", "list", "--root", str(pysoci.root), "--ref", ref],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    index_digest = listing[1].split()[0]
    cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "soci", ref)
    assert _size_of(cd, ref, "localindex") == str(12 << 20)
    fresh = layer_digests(cd, ref)[1]
    _assert_served_lazily(cd, pysoci, fresh)
    assert f"SOCI index {index_digest}, found by local" in pysoci.log.read_text()


def test_multi_platform_image(
    rig: tuple[Registry, Pysoci, Containerd, Path], images: dict[str, str]
) -> None:
    reg, pysoci, cd, tmp = rig
    multi = f"{reg.host}/multi:v1"
    # An index with this host's image and an arm64 sibling that will never be pulled here.
    from snapshotter.content.layout import OciLayout
    from snapshotter.soci import oci

    host = write_image(tmp / "multi", "host", [_base_layer(), _fresh_layer("multi")])
    layout = OciLayout.open(tmp / "multi")
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
    assert _size_of(cd, soci, "multi") == str(12 << 20)
    fresh = layer_digests(cd, soci)[1]
    _assert_served_lazily(cd, pysoci, fresh)
