"""pysoci mount: an image's root filesystem served lazily, against independent oracles.

- a generated two-layer image with whiteouts and an opaque directory equals what umoci
  unpacks from the same image;
- a real Debian root filesystem (debootstrap) mounted lazily runs python3 in a chroot after
  fetching a fraction of the layer, and every file equals the original tree.
"""

from __future__ import annotations

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

from tests.fixtures.debootstrap import debian_rootfs, rootfs_tar
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.registry import Registry, start_registry

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


def tree(root: Path, *, hash_content: bool = True) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            content: object = None
            if stat.S_ISREG(st.st_mode) and hash_content:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mtime = st.st_mtime_ns // 10**9 if not stat.S_ISDIR(st.st_mode) else None
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                size,
                mtime,
                rdev,
                content,
            )
    return out


def _tar(entries: list[tuple[str, bytes | None, str]]) -> bytes:
    """(name, data or None for a dir, symlink target or '')."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


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
    tmp_path: Path, registry: Registry, mounted: list[Path]
) -> None:
    rng = random.Random(4)
    big = rng.randbytes(300_000)
    lower = _tar(
        [
            ("a", None, ""),
            ("a/keep", b"keep", ""),
            ("a/gone", b"gone", ""),
            ("b", None, ""),
            ("b/old", b"old", ""),
            ("c", None, ""),
            ("c/x", b"x", ""),
            ("link", None, "a/keep"),
            ("big1", big, ""),
        ]
    )
    upper = _tar(
        [
            ("a", None, ""),
            ("a/.wh.gone", b"", ""),
            ("b", None, ""),
            ("b/.wh..wh..opq", b"", ""),
            ("b/new", b"new", ""),
            (".wh.c", b"", ""),
            ("big2", rng.randbytes(300_000), ""),
        ]
    )
    write_image(tmp_path / "src", "v1", [Layer.from_tar(lower), Layer.from_tar(upper)])
    ref = f"{registry.host}/wh:v1"
    push_layout(tmp_path / "src", ref)
    root = str(tmp_path / "root")
    soci = f"{registry.host}/wh:soci"
    run(
        PYSOCI,
        "convert",
        ref,
        soci,
        "--plain-http",
        "--root",
        root,
        "--min-layer-size",
        "1KiB",
        "--span-size",
        "64KiB",
        "-q",
    )
    target = tmp_path / "rootfs"
    mounted.append(target)
    out = run(PYSOCI, "mount", soci, str(target), "--plain-http", "--root", root)
    assert out.count("lazy ") == 2, out
    # The oracle: umoci's own unpacking of the original image.
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path}/oracle:v1")
    run("umoci", "unpack", "--image", f"{tmp_path}/oracle:v1", str(tmp_path / "bundle"))
    expected = tree(tmp_path / "bundle/rootfs")
    got = tree(target)
    assert got == expected
    assert "a/gone" not in got and "c" not in got and "b/old" not in got and "b/new" in got
    run(PYSOCI, "unmount", str(target), "--root", root)
    mounted.clear()
    with open("/proc/mounts") as f:
        mounts = f.read()
    assert str(target) not in mounts and f"{root}/mounts" not in mounts


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
    config.write_text("[background_fetch]\ndisable = true\n")
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
    assert tree(target) == tree(debian_rootfs())
