"""The header verifier: spans vouch for every chain inside them, lies are found, reads shared."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import trio

from snapshotter.compression.detect import Compression
from snapshotter.fs.headers import BAD, GOOD, UNCHECKED, HeaderVerifier
from snapshotter.soci.build import build_ztoc
from snapshotter.soci.tarheader import header_starts
from snapshotter.soci.ztoc import FileMetadata

SPAN = 5000  # gzip spans end anywhere, not on tar blocks


def make_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(60):
            info = tarfile.TarInfo(f"d/f{i:02d}")
            data = bytes([i]) * (i * 97)
            info.size, info.mtime = len(data), 1_600_000_000 + i
            if i % 7 == 0:
                info.pax_headers = {"SCHILY.xattr.user.n": str(i)}
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d/sym")
        link.type, link.linkname = tarfile.SYMTYPE, "f01"
        tar.addfile(link)
    return buf.getvalue()


def verifier(files: list[FileMetadata]) -> HeaderVerifier:
    return HeaderVerifier(
        "test", header_starts(files), [f.uncompressed_offset for f in files], files.__getitem__
    )


def feed(v: HeaderVerifier, tar: bytes) -> None:
    for lo in range(0, len(tar), SPAN):
        v.observe_span(lo, tar[lo : lo + SPAN])


def inside_one_span(files: list[FileMetadata]) -> list[int]:
    starts = header_starts(files)
    return [
        i for i, f in enumerate(files) if starts[i] // SPAN == (f.uncompressed_offset - 1) // SPAN
    ]


def test_spans_vouch_for_every_chain_inside_and_find_the_liar() -> None:
    tar = make_tar()
    files = list(build_ztoc([tar], Compression.UNCOMPRESSED, 1 << 20).files)
    inside = inside_one_span(files)
    assert 10 < len(inside) < len(files)  # some chains straddle two spans
    liars = {inside[5]: {"mode": files[inside[5]].mode ^ 0o4000}}
    liars[inside[9]] = {"mod_time": "2001-01-01T00:00:00Z"}
    liars[len(files) - 1] = {"linkname": "f02"}
    for i, change in liars.items():
        files[i] = dataclasses.replace(files[i], **change)  # type: ignore[arg-type]
    v = verifier(files)
    feed(v, tar)
    for i in range(len(files)):
        if i in liars:
            assert v.state(i) == BAD, files[i].name
        elif i in inside:
            assert v.state(i) == GOOD, files[i].name
        else:
            assert v.state(i) == UNCHECKED  # straddling chains are checked on demand
    assert v.status()["headerMismatches"] == len(liars)


async def test_on_demand_checks_read_once_and_catch_lies() -> None:
    tar = make_tar()
    files = list(build_ztoc([tar], Compression.UNCOMPRESSED, 1 << 20).files)
    files[3] = dataclasses.replace(files[3], uid=1)
    v = verifier(files)
    reads: list[tuple[int, int]] = []

    async def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        await trio.sleep(0.01)
        return tar[offset : offset + length]

    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(results, v.check(2, read)))
    assert results == [True] * 5 and len(reads) == 1
    assert not await v.check(3, read)
    assert await v.check(2, read) and len(reads) == 2  # known now: no read


async def _append(out: list[bool], coro: object) -> None:
    out.append(await coro)  # type: ignore[misc]
