"""Failures stay local: unfetchable or unverifiable reads are EIO, writes are EROFS, a lying zTOC
is caught by the header check, and a layer can be unmounted while reads are in flight."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.soci.ztoc import decode_ztoc, encode_ztoc
from tests.fixtures.fs_runner import FsRunner, LayerSpec
from tests.fixtures.layer_data import write_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE)")

FILES = {f"f{i}": bytes([65 + i]) * (10_000 + i * 1000) for i in range(6)}
TWINS = {"twin-a": b"a" * 5000, "twin-b": b"b" * 5000}


def make_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("dir")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        t.addfile(info)
        for name, data in {**FILES, **TWINS}.items():
            info = tarfile.TarInfo(f"dir/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FsRunner]:
    work = tmp_path_factory.mktemp("fs-faults")
    tar = make_tar()
    layer = write_layer(tar, work / "blobs", "layer", span_size=8 << 10)
    # A zTOC that lies: the two twins' data offsets swapped (names and sizes unchanged).
    z = decode_ztoc(layer.ztoc.read_bytes())
    files = list(z.files)
    a, b = (next(f for f in files if f.name == f"dir/{n}") for n in TWINS)
    a.uncompressed_offset, b.uncompressed_offset = b.uncompressed_offset, a.uncompressed_offset
    lying = work / "blobs" / "lying.ztoc"
    lying.write_bytes(encode_ztoc(dataclasses.replace(z, files=files)))
    specs = [
        LayerSpec("good", layer.blob, layer.ztoc),
        LayerSpec("down", layer.blob, layer.ztoc, failure="unavailable"),
        LayerSpec("corrupt", layer.blob, layer.ztoc, failure="corrupt"),
        LayerSpec("lying", layer.blob, lying),
        LayerSpec("slow", layer.blob, layer.ztoc, delay=1.0),
    ]
    with FsRunner(work / "mnt", specs, session={"attr_timeout": 1.0}) as r:
        yield r


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_errno(code: int, fn: object, *args: object) -> None:
    assert callable(fn)
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, info.value


def test_good_layer_reads(runner: FsRunner) -> None:
    for name, data in {**FILES, **TWINS}.items():
        assert read(runner.path("good") / "dir" / name) == data


@pytest.mark.parametrize("layer", ["down", "corrupt"])
def test_unfetchable_or_unverifiable_reads_are_eio(runner: FsRunner, layer: str) -> None:
    path = runner.path(layer) / "dir" / "f1"
    assert os.stat(path).st_size == len(FILES["f1"])  # metadata comes from the zTOC
    assert sorted(os.listdir(runner.path(layer) / "dir")) == sorted({**FILES, **TWINS})
    assert_errno(errno.EIO, read, path)
    assert_errno(errno.EIO, read, path)  # and again: nothing is cached as good
    assert read(runner.path("good") / "dir" / "f1") == FILES["f1"]
    status = json.loads(read(runner.mountpoint / ".status" / f"{layer}.json"))
    assert status["readErrors"] >= 2 and status["lastReadError"]
    assert status["state"] == "error" and status["error"]
    assert runner.command(f"check {layer}").startswith("error LayerUnavailableError")
    assert runner.alive()


def test_lying_ztoc_is_caught_by_the_header_check(runner: FsRunner) -> None:
    for name in TWINS:
        assert_errno(errno.EIO, read, runner.path("lying") / "dir" / name)
    assert read(runner.path("lying") / "dir" / "f2") == FILES["f2"]
    assert "does not describe zTOC entry 'dir/twin-a'" in runner.log()


def test_writes_are_erofs(runner: FsRunner) -> None:
    d = runner.path("good") / "dir"
    f = d / "f0"
    assert_errno(errno.EROFS, os.open, f, os.O_WRONLY)
    assert_errno(errno.EROFS, os.open, f, os.O_RDWR)
    assert_errno(errno.EROFS, os.open, d / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    assert_errno(errno.EROFS, os.mkdir, d / "newdir")
    assert_errno(errno.EROFS, os.unlink, f)
    assert_errno(errno.EROFS, os.rmdir, d)
    assert_errno(errno.EROFS, os.rename, f, d / "g")
    assert_errno(errno.EROFS, os.chmod, f, 0o600)
    assert_errno(errno.EROFS, os.chown, f, 1, 1)
    assert_errno(errno.EROFS, os.utime, f)
    assert_errno(errno.EROFS, os.truncate, f, 0)
    assert_errno(errno.EROFS, os.symlink, "x", d / "sym")
    assert_errno(errno.EROFS, os.link, f, d / "hard")
    assert_errno(errno.EROFS, os.setxattr, f, "user.x", b"1")
    assert_errno(errno.EROFS, os.mkdir, runner.mountpoint / "layer-from-outside")
    assert read(f) == FILES["f0"]


def test_status_files_and_root(runner: FsRunner) -> None:
    assert ".status" not in os.listdir(runner.mountpoint)
    assert "good" in os.listdir(runner.mountpoint)
    status = json.loads(read(runner.mountpoint / ".status" / "good.json"))
    for key in ("digest", "size", "fetchedSize", "fetchedPercent", "state", "error"):
        assert key in status
    assert status["layerId"] == "good" and status["readErrors"] == 0
    assert runner.command("check good") == "ok"
    assert runner.command("check nope").startswith("error LayerNotMountedError")


def test_unmount_while_reads_are_in_flight(runner: FsRunner) -> None:
    path = runner.path("slow") / "dir" / "f3"
    results: list[object] = []

    def reader() -> None:
        try:
            results.append(read(path))
        except OSError as e:
            results.append(e.errno)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(0.3)  # the reads are now waiting on the slow layer
    # The kernel caches the root's attributes; layers coming and going must refresh its nlink.
    nlink = os.stat(runner.mountpoint).st_nlink
    assert runner.command("mount good good-again") == "mounted good-again"
    assert os.stat(runner.mountpoint).st_nlink == nlink + 1
    assert read(runner.path("good-again") / "dir" / "f3") == FILES["f3"]
    assert runner.command("unmount good-again") == "unmounted good-again"
    assert runner.command("unmount slow") == "unmounted slow"
    assert os.stat(runner.mountpoint).st_nlink == nlink - 1
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    assert all(r in (FILES["f3"], errno.EIO) for r in results), results
    assert "slow" not in os.listdir(runner.mountpoint)
    assert_errno(errno.ENOENT, os.stat, path)
    assert_errno(errno.ENOENT, os.stat, runner.mountpoint / ".status" / "slow.json")
    assert read(runner.path("good") / "dir" / "f3") == FILES["f3"]
    assert runner.command("unmount slow").startswith("error LayerNotMountedError")
    assert runner.alive()
