"""Issue 15 with real containerd, runc, ctr-remote, docker-registry and `pysoci serve`, its
ROOT on a small tmpfs: layers without a zTOC that try to exhaust the disk (a sparse entry
claiming a tebibyte, a gzip bomb), a hardlink out of the layer, the modes of ROOT/layers and
ROOT/snapshots, and a full disk: the span cache keeps its free-space reserve, Remove frees
space on a full disk, and the daemon starts on one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.lifecycle import unmount_stale_fuse
from tests.fixtures.containerd import Containerd, Pysoci, start_containerd
from tests.fixtures.debootstrap import rootfs_tar
from tests.fixtures.images import GZIP_LAYER, Layer, pigz_blob, write_image
from tests.fixtures.registry import Registry, start_registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs, containerd)"),
]

PYSOCI = str(Path(sys.executable).with_name("pysoci"))
TIB = 1 << 40
FS_BYTES = 256 << 20
RESERVE = 64 << 20
CONFIG = (
    "[background_fetch]\nsilence_period_msec = 100\nfetch_period_msec = 50\n"
    f"[cache]\nmin_free_bytes = {RESERVE}\nmin_free_percent = 0\n"
    "[unpack]\nexpansion_floor_bytes = 16777216\n"
)


@dataclass
class Rig:
    reg: Registry
    pysoci: Pysoci
    cd: Containerd
    tmp: Path
    fs: Path
    certs: Path

    @property
    def root(self) -> Path:
        return self.pysoci.root

    def start(self) -> None:
        self.pysoci.socket.unlink(missing_ok=True)
        self.pysoci.start()
        deadline = time.monotonic() + 30
        while self.cd.ctr("snapshots", "--snapshotter", "soci", "ls", check=False).returncode:
            assert time.monotonic() < deadline, "containerd does not reach pysoci"
            time.sleep(0.2)

    def free(self) -> int:
        st = os.statvfs(self.fs)
        return st.f_bavail * st.f_frsize

    def log(self) -> str:
        return self.pysoci.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("exhaustion")
    fs = tmp / "small"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(fs)], check=True)
    reg = start_registry(tmp / "registry")
    certs = tmp / "certs.d"
    (certs / reg.host).mkdir(parents=True)
    (certs / reg.host / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    config = tmp / "pysoci.toml"
    config.write_text(CONFIG + f'[registry]\nconfig_path = "{certs}"\n')
    pysoci = Pysoci(fs / "root", tmp / "pysoci.sock", tmp / "pysoci.log", config)
    pysoci.start()
    cd = start_containerd(tmp / "cd", tmp / "pysoci.sock")
    r = Rig(reg, pysoci, cd, tmp, fs, certs)
    try:
        yield r
    finally:
        cd.stop()
        pysoci.stop_all()
        unmount_stale_fuse(fs / "root" / "fuse")
        reg.stop()
        subprocess.run(["umount", "-l", str(fs)], check=False)


_BASE: list[Layer] = []


def base_layer() -> Layer:
    if not _BASE:
        tar = rootfs_tar().read_bytes()
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        _BASE.append(Layer(pigz_blob(tar, blocksize_kib=1024), GZIP_LAYER, diff_id))
    return _BASE[0]


def push(rig: Rig, name: str, layers: list[Layer]) -> str:
    """Push `name:v1` and its SOCI-enabled copy `name:soci`; the latter's reference."""
    write_image(rig.tmp / "src" / name, "v1", layers)
    plain = f"{rig.reg.host}/{name}:v1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{rig.tmp}/src/{name}:v1",
         f"docker://{plain}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(
        [PYSOCI, "convert", plain, f"{rig.reg.host}/{name}:soci", "--plain-http", "--root",
         str(rig.tmp / "build"), "-q"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return f"{rig.reg.host}/{name}:soci"


def rpull(rig: Rig, ref: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["ctr-remote", "--address", str(rig.cd.address), "image", "rpull", "--plain-http",
         "--snapshotter", "soci", ref],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def run(rig: Rig, ref: str, name: str, script: str) -> str:
    return rig.cd.ctr(
        "run", "--rm", "--snapshotter", "soci", ref, name, "/usr/bin/python3", "-c", script,
    ).stdout  # fmt: skip


def remove_image(rig: Rig, ref: str) -> None:
    rig.cd.ctr("image", "rm", "--sync", ref)
    wait_for(
        lambda: rig.cd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout.count("\n") <= 1,
        60,
        "containerd's GC to remove the snapshots",
    )


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def tar_layer(entries: list[tuple[tarfile.TarInfo, bytes]]) -> Layer:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data else None)
    return Layer.from_tar(buf.getvalue())


def sparse_tib_tar(tmp: Path) -> bytes:
    """GNU tar's archive (PAX sparse 1.0) of `huge`: 1 TiB, its last 3 bytes "end"."""
    src = tmp / "sparse-src"
    src.mkdir(exist_ok=True)
    with open(src / "huge", "wb") as f:
        f.truncate(TIB)
        f.seek(TIB - 3)
        f.write(b"end")
    return subprocess.run(
        ["tar", "-c", "--sparse", "--format=posix", "--sparse-version=1.0", "--numeric-owner",
         "--owner=0", "--group=0", "-C", str(src), "huge"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip


def zero_bomb(size: int) -> Layer:
    """A gzip layer of one regular file of `size` zeros (written for real by any unpacker)."""
    info = tarfile.TarInfo("zeros")
    info.size, info.mode = size, 0o644
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    h = hashlib.sha256()
    parts = []
    for piece in [info.tobuf(tarfile.PAX_FORMAT)] + [bytes(1 << 20)] * (size >> 20) + [bytes(1024)]:
        h.update(piece)
        parts.append(z.compress(piece))
    parts.append(z.flush())
    return Layer(b"".join(parts), GZIP_LAYER, "sha256:" + h.hexdigest())


def fill(rig: Rig, name: str = "filler") -> Path:
    """Fill the small filesystem to the last byte (somebody else's file)."""
    path = rig.fs / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if rig.free() > 0:
            os.posix_fallocate(fd, os.fstat(fd).st_size, rig.free())
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    assert rig.free() < 64 << 10
    return path


# --------------------------------------------------------------------------------- tests


def test_layers_without_ztoc_cannot_exhaust_the_disk(rig: Rig) -> None:
    dev = tarfile.TarInfo("opt/devnode")
    dev.type, dev.mode, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 0o666, 1, 3
    sparse = Layer.from_tar(sparse_tib_tar(rig.tmp))
    devices = tar_layer([(dev, b"")])
    assert len(sparse.blob) < 10_000
    ref = push(rig, "sparse", [base_layer(), sparse, devices])
    rpull(rig, ref)
    # Written as a hole: the 1 TiB file costs next to nothing on a 256 MiB filesystem.
    assert allocated(rig.root / "layers") < 1 << 20
    out = run(
        rig, ref, "sparse",
        "import os; st = os.stat('/huge'); f = open('/huge', 'rb'); f.seek(2**40 - 8); "
        "print(st.st_size, st.st_blocks * 512 < 2**20, f.read(), "
        "oct(os.stat('/opt/devnode').st_mode))",
    )  # fmt: skip
    assert out.split() == [str(TIB), "True", repr(b"\0" * 5 + b"end"), "0o20666"], out
    # containerd keeps its snapshot roots 0700; what is inside keeps the image's modes.
    assert stat.S_IMODE(os.stat(rig.root / "layers").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rig.root / "snapshots").st_mode) == 0o700
    node = next((rig.root / "layers").glob("*/opt/devnode"))
    assert stat.S_IMODE(node.lstat().st_mode) == 0o666

    # A 200 MiB file of zeros from a 200 KB gzip layer: over 100x its size (the floor is 16
    # MiB here), refused with RESOURCE_EXHAUSTED, and containerd does not unpack it instead.
    bomb = zero_bomb(200 << 20)
    assert len(bomb.blob) < 300_000
    bomb_ref = push(rig, "bomb", [base_layer(), bomb])
    res = rpull(rig, bomb_ref, check=False)
    assert res.returncode != 0
    assert "expands to more than its bound" in res.stderr, res.stderr[-2000:]
    assert "tar entry 'zeros'" in res.stderr
    assert "RESOURCE_EXHAUSTED" in rig.log()  # containerd 1.6 prints the code as "unknown"
    assert allocated(rig.root / "layers") + allocated(rig.root / "snapshots") < 2 << 20
    assert "REMOTE SNAPSHOT FAILED" not in rig.log()

    # A hardlink to a host path: refused, and the log says what and why.
    link = tarfile.TarInfo("etc/stolen")
    link.type, link.linkname = tarfile.LNKTYPE, "/tmp/host-secret"
    link_ref = push(rig, "hardlink", [base_layer(), tar_layer([(link, b"")])])
    rpull(rig, link_ref, check=False)
    assert "hardlink 'etc/stolen' -> '/tmp/host-secret' refused" in rig.log()
    for r in (ref, bomb_ref, link_ref):
        rig.cd.ctr("image", "rm", "--sync", r, check=False)
    wait_for(
        lambda: rig.cd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout.count("\n") <= 1,
        60,
        "containerd's GC",
    )


def test_full_disk(rig: Rig) -> None:
    # A lazy image bigger than the filesystem, filled in the background: the cache stops at
    # the free-space reserve (its 20 GiB bound would let it take everything).
    data = tar_layer([(_file("data/blob", 96 << 20), os.urandom(96 << 20))])
    ref = push(rig, "big", [base_layer(), data])
    lowest = [rig.free()]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            lowest[0] = min(lowest[0], rig.free())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rpull(rig, ref)
        assert run(rig, ref, "big-1", "print(len(open('/data/blob', 'rb').read()))").strip() == str(
            96 << 20
        )
        wait_for(
            lambda: paused(rig) > 0 or rig.free() < 1 << 20,
            180,
            "the background fetcher to fill the cache",
        )
        time.sleep(2)
    finally:
        stop.set()
        watcher.join()
    print(f"lowest free space while the cache filled: {lowest[0]} bytes (reserve {RESERVE})")
    # In flight when the reserve is reached: at most the background's requests (4 x 8 MiB).
    assert lowest[0] >= RESERVE - (33 << 20), lowest[0]
    assert "down to its free-space reserve" in rig.log()

    # Somebody else fills the disk to the last byte: Remove still works, and frees the space.
    filler = fill(rig)
    remove_image(rig, ref)
    assert pysoci_snapshots(rig) == 0  # containerd forgets them even when Remove fails
    assert list((rig.root / "cache").iterdir()) == []
    assert rig.free() > 100 << 20, rig.free()
    filler.unlink()

    # A start on a full disk: the daemon comes up, serves, and cleans up.
    pauses = paused(rig)
    rpull(rig, ref)
    wait_for(lambda: paused(rig) > pauses, 180, "the cache to fill again")
    rig.pysoci.stop_all()
    filler = fill(rig)
    rig.start()
    assert "released the metastore's reserve" in rig.log()
    snapshots = rig.cd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
    assert snapshots.count("\n") >= 3, snapshots
    remove_image(rig, ref)
    assert pysoci_snapshots(rig) == 0
    assert rig.free() > 100 << 20
    filler.unlink()
    # And Prepare works again, with the reserve made again.
    rpull(rig, ref)
    assert run(rig, ref, "big-2", "print(len(open('/data/blob', 'rb').read()))").strip() == str(
        96 << 20
    )
    assert (rig.root / "metadata.reserve").exists()
    remove_image(rig, ref)


def pysoci_snapshots(rig: Rig) -> int:
    db = sqlite3.connect(f"file:{rig.root / 'metadata.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM snapshots").fetchone()[0])
    finally:
        db.close()


def paused(rig: Rig) -> int:
    return rig.log().count("background fetching paused")


def allocated(path: Path) -> int:
    """Bytes allocated to the files under `path`."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info
