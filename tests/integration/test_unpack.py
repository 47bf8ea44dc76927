"""Local layer application: equals GNU tar's extraction, converts whiteouts, stays inside."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapshotter.compression.detect import Compression
from snapshotter.content.unpack import apply_layer
from snapshotter.errors import DigestMismatchError, TarFormatError
from tests.fixtures.images import gzip_blob, zstd_blob
from tests.fixtures.tars import random_tar

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in os.listxattr(p, follow_symlinks=False)
            }
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns // 10**9
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_rdev,
                st.st_nlink,
                mtime,
                content,
                xattrs,
            )
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "compression", [Compression.GZIP, Compression.ZSTD, Compression.UNCOMPRESSED]
)
def test_equals_gnu_tar(tmp_path: Path, seed: int, compression: Compression) -> None:
    tar = random_tar(random.Random(seed), max_file_size=70_000)
    blob = {Compression.GZIP: gzip_blob, Compression.ZSTD: zstd_blob}.get(compression, lambda b: b)(
        tar
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    theirs.mkdir()
    subprocess.run(
        [
            "tar",
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "--numeric-owner",
            "-p",
            "-C",
            str(theirs),
        ],
        input=tar,
        check=True,
        capture_output=True,
    )
    diff_id = apply_layer(
        [blob[i : i + 5000] for i in range(0, len(blob), 5000)], compression, ours
    )
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert snapshot(ours) == snapshot(theirs)


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.mode = kind, linkname, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return i


def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    tar = _tar(
        [
            (_info("d", tarfile.DIRTYPE), b""),
            (_info("d/.wh..wh..opq"), b""),
            (_info("d/kept"), b"x"),
            (_info(".wh.gone"), b""),
        ]
    )
    apply_layer([tar], Compression.UNCOMPRESSED, tmp_path / "l")
    st = os.lstat(tmp_path / "l/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(tmp_path / "l/d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(tmp_path / "l/d")) == ["kept"]
    assert not (tmp_path / "l/.wh.gone").exists()


@pytest.mark.parametrize(
    "entries",
    [
        [(_info("../escape"), b"x")],
        [(_info("a/../../escape"), b"x")],
    ],
)
def test_names_escaping_the_root_are_refused(
    tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    with pytest.raises(TarFormatError, match="escapes"):
        apply_layer([_tar(entries)], Compression.UNCOMPRESSED, tmp_path / "l")
    assert not (tmp_path / "escape").exists()


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = _tar(
        [
            (_info("link", tarfile.SYMTYPE, str(outside)), b""),
            (_info("link/file"), b"pwned"),
            (_info("abs", tarfile.SYMTYPE, "/etc"), b""),
            (_info("abs/passwd-copy"), b"pwned"),
        ]
    )
    apply_layer([tar], Compression.UNCOMPRESSED, tmp_path / "l")
    assert list(outside.iterdir()) == []
    assert not Path("/etc/passwd-copy").exists()
    assert (tmp_path / "l/link/file").read_bytes() == b"pwned"  # link was replaced by a dir


def test_diff_id_is_checked(tmp_path: Path) -> None:
    tar = _tar([(_info("f"), b"data")])
    with pytest.raises(DigestMismatchError):
        apply_layer(
            [gzip_blob(tar)],
            Compression.GZIP,
            tmp_path / "l",
            expected_diff_id="sha256:" + "0" * 64,
        )


def test_garbage_is_a_tar_error(tmp_path: Path) -> None:
    with pytest.raises(TarFormatError):
        apply_layer([b"\x01" * 2048], Compression.UNCOMPRESSED, tmp_path / "l")


def test_pax_nanosecond_mtimes_are_exact(tmp_path: Path) -> None:
    # tarfile reads a PAX mtime as a float, which cannot hold 1.7e9 s with 9 decimals.
    entries = []
    for i, stamp in enumerate(["1700000000.123456789", "1700000001.000000001", "-5.5", "7"]):
        info = _info(f"f{i}")
        info.pax_headers = {"mtime": stamp}
        entries.append((info, b"x"))
    out = tmp_path / "out"
    out.mkdir()
    apply_layer([_tar(entries)], Compression.UNCOMPRESSED, out)
    got = [os.lstat(out / f"f{i}").st_mtime_ns for i in range(4)]
    assert got == [1_700_000_000_123_456_789, 1_700_000_001_000_000_001, -5_500_000_000, 7 * 10**9]
