"""The mounted layers equal GNU tar's extraction of the same tars, alone and under overlayfs.

Extraction is converted to overlayfs' own representation of whiteouts (a 0:0 character device
for `.wh.x`, the opaque xattr for `.wh..wh..opq`), as containerd's overlay differ does.
"""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fs_runner import FsRunner, LayerSpec
from tests.fixtures.layer_data import write_layer
from tests.fixtures.tars import random_tar
from tests.fixtures.tree_snapshot import assert_same_tree, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, mknod, overlay)")

OPAQUE = "trusted.overlay.opaque"
SEEDS = [11, 12, 13]


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> None:
    data = kw.pop("data", b"")
    assert isinstance(data, bytes)
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    info.mtime = 1_600_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def extra_entries(rng: random.Random) -> bytes:
    """Entries random_tar lacks: whiteouts, opaque dirs, huge, empty, deep, implicit, modes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "x1", data=rng.randbytes(700_000))  # many 64 KiB spans
        _add(tar, "x2", data=b"soci " * 60_000)
        _add(tar, "empty")
        _add(tar, "empty2", mode=0o4750, uid=1000, gid=1000)
        deep = "/".join(f"level{i}" for i in range(40))
        _add(tar, deep, tarfile.DIRTYPE, mode=0o2775)
        _add(tar, deep + "/bottom", data=b"deep\n")
        _add(tar, "implicit/a/b/file", data=b"no parents in the tar\n")
        _add(tar, ".wh.gone", mtime=1_600_000_123)
        _add(tar, "wd", tarfile.DIRTYPE, mode=0o1777)
        _add(tar, "wd/.wh.x")
        _add(tar, "opq", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.user.note": "kept"})
        _add(tar, "opq/.wh..wh..opq")
        _add(tar, "opq/keep", data=b"k", pax_headers={"SCHILY.xattr.trusted.t": "trusted"})
        _add(tar, "ns", pax_headers={"mtime": "1600000000.123456789"}, data=b"ns")
        _add(tar, "sym-dir", tarfile.SYMTYPE, linkname="opq")
    return buf.getvalue()


def layer_tar(seed: int) -> bytes:
    rng = random.Random(seed)
    base = random_tar(rng, max_file_size=400_000, max_entries=60)
    # Concatenate without the first archive's end-of-archive blocks.
    with tarfile.open(fileobj=io.BytesIO(base)) as t:
        t.getmembers()
        end = t.offset
    return base[:end] + extra_entries(rng)


def extract(tar: bytes, dest: Path) -> None:
    """GNU tar as root, then whiteouts as overlayfs wants them (directory mtimes kept)."""
    dest.mkdir(parents=True)
    command = ["tar", "-x", "-p", "--same-owner", "--numeric-owner", "--xattrs"]
    res = subprocess.run(
        [*command, "--xattrs-include=*", "-C", str(dest)],
        input=tar,
        capture_output=True,
    )
    # Tar warns (status 2) about user.* xattrs on symlinks and devices, which Linux refuses,
    # and about mtimes in the future; anything else is a real failure.
    expected_warnings = ("setxattrat", "Operation not permitted", "in the future", "Exiting")
    for line in res.stderr.decode().splitlines():
        assert any(w in line for w in expected_warnings), line
    for dirpath, _, filenames in os.walk(dest):
        whiteouts = [f for f in filenames if f.startswith(".wh.")]
        if not whiteouts:
            continue
        dir_times = os.stat(dirpath)
        for name in whiteouts:
            path = os.path.join(dirpath, name)
            if name == ".wh..wh..opq":
                os.remove(path)
                os.setxattr(dirpath, OPAQUE, b"y")
                continue
            mtime = os.lstat(path).st_mtime_ns
            os.remove(path)
            target = os.path.join(dirpath, name[4:])
            if os.path.lexists(target):
                subprocess.run(["rm", "-rf", target], check=True)
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
            os.chown(target, 0, 0, follow_symlinks=False)
            os.utime(target, ns=(mtime, mtime), follow_symlinks=False)
        os.utime(dirpath, ns=(dir_times.st_atime_ns, dir_times.st_mtime_ns))
    # GNU tar restores directory times before it replaces its delayed symlink placeholders,
    # which touches some directories again: set them from the archive (Python's reading of it).
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        dirs = [m for m in t.getmembers() if m.isdir()]
    for m in sorted(dirs, key=lambda m: -m.name.count("/")):
        dir_path = dest / m.name
        if dir_path.is_dir() and not dir_path.is_symlink():
            ns = _exact_mtime_ns(m)
            os.utime(dir_path, ns=(ns, ns), follow_symlinks=False)


def _exact_mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is None:
        return int(m.mtime) * 1_000_000_000
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0") or 0)


def implicit_dirs(tar: bytes) -> frozenset[str]:
    """Directories the tar does not list: their mtime is the extraction time."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        names = {m.name.rstrip("/").removeprefix("./") for m in t.getmembers()}
    parents = {str(Path(n).parent) for n in names} | {
        str(p) for n in names for p in Path(n).parents
    }
    return frozenset(p for p in parents if p not in names and p != ".")


@pytest.fixture(scope="module")
def layers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FsRunner, Path, dict[str, bytes]]]:
    work = tmp_path_factory.mktemp("fs-oracle")
    tars = {f"random-{seed}": layer_tar(seed) for seed in SEEDS}
    tars["lower"], tars["upper"] = overlay_tars()
    specs = []
    for name, tar in tars.items():
        files = write_layer(tar, work / "blobs", name)
        specs.append(LayerSpec(name, files.blob, files.ztoc))
    with FsRunner(work / "mnt", specs) as runner:
        yield runner, work, tars


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_equals_tar_extraction(
    layers: tuple[FsRunner, Path, dict[str, bytes]], seed: int
) -> None:
    runner, work, tars = layers
    name = f"random-{seed}"
    extract(tars[name], work / "extracted" / name)
    skip = implicit_dirs(tars[name])
    expected = snapshot(work / "extracted" / name, skip_mtime=skip)
    actual = snapshot(runner.path(name), skip_mtime=skip)
    assert_same_tree(actual, expected)
    # Spot checks of what the comparison covers.
    assert stat.S_ISCHR(os.lstat(runner.path(name) / "gone").st_mode)
    assert os.getxattr(runner.path(name) / "opq", OPAQUE) == b"y"
    assert OPAQUE in os.listxattr(runner.path(name) / "opq")
    assert os.lstat(runner.path(name) / "ns").st_mtime_ns == 1_600_000_000_123_456_789
    assert os.lstat(runner.path(name) / "x1").st_blocks == -(-700_000 // 4096) * 8


def test_random_reads(layers: tuple[FsRunner, Path, dict[str, bytes]]) -> None:
    runner, _, tars = layers
    with tarfile.open(fileobj=io.BytesIO(tars["random-11"])) as t:
        member = t.getmember("x1")
        f = t.extractfile(member)
        assert f is not None
        content = f.read()
    rng = random.Random(5)
    fd = os.open(runner.path("random-11") / "x1", os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(len(content) + 100)
            n = rng.choice([1, 17, 4096, 65536, 200_000])
            assert os.pread(fd, n, off) == content[off : off + n]
    finally:
        os.close(fd)


def test_mount_root_and_statfs(layers: tuple[FsRunner, Path, dict[str, bytes]]) -> None:
    runner, _, tars = layers
    assert sorted(os.listdir(runner.mountpoint)) == sorted(tars)
    st = os.statvfs(runner.path("lower"))
    assert st.f_bsize == 4096 and st.f_namemax == 255 and st.f_blocks > 0 and st.f_files > 0


def overlay_tars() -> tuple[bytes, bytes]:
    lower, upper = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=lower, mode="w", format=tarfile.PAX_FORMAT) as t:
        _add(t, "a", data=b"a\n")
        _add(t, "b", data=b"old b\n")
        _add(t, "d", tarfile.DIRTYPE)
        _add(t, "d/x", data=b"x\n")
        _add(t, "d/y", data=b"y\n")
        _add(t, "o", tarfile.DIRTYPE)
        _add(t, "o/p", data=b"p\n")
        _add(t, "o/q", tarfile.DIRTYPE)
        _add(t, "o/q/inner", data=b"inner\n")
        _add(t, "gone-dir", tarfile.DIRTYPE)
        _add(t, "gone-dir/f", data=b"f\n")
        _add(t, "link", tarfile.SYMTYPE, linkname="b")
        _add(t, "hard", tarfile.LNKTYPE, linkname="b")
        _add(t, "big", data=random.Random(3).randbytes(300_000))
    with tarfile.open(fileobj=upper, mode="w", format=tarfile.PAX_FORMAT) as t:
        _add(t, ".wh.a")
        _add(t, "b", data=b"new b\n", mode=0o4755)
        _add(t, "d", tarfile.DIRTYPE, mode=0o700)
        _add(t, "d/.wh.x")
        _add(t, "d/z", data=b"z\n")
        _add(t, "o", tarfile.DIRTYPE)
        _add(t, "o/.wh..wh..opq")
        _add(t, "o/r", data=b"r\n", pax_headers={"SCHILY.xattr.user.r": "1"})
        _add(t, ".wh.gone-dir")
        _add(t, "new/deep/file", data=b"new\n")
    return lower.getvalue(), upper.getvalue()


def _mount_overlay(lowers: list[Path], target: Path) -> None:
    target.mkdir(parents=True)
    lowerdir = ":".join(str(p) for p in lowers)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(target)],
        check=True,
        capture_output=True,
    )


def test_overlay_of_layers_equals_overlay_of_extractions(
    layers: tuple[FsRunner, Path, dict[str, bytes]],
) -> None:
    runner, work, tars = layers
    for name in ("lower", "upper"):
        extract(tars[name], work / "ovl-extracted" / name)
    fuse_merged, ext_merged = work / "ovl-fuse", work / "ovl-ext"
    _mount_overlay([runner.path("upper"), runner.path("lower")], fuse_merged)
    try:
        _mount_overlay(
            [work / "ovl-extracted" / "upper", work / "ovl-extracted" / "lower"], ext_merged
        )
        try:
            skip = implicit_dirs(tars["upper"]) | implicit_dirs(tars["lower"])
            expected = snapshot(ext_merged, skip_mtime=skip)
            actual = snapshot(fuse_merged, skip_mtime=skip)
            assert_same_tree(actual, expected)
            names = set(actual)
            assert "a" not in names and "d/x" not in names and "gone-dir" not in names
            assert "o/p" not in names and "o/q" not in names and "o/r" in names
            assert (fuse_merged / "b").read_bytes() == b"new b\n"
            assert (fuse_merged / "hard").read_bytes() == b"old b\n"
        finally:
            subprocess.run(["umount", str(ext_merged)], check=True)
    finally:
        subprocess.run(["umount", str(fuse_merged)], check=True)
