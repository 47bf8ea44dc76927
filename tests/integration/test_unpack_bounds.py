"""What a locally unpacked layer may cost (issue 15): sparse files written as holes, in every
GNU sparse format (made by GNU tar itself), a bound on what a layer expands to, the
free-space reserve, memory that does not grow with the number of entries, and a hardlink out
of the layer refused with a message that says so. Targets are small tmpfs mounts, so that an
unpacker writing zeros fills a few MiB, not the machine's disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.compression.detect import Compression
from snapshotter.content.unpack import UnpackBounds, WriteBudget, apply_layer
from snapshotter.errors import ResourceLimitError, TarFormatError
from snapshotter.freespace import FreeSpaceReserve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs, mknod, chown)"),
]

TIB = 1 << 40


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _sparse_file(path: Path, size: int, regions: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in regions:
            f.seek(offset)
            f.write(data)


def _gnu_tar(src_dir: Path, names: list[str], fmt: str) -> bytes:
    """GNU tar's archive of `names` with --sparse: fmt "gnu" (old `S` entries) or
    "posix-0.0" / "posix-0.1" / "posix-1.0" (PAX sparse formats)."""
    args = ["tar", "-c", "--sparse", "--numeric-owner", "-C", str(src_dir)]
    if fmt == "gnu":
        args += ["--format=gnu"]
    else:
        args += ["--format=posix", f"--sparse-version={fmt.split('-')[1]}"]
    return subprocess.run([*args, *names], check=True, capture_output=True).stdout


@pytest.mark.parametrize("fmt", ["gnu", "posix-0.0", "posix-0.1", "posix-1.0"])
def test_every_gnu_sparse_format_is_written_as_holes(
    tmp_path: Path, small_fs: Path, fmt: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    regions = [(0, rng.randbytes(5000)), (1 << 20, b"x" * 4096), (40 << 20, rng.randbytes(70_000))]
    _sparse_file(src / "sparse", 48 << 20, regions)  # 48 MiB logical, ~80 KB of data
    _sparse_file(src / "hole-at-end", 30 << 20, [(0, b"head")])
    _sparse_file(src / "all-hole", 20 << 20, [])
    (src / "plain").write_bytes(b"plain file")
    names = ["sparse", "hole-at-end", "all-hole", "plain"]
    tar = _gnu_tar(src, names, fmt)
    assert len(tar) < 1 << 20
    theirs = tmp_path / "theirs"  # GNU tar's own extraction, on the big disk
    theirs.mkdir()
    subprocess.run(["tar", "-x", "-C", str(theirs)], input=tar, check=True)
    ours = small_fs / "l"
    before = _used(small_fs)
    apply_layer(
        [tar[i : i + 7000] for i in range(0, len(tar), 7000)], Compression.UNCOMPRESSED, ours
    )
    # 48 + 30 + 20 MiB of logical size on a 64 MiB filesystem: only holes make it fit.
    assert _used(small_fs) - before < 2 << 20
    for name in names:
        a, b = (ours / name).stat(), (theirs / name).stat()
        assert a.st_size == b.st_size, name
        assert a.st_blocks <= b.st_blocks + 64, (name, a.st_blocks, b.st_blocks)
        assert (
            hashlib.sha256((ours / name).read_bytes()).digest()
            == hashlib.sha256((theirs / name).read_bytes()).digest()
        ), name


@pytest.mark.parametrize("fmt", ["gnu", "posix-1.0"])
def test_a_sparse_entry_claiming_a_tebibyte_costs_nothing(
    tmp_path: Path, small_fs: Path, fmt: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sparse_file(src / "huge", TIB, [(TIB - 3, b"end")])
    blob = gzip.compress(_gnu_tar(src, ["huge"], fmt), 9)
    assert len(blob) < 10_000  # a 10 KB layer
    out = small_fs / "l"
    apply_layer([blob], Compression.GZIP, out)
    st = (out / "huge").stat()
    assert st.st_size == TIB and st.st_blocks * 512 <= 64 << 10
    with open(out / "huge", "rb") as f:
        f.seek(TIB - 8)
        assert f.read() == b"\0" * 5 + b"end"


def test_expansion_bound_stops_a_zero_bomb(small_fs: Path) -> None:
    """200 MiB of zeros in a regular file (no sparse entry: written for real) from a 200 KB
    gzip layer: past 100x its size, the unpack stops with the entry named."""
    blob = _zero_bomb(200 << 20)
    assert len(blob) < 300_000
    bounds = UnpackBounds(max_expansion_ratio=100, expansion_floor_bytes=8 << 20)
    budget = bounds.budget(len(blob), "layer sha256:bomb")
    before = _used(small_fs)
    with pytest.raises(ResourceLimitError, match=r"expands to more than its bound.*'zeros'"):
        apply_layer(_chunks(blob), Compression.GZIP, small_fs / "l", budget=budget)
    assert budget.limit == 100 * len(blob)
    assert _used(small_fs) - before <= budget.limit + (2 << 20)  # stopped at the bound


def test_free_space_reserve_stops_an_unpack(small_fs: Path) -> None:
    data = random.Random(3).randbytes(32 << 20)
    tar = _tar([("big", data)])
    budget = WriteBudget(None, FreeSpaceReserve(min_free_bytes=40 << 20))
    with pytest.raises(ResourceLimitError, match="free-space reserve"):
        apply_layer(_chunks(tar), Compression.UNCOMPRESSED, small_fs / "l", budget=budget)
    st = os.statvfs(small_fs)
    assert st.f_bavail * st.f_frsize >= (40 << 20) - (17 << 20)  # checked every 16 MiB


def test_a_hardlink_out_of_the_layer_says_what_was_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("etc/shadow-copy")
    link.type, link.linkname = tarfile.LNKTYPE, "/tmp/host-file"
    tar = _tar([("etc/passwd", b"root:x:0:0\n")], extra=[link])
    with pytest.raises(TarFormatError) as e:
        apply_layer([tar], Compression.UNCOMPRESSED, tmp_path / "l")
    msg = str(e.value)
    assert "hardlink 'etc/shadow-copy' -> '/tmp/host-file' refused" in msg, msg
    assert "no earlier entry of this layer has that path" in msg, msg


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from snapshotter.compression.detect import Compression
from snapshotter.content.unpack import apply_layer
sys.path.insert(0, sys.argv[3])
from tests.integration.test_unpack_bounds import many_entries_tar
n, out = int(sys.argv[1]), Path(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
apply_layer(many_entries_tar(n), Compression.UNCOMPRESSED, out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"entries": n, "growth_kib": peak - base}))
"""


def many_entries_tar(n: int, per_dir: int = 1000) -> Iterator[bytes]:
    """A tar of `n` entries (a directory per `per_dir` empty files), streamed."""
    batch: list[bytes] = []
    for i in range(n):
        d, f = divmod(i, per_dir)
        if f == 0:
            info = tarfile.TarInfo(f"d{d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info = tarfile.TarInfo(f"d{d}/f{f}")
            info.mode = 0o644
        batch.append(info.tobuf(tarfile.USTAR_FORMAT))
        if len(batch) == 2048:
            yield b"".join(batch)
            batch = []
    yield b"".join(batch) + bytes(1024)


@pytest.mark.slow
def test_memory_does_not_grow_with_the_entry_count(tmp_path: Path) -> None:
    repo = str(Path(__file__).resolve().parents[2])
    growth = {}
    for n in (1_000, 300_000):
        mnt = tmp_path / f"fs{n}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(mnt)], check=True)
        try:
            res = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, str(n), str(mnt / "l"), repo],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        growth[n] = json.loads(res.stdout)["growth_kib"]
    print("peak RSS growth (KiB) by entries:", growth)
    # tarfile kept every member: ~490 B each, 140 MiB for 300 000 entries.
    assert growth[300_000] - growth[1_000] < 16 * 1024, growth


def _tar(files: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
        for info in extra or []:
            t.addfile(info)
    return buf.getvalue()


def _zero_bomb(size: int) -> bytes:
    """The gzip of a one-file tar of `size` zeros, made without holding the tar."""
    info = tarfile.TarInfo("zeros")
    info.size, info.mode = size, 0o644
    header = info.tobuf(tarfile.PAX_FORMAT)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(header)]
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(z.compress(chunk))
    parts.append(z.compress(bytes(1024)))
    parts.append(z.flush())
    return b"".join(parts)


def _chunks(blob: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]
