"""pysoci mount: an image's root filesystem served lazily, against independent oracles.

- a generated two-layer image with whiteouts and an opaque directory equals what umoci
  unpacks from the same image;
- a real Debian root filesystem (debootstrap) mounted lazily runs python3 in a chroot after
  fetching a fraction of the layer, and every file equals the original tree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.debootstrap import debian_rootfs, rootfs_tar
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import Registry, start_registry
from tests.fixtures.tree_snapshot import assert_same_tree, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, overlayfs)")
PYSOCI = str(Path(sys.executable).with_name("pysoci"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def run(*args: str, timeout: float = 300) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args[:3]}: {res.stderr[-3000:]}"
    return res.stdout


def push_layout(layout: Path, ref: str) -> None:
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}")


Member = tuple[tarfile.TarInfo, bytes]


def _member(
    name: str,
    data: bytes | None = None,
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    mtime: str = "1700000000",
    xattrs: dict[str, str] | None = None,
    **attrs: int,
) -> Member:
    """A tar member: a file with `data`, a directory when `data` is None (unless `kind` says
    otherwise); `mtime` as PAX writes it (nanoseconds after the dot); `attrs` set on the header
    (mode, uid, gid, devmajor, devminor)."""
    info = tarfile.TarInfo(name)
    if data is None and kind == tarfile.REGTYPE:
        kind = tarfile.DIRTYPE
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = link
    info.mtime = int(mtime.partition(".")[0])
    info.pax_headers = {
        "mtime": mtime,
        **{f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()},
    }
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data or b"")
    return info, data or b""


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


@dataclass(frozen=True)
class WhiteoutImage:
    ref: str
    """The original image (for the oracle)."""
    soci: str
    """Its SOCI-indexed copy (what pysoci mounts)."""


@pytest.fixture(scope="module")
def wh_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> WhiteoutImage:
    """Two layers with whiteouts, an opaque directory, a directory in both layers, hard links,
    xattrs on files and directories, nanosecond mtimes, special modes, owners and devices."""
    tmp = tmp_path_factory.mktemp("wh-image")
    rng = random.Random(4)
    lower = _tar(
        [
            _member("a", mtime="1700000000.5"),
            _member("a/keep", b"keep", mtime="1700000001.000000123", xattrs={"user.k": "v"}),
            _member("a/hard", kind=tarfile.LNKTYPE, link="a/keep"),
            _member("a/gone", b"gone"),
            _member("b", xattrs={"user.d": "dir"}, mtime="1700000003.75"),
            _member("b/old", b"old"),
            _member("c", mtime="1700000004"),
            _member("c/x", b"x"),
            _member("link", kind=tarfile.SYMTYPE, link="a/keep", mtime="1700000005.1"),
            _member("big1", rng.randbytes(300_000), mode=0o4755, uid=1000, gid=1001),
            _member("shared", mode=0o2775, gid=50),
            _member("tmp", mode=0o1777),
            _member("null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            _member("fifo", kind=tarfile.FIFOTYPE),
        ]
    )
    upper = _tar(
        [
            _member("a", mtime="1700000100.25", mode=0o750),
            _member("a/.wh.gone", b""),
            _member("b", mtime="1700000101"),
            _member("b/.wh..wh..opq", b""),
            _member("b/new", b"new", xattrs={"user.n": "new"}),
            _member(".wh.c", b""),
            _member("big2", rng.randbytes(300_000), mtime="1700000102.999999999"),
            _member("h1", b"twice", uid=7),
            _member("h2", kind=tarfile.LNKTYPE, link="h1"),
            _member("d/e/f", b"parents not in the tar"),
        ]
    )
    write_image(tmp / "src", "v1", [Layer.from_tar(lower), Layer.from_tar(upper)])
    ref = f"{registry.host}/wh:v1"
    push_layout(tmp / "src", ref)
    soci = f"{registry.host}/wh:soci"
    run(
        PYSOCI,
        "convert",
        ref,
        soci,
        "--plain-http",
        "--root",
        str(tmp / "build"),
        "--min-layer-size",
        "1KiB",
        "--span-size",
        "64KiB",
        "-q",
    )
    return WhiteoutImage(ref, soci)


def layer_dirs(root: Path, rel: str) -> list[Path]:
    """`rel` in each FUSE layer directory of the `pysoci mount`s under `root` that has it."""
    return sorted(p for p in root.glob(f"mounts/*/fuse/*/{rel}") if ".status" not in p.parts)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Directories to unmount with `pysoci unmount` at the end, whatever happens."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        subprocess.run(
            [PYSOCI, "unmount", str(d), "--root", str(tmp_path / "root")], capture_output=True
        )


def test_whiteouts_and_opaque_dirs_equal_umoci(
    tmp_path: Path, wh_image: WhiteoutImage, mounted: list[Path]
) -> None:
    root = tmp_path / "root"
    target = tmp_path / "rootfs"
    mounted.append(target)
    out = run(PYSOCI, "mount", wh_image.soci, str(target), "--plain-http", "--root", str(root))
    assert out.count("lazy ") == 2, out
    # The oracle: umoci's own unpacking of the original image.
    oracle = f"oci:{tmp_path}/oracle:v1"
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{wh_image.ref}", oracle)
    run("umoci", "unpack", "--image", f"{tmp_path}/oracle:v1", str(tmp_path / "bundle"))
    # Implicit parents get the time of extraction, in umoci as in pysoci.
    skip = frozenset({"d", "d/e"})
    expected = snapshot(tmp_path / "bundle/rootfs", skip_mtime=skip)
    # overlayfs reports nlink 1 for a merged directory (one in several layers, not opaque)
    # instead of counting its subdirectories; the layers' own count is checked below.
    assert expected["a"]["nlink"] == 2
    expected["a"]["nlink"] = 1
    got = snapshot(target, skip_mtime=skip)
    assert_same_tree(got, expected)
    assert "a/gone" not in got and "c" not in got and "b/old" not in got and "b/new" in got
    assert got["a/keep"]["links"] == ["a/hard", "a/keep"] and got["a/keep"]["nlink"] == 2
    assert got["a/keep"]["mtime_ns"] == 1_700_000_001_000_000_123
    assert got["b"]["xattrs"] == {} and got["b/new"]["xattrs"] == {"user.n": b"new"}
    assert [os.lstat(p).st_nlink for p in layer_dirs(root, "a")] == [2, 2]
    # The opaque directory of the upper layer answers the default (trusted) opaque xattr.
    (opaque_dir,) = [p for p in layer_dirs(root, "b") if (p / "new").exists()]
    assert os.getxattr(opaque_dir, "trusted.overlay.opaque") == b"y"
    run(PYSOCI, "unmount", str(target), "--root", str(root))
    mounted.clear()
    with open("/proc/mounts") as f:
        mounts = f.read()
    assert str(target) not in mounts and f"{root}/mounts" not in mounts


def test_opaque_xattr_from_the_config(
    tmp_path: Path, wh_image: WhiteoutImage, mounted: list[Path]
) -> None:
    """`[fuse] opaque_xattr = "user.overlay.opaque"`: the opaque directory of a lazy layer answers
    that xattr (for overlays mounted with `userxattr`) and no longer the trusted one."""
    root = tmp_path / "root"
    config = tmp_path / "config.toml"
    config.write_text(pysoci_config('[fuse]\nopaque_xattr = "user.overlay.opaque"\n'))
    target = tmp_path / "rootfs"
    mounted.append(target)
    run(
        PYSOCI,
        "mount",
        wh_image.soci,
        str(target),
        "--plain-http",
        "--root",
        str(root),
        "--config",
        str(config),
    )
    (opaque_dir,) = [p for p in layer_dirs(root, "b") if (p / "new").exists()]
    assert os.getxattr(opaque_dir, "user.overlay.opaque") == b"y"
    assert "user.overlay.opaque" in os.listxattr(opaque_dir)
    assert "trusted.overlay.opaque" not in os.listxattr(opaque_dir)
    with pytest.raises(OSError) as e:
        os.getxattr(opaque_dir, "trusted.overlay.opaque")
    assert e.value.errno == errno.ENODATA
    # Other directories are not opaque, whichever the name.
    assert all("user.overlay.opaque" not in os.listxattr(p) for p in layer_dirs(root, "a"))


@pytest.mark.slow
def test_debian_rootfs_runs_python_lazily(
    tmp_path: Path, registry: Registry, mounted: list[Path]
) -> None:
    tar = rootfs_tar().read_bytes()
    layer = Layer(
        pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, "sha256:" + hashlib.sha256(tar).hexdigest()
    )
    write_image(tmp_path / "src", "v1", [layer])
    ref = f"{registry.host}/debian:v1"
    push_layout(tmp_path / "src", ref)
    root = str(tmp_path / "root")
    soci = f"{registry.host}/debian:soci"
    run(PYSOCI, "convert", ref, soci, "--plain-http", "--root", str(tmp_path / "build"), "-q")
    # A config whose background fetcher stays quiet, so what was fetched is what was read.
    config = tmp_path / "config.toml"
    config.write_text(pysoci_config("[background_fetch]\ndisable = true\n"))
    target = tmp_path / "rootfs"
    mounted.append(target)
    out = run(
        PYSOCI, "mount", soci, str(target), "--plain-http", "--root", root, "--config", str(config)
    )
    assert "lazy " in out, out
    ready = run(
        "chroot",
        str(target),
        "/usr/bin/python3",
        "-c",
        "import json, sqlite3, email; print('ready')",
    )
    assert ready.strip() == "ready"
    statuses = list(Path(root).glob("mounts/*/fuse/.status/*.json"))
    assert len(statuses) == 1
    status = json.loads(statuses[0].read_text())
    assert 0 < status["fetchedSize"] < 0.5 * len(layer.blob), status
    # Every file of the lazily mounted tree equals the original tree.
    assert_same_tree(snapshot(target), snapshot(debian_rootfs()))
