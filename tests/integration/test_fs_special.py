"""Entries with no data to check are shown only once their tar header is checked, and a
huge layer being mounted does not hold up reads of the others.

A zTOC is input: one that adds a symlink, a block device, a zero-byte setuid file, or turns a
file into a symlink or a hardlink to another must not change what a container sees. Every
lying zTOC here is otherwise valid (it decodes and mounts), so only the header check stands
between it and the container.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator

import pytest

from snapshotter.soci.ztoc import FileMetadata, Ztoc, decode_ztoc, encode_ztoc
from tests.fixtures.fs_runner import FsRunner, LayerSpec
from tests.fixtures.layer_data import write_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE)")

FILES = {f"f{i}": bytes([65 + i]) * (3000 + 700 * i) for i in range(8)}
MTIME = 1_600_000_000
HUGE_ENTRIES = 150_000


def make_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("dir")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
        t.addfile(info)
        for name, data in FILES.items():
            info = tarfile.TarInfo(f"dir/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dir/real-link")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "f1", MTIME
        t.addfile(link)
        su = tarfile.TarInfo("dir/real-suid")
        su.mode, su.mtime = 0o4755, MTIME
        t.addfile(su, io.BytesIO(b""))
    return buf.getvalue()


def entry(z: Ztoc, name: str) -> int:
    return next(i for i, f in enumerate(z.files) if f.name == f"dir/{name}")


def lie(z: Ztoc, change: Callable[[list[FileMetadata]], None]) -> bytes:
    files = list(z.files)
    change(files)
    return encode_ztoc(dataclasses.replace(z, files=files))


def lies(z: Ztoc) -> dict[str, bytes]:
    f1 = z.files[entry(z, "f1")]

    def add(meta: FileMetadata) -> Callable[[list[FileMetadata]], None]:
        return lambda files: files.append(meta)

    def retype(name: str, **kw: object) -> Callable[[list[FileMetadata]], None]:
        def change(files: list[FileMetadata]) -> None:
            i = entry(z, name)
            files[i] = dataclasses.replace(files[i], uncompressed_size=0, **kw)  # type: ignore[arg-type]

        return change

    at = f1.uncompressed_offset
    mtime = f1.mod_time
    return {
        "symlink": lie(
            z,
            add(FileMetadata("dir/evil", "symlink", at, 0, linkname="/etc/shadow", mod_time=mtime)),
        ),
        "device": lie(
            z, add(FileMetadata("dir/sda", "block", at, 0, mode=0o666, devmajor=8, mod_time=mtime))
        ),
        "suid": lie(z, add(FileMetadata("dir/su", "reg", at, 0, mode=0o4755, mod_time=mtime))),
        "to-symlink": lie(z, retype("f2", type="symlink", linkname="f3")),
        "to-hardlink": lie(z, retype("f4", type="hardlink", linkname="dir/f1")),
    }


LIARS = {
    "symlink": "evil",
    "device": "sda",
    "suid": "su",
    "to-symlink": "f2",
    "to-hardlink": "f4",
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FsRunner]:
    work = tmp_path_factory.mktemp("fs-special")
    layer = write_layer(make_tar(), work / "blobs", "layer", span_size=8 << 10)
    z = decode_ztoc(layer.ztoc.read_bytes())
    specs = [LayerSpec("good", layer.blob, layer.ztoc)]
    for name, blob in lies(z).items():
        path = work / "blobs" / f"{name}.ztoc"
        path.write_bytes(blob)
        specs.append(LayerSpec(name, layer.blob, path))
    # A layer of many entries (directories need no data), to mount while others are read.
    huge = list(z.files) + [
        FileMetadata(f"many/d{i // 1000}/e{i}", "dir", 0, 0, mode=0o755)
        for i in range(HUGE_ENTRIES)
    ]
    huge_path = work / "blobs" / "huge.ztoc"
    huge_path.write_bytes(encode_ztoc(dataclasses.replace(z, files=huge)))
    specs.append(LayerSpec("huge", layer.blob, huge_path))
    with FsRunner(work / "mnt", specs) as r:
        for spec in specs:
            assert r.command(f"ready {spec.id}") == f"ready {spec.id}"
        r.command("unmount huge")  # mounted again by the test that needs it
        yield r


def assert_eio(fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errno.EIO, info.value


def test_honest_special_entries_are_shown_once_checked(runner: FsRunner) -> None:
    d = runner.path("good") / "dir"
    assert os.readlink(d / "real-link") == "f1"
    assert (d / "real-link").read_bytes() == FILES["f1"]
    st = os.lstat(d / "real-suid")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_size == 0
    assert sorted(os.listdir(d)) == sorted([*FILES, "real-link", "real-suid"])
    status = json.loads(runner.command("status good"))
    assert status["headerMismatches"] == 0


@pytest.mark.parametrize("layer", sorted(LIARS))
def test_a_lying_entry_without_data_is_never_shown(runner: FsRunner, layer: str) -> None:
    d = runner.path(layer) / "dir"
    name = LIARS[layer]
    assert_eio(os.lstat, d / name)
    assert_eio(os.lstat, d / name)  # and again: a lie is remembered
    assert_eio(os.listdir, d)  # the listing would show it
    # What the zTOC did not touch is served as usual.
    assert (d / "f0").read_bytes() == FILES["f0"]
    assert os.readlink(d / "real-link") == "f1"
    status = json.loads(runner.command(f"status {layer}"))
    assert status["headerMismatches"] >= 1 and "does not describe" in status["lastHeaderMismatch"]
    assert "does not describe zTOC entry" in runner.log()


def test_the_hijacked_path_never_returns_another_files_bytes(runner: FsRunner) -> None:
    d = runner.path("to-hardlink") / "dir"
    assert_eio(open, d / "f4", "rb")
    assert (d / "f1").read_bytes() == FILES["f1"]


def test_reads_go_on_while_a_huge_layer_is_mounted(runner: FsRunner) -> None:
    path = runner.path("good") / "dir" / "f3"
    assert path.read_bytes() == FILES["f3"]
    done = threading.Event()
    reads: list[bool] = []
    answers: dict[str, int] = {}

    def reader() -> None:
        while not done.is_set():
            reads.append(path.read_bytes() == FILES["f3"])
            os.stat(path)
            os.listdir(path.parent)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        before = len(reads)
        assert runner.command("mount huge huge") == "mounted huge"  # decoded off the FUSE thread
        answers["decoded"] = len(reads) - before
        status = json.loads(runner.command("status huge"))
        during = len(reads)
        assert runner.command("ready huge") == "ready huge"
        answers["building"] = len(reads) - during
    finally:
        done.set()
        thread.join(timeout=30)
    assert all(reads)
    # Reads completed while the zTOC was decoded and while its tree was built.
    assert answers["decoded"] > 0, answers
    assert not status["treeReady"] and answers["building"] > 0, (answers, status)
    assert sorted(os.listdir(runner.path("huge") / "many"))[:2] == ["d0", "d1"]
    assert runner.command("unmount huge") == "unmounted huge"
