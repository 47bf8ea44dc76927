"""A lying zTOC (checkpoint windows that are not the layer's) is caught, never served.

The span digests of a zTOC cover only compressed bytes, so a zTOC whose checkpoint windows
were XOR-ed verifies span by span and still inflates to wrong bytes. These tests build such
zTOCs from real layers and check what catches them: the window check on every inflated run
(foreground, streamed or not) and the pass over the complete layer (background: windows,
uncompressed size, diff ID).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio

from snapshotter import metrics
from snapshotter.compression.gzip import LayerVerifier, check_windows, inflate_spans
from snapshotter.config import fetch_config
from snapshotter.errors import ZtocMismatchError, ZtocRejectedError
from snapshotter.fetch.background import BackgroundFetcher
from snapshotter.fetch.cache import DiskCache
from snapshotter.fetch.config import FetchConfig
from snapshotter.fetch.spans import ForegroundActivity, SpanManager, SpanMemoryCache
from snapshotter.soci.zinfo import (
    CHECKPOINT_SIZE,
    HEADER_SIZE,
    WINDOW_SIZE,
    GzipZinfo,
)
from snapshotter.soci.ztoc import Ztoc
from tests.fixtures.range_source import BlobRangeSource, FetchLayer, gzip_zinfo_of, make_layer

_WINDOW_AT = CHECKPOINT_SIZE - WINDOW_SIZE  # in, out, bits come first


@functools.cache
def layer(kind: str = "gzip") -> FetchLayer:
    return make_layer(11, kind=kind, span_size=64 << 10, min_size=2 << 20)


def lying(ztoc: Ztoc, checkpoints: Iterable[int]) -> Ztoc:
    """The zTOC with the windows of `checkpoints` XOR-ed (everything else as it was)."""
    blob = bytearray(bytes(ztoc.checkpoints))
    for cp in checkpoints:
        at = HEADER_SIZE + cp * CHECKPOINT_SIZE + _WINDOW_AT
        for i in range(at, at + WINDOW_SIZE):
            blob[i] ^= 0x5A
    return dataclasses.replace(ztoc, checkpoints=bytes(blob))


def diff_id(lay: FetchLayer) -> str:
    return "sha256:" + hashlib.sha256(gzip.decompress(lay.blob)).hexdigest()


def run_of(zi: GzipZinfo, blob: bytes, first: int, last: int) -> bytes:
    lo = zi.compressed_bounds(first)[0]
    return inflate_spans(zi, first, last, blob[lo : zi.compressed_bounds(last)[1]])


# ------------------------------------------------------------------ the pure checks


@pytest.mark.parametrize("kind", ["gzip", "pigz"])
def test_honest_windows_pass_every_run(kind: str) -> None:
    lay = layer(kind)
    zi = gzip_zinfo_of(lay.ztoc)
    assert zi.num_spans > 8
    for first in range(zi.num_spans):
        for last in {first, min(first + 2, zi.num_spans - 1)}:
            check_windows(zi, first, last, run_of(zi, lay.blob, first, last))


def test_a_run_proves_the_window_after_it_and_inside_it() -> None:
    lay = layer()
    honest = gzip_zinfo_of(lay.ztoc)
    bad = gzip_zinfo_of(lying(lay.ztoc, [5]))
    # A run ending at span 4 (checkpoint 5 next) or running through checkpoint 5.
    for first, last in [(4, 4), (2, 6), (0, 5)]:
        plain = run_of(honest, lay.blob, first, last)
        with pytest.raises(ZtocMismatchError, match="checkpoint 5"):
            check_windows(bad, first, last, plain)
    # A run starting at checkpoint 5 uses its window and cannot check it.
    check_windows(bad, 5, 5, run_of(honest, lay.blob, 5, 5))


@pytest.mark.parametrize("kind", ["gzip", "pigz"])
def test_layer_verifier_passes_an_honest_layer(kind: str) -> None:
    lay = layer(kind)
    verifier = LayerVerifier(gzip_zinfo_of(lay.ztoc), diff_id(lay))
    for pos in range(0, len(lay.blob), 100_003):
        verifier.feed(lay.blob[pos : pos + 100_003])
    verifier.finish()


def test_layer_verifier_catches_the_last_window_and_a_wrong_diff_id() -> None:
    lay = layer()
    last = gzip_zinfo_of(lay.ztoc).num_spans - 1
    verifier = LayerVerifier(gzip_zinfo_of(lying(lay.ztoc, [last])), diff_id(lay))
    with pytest.raises(ZtocMismatchError, match=f"checkpoint {last}"):
        verifier.feed(lay.blob)
        verifier.finish()
    verifier = LayerVerifier(gzip_zinfo_of(lay.ztoc), "sha256:" + "0" * 64)
    verifier.feed(lay.blob)
    with pytest.raises(ZtocMismatchError, match="image config"):
        verifier.finish()


# ----------------------------------------------------------------- the span manager


def rejected_count(stage: str) -> float:
    value = metrics.REGISTRY.get_sample_value("pysoci_layers_rejected_total", {"stage": stage})
    return value or 0.0


async def open_manager(
    nursery: trio.Nursery,
    lay: FetchLayer,
    ztoc: Ztoc,
    source: BlobRangeSource,
    root: Path,
    config: FetchConfig,
    rejections: list[str],
    *,
    memory: SpanMemoryCache | None = None,
    key: str = "",
) -> SpanManager:
    handle = DiskCache(root, 1 << 30).open_layer(lay.digest, len(lay.blob))
    manager = SpanManager(
        lay.digest,
        ztoc,
        source,
        handle,
        memory=SpanMemoryCache(64 << 20) if memory is None else memory,
        config=config,
        ztoc_digest="sha256:" + "ab" * 32,
        diff_id=diff_id(lay),
        on_reject=rejections.append,
        memory_key=key,
    )
    await nursery.start(manager.run)
    return manager


@pytest.mark.parametrize("stream", [True, False])
async def test_a_read_through_lying_windows_fails_and_blocks_the_layer(
    stream: bool, tmp_path: Path
) -> None:
    lay = layer()
    zi = gzip_zinfo_of(lay.ztoc)
    ztoc = lying(lay.ztoc, range(1, zi.num_spans))
    source = BlobRangeSource(lay.blob)
    config = fetch_config(readahead_spans=0, stream_inflate=stream)
    rejections: list[str] = []
    before = rejected_count("foreground")
    async with trio.open_nursery() as nursery:
        m = await open_manager(nursery, lay, ztoc, source, tmp_path, config, rejections)
        lo, hi = zi.uncompressed_bounds(3)
        with pytest.raises(ZtocRejectedError, match="checkpoint 4"):
            await m.read(lo, hi - lo)
        assert source.streamed == (1 if stream else 0)
        n = source.request_count
        # Every read from now on fails, even of spans never fetched, and fetches nothing.
        for s in (0, 3, zi.num_spans - 1):
            lo, hi = zi.uncompressed_bounds(s)
            with pytest.raises(ZtocRejectedError):
                await m.read(lo, 10)
        assert source.request_count == n
        assert m.status()["state"] == "rejected"
        assert "sha256:abab" in str(m.status()["error"])
        assert m.claim_missing(1 << 30) is None
        assert len(rejections) == 1 and "checkpoint 4" in rejections[0]
        assert rejected_count("foreground") == before + 1
        await m.close()
        nursery.cancel_scope.cancel()


async def test_the_background_pass_catches_a_lie_the_foreground_cannot(tmp_path: Path) -> None:
    """The last checkpoint's window is proven by no run a reader asks for that starts there:
    its span reads back wrong until the pass over the complete layer rejects the zTOC."""
    lay = layer()
    zi = gzip_zinfo_of(lay.ztoc)
    last = zi.num_spans - 1
    ztoc = lying(lay.ztoc, [last])
    source = BlobRangeSource(lay.blob)
    rejections: list[str] = []
    before = rejected_count("background")
    async with trio.open_nursery() as nursery:
        m = await open_manager(
            nursery, lay, ztoc, source, tmp_path, fetch_config(readahead_spans=0), rejections
        )
        lo, hi = zi.uncompressed_bounds(last)
        await m.read(lo, hi - lo)  # cannot be proven from this run alone
        while (claim := m.claim_missing(1 << 30)) is not None:
            await m.fill(claim)
        assert m.complete
        with pytest.raises(ZtocRejectedError, match=f"checkpoint {last}"):
            await m.verify_layer()
        assert m.layer_verified is not True
        with pytest.raises(ZtocRejectedError):
            await m.read(lo, hi - lo)
        assert m.status()["state"] == "rejected"
        assert rejected_count("background") == before + 1
        assert len(rejections) == 1
        await m.close()
        nursery.cancel_scope.cancel()


async def test_a_wrong_diff_id_rejects_the_complete_layer(tmp_path: Path) -> None:
    lay = layer()
    source = BlobRangeSource(lay.blob)
    rejections: list[str] = []
    async with trio.open_nursery() as nursery:
        handle = DiskCache(tmp_path, 1 << 30).open_layer(lay.digest, len(lay.blob))
        m = SpanManager(
            lay.digest,
            lay.ztoc,
            source,
            handle,
            memory=SpanMemoryCache(64 << 20),
            config=fetch_config(),
            diff_id="sha256:" + "1" * 64,
            on_reject=rejections.append,
        )
        await nursery.start(m.run)
        while (claim := m.claim_missing(1 << 30)) is not None:
            await m.fill(claim)
        with pytest.raises(ZtocRejectedError, match="image config"):
            await m.verify_layer()
        assert rejections
        await m.close()
        nursery.cancel_scope.cancel()


async def test_an_honest_layer_verifies(tmp_path: Path) -> None:
    lay = layer("pigz")
    source = BlobRangeSource(lay.blob)
    async with trio.open_nursery() as nursery:
        m = await open_manager(
            nursery, lay, lay.ztoc, source, tmp_path, fetch_config(), rejections := []
        )
        assert await m.read(0, len(lay.tar)) == lay.tar
        assert m.complete
        assert await m.verify_layer()
        assert not rejections and m.status()["state"] == "complete"
        await m.close()
        nursery.cancel_scope.cancel()


async def test_two_ztocs_of_one_layer_do_not_share_inflated_spans(tmp_path: Path) -> None:
    """One memory cache, one layer digest, two zTOCs (layer ids as memory keys, as the data
    plane mounts them): the honest one never sees what the lying one inflated."""
    lay = layer()
    zi = gzip_zinfo_of(lay.ztoc)
    last = zi.num_spans - 1
    memory = SpanMemoryCache(64 << 20)
    async with trio.open_nursery() as nursery:
        liar = await open_manager(
            nursery,
            lay,
            lying(lay.ztoc, [last]),
            BlobRangeSource(lay.blob),
            tmp_path / "a",
            fetch_config(readahead_spans=0),
            [],
            memory=memory,
            key="liar",
        )
        honest = await open_manager(
            nursery,
            lay,
            lay.ztoc,
            BlobRangeSource(lay.blob),
            tmp_path / "b",
            fetch_config(readahead_spans=0),
            [],
            memory=memory,
            key="honest",
        )
        lo, hi = zi.uncompressed_bounds(last)
        wrong = await liar.read(lo, hi - lo)
        assert wrong != lay.tar[lo:hi]  # what the foreground alone cannot prove (above)
        assert await honest.read(lo, hi - lo) == lay.tar[lo:hi]
        await liar.close()
        await honest.close()
        nursery.cancel_scope.cancel()


def shifted_last(lay: FetchLayer) -> Ztoc:
    """The zTOC with its last checkpoint moved to another compressed offset (its window
    kept), and span digests that match the moved bounds: every check of a span's bytes
    passes, and no window after it exists to refute it."""
    ztoc = lay.ztoc
    last = gzip_zinfo_of(ztoc).num_spans - 1
    blob = bytearray(bytes(ztoc.checkpoints))
    at = HEADER_SIZE + last * CHECKPOINT_SIZE
    old_in = int.from_bytes(blob[at : at + 8], "little")
    blob[at : at + 8] = (old_in + 101).to_bytes(8, "little")
    blob[at + 16] = 3
    moved = dataclasses.replace(ztoc, checkpoints=bytes(blob))
    zi = gzip_zinfo_of(moved)
    digests = list(ztoc.span_digests)
    for s in (last - 1, last):
        lo, hi = zi.compressed_bounds(s)
        digests[s] = "sha256:" + hashlib.sha256(lay.blob[lo:hi]).hexdigest()
    return dataclasses.replace(moved, span_digests=digests)


async def test_the_background_pass_proves_the_last_checkpoint_offset(tmp_path: Path) -> None:
    lay = layer()
    ztoc = shifted_last(lay)
    rejections: list[str] = []
    async with trio.open_nursery() as nursery:
        m = await open_manager(
            nursery,
            lay,
            ztoc,
            BlobRangeSource(lay.blob),
            tmp_path,
            fetch_config(readahead_spans=0),
            rejections,
        )
        while (claim := m.claim_missing(1 << 30)) is not None:
            await m.fill(claim)
        with pytest.raises(ZtocRejectedError, match="from its checkpoint"):
            await m.verify_layer()
        assert rejections and m.status()["state"] == "rejected"
        await m.close()
        nursery.cancel_scope.cancel()


async def test_the_background_fetcher_rejects_once_and_leaves_the_layer(tmp_path: Path) -> None:
    lay = layer()
    last = gzip_zinfo_of(lay.ztoc).num_spans - 1
    config = fetch_config(silence_period_msec=0, fetch_period_msec=20, readahead_spans=0)
    fetcher = BackgroundFetcher(config, ForegroundActivity())
    rejections: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        m = await open_manager(
            nursery, lay, lying(lay.ztoc, [last]), BlobRangeSource(lay.blob), tmp_path, config,
            rejections,
        )  # fmt: skip
        calls = 0
        verify = m.verify_layer

        async def counted() -> bool:
            nonlocal calls
            calls += 1
            return await verify()

        m.verify_layer = counted  # type: ignore[method-assign]
        fetcher.add(m)
        with trio.fail_after(20):
            while not m.rejected:
                await trio.sleep(0.01)
        await trio.sleep(1.5)  # past the first retry backoff (1 s): no retry may come
        assert calls == 1 and len(rejections) == 1
        assert fetcher._next_job() is None
        await fetcher.close()
        await m.close()
        nursery.cancel_scope.cancel()


def test_the_disk_cache_keeps_each_ztocs_inflated_spans_apart(tmp_path: Path) -> None:
    """Decompressed spans on disk are trusted only by a handle of the zTOC that inflated them
    (the data plane keys them by layer id): another image's index for the same layer digest
    inflates its own, even after a restart."""
    disk = DiskCache(tmp_path, 1 << 30)
    liar = disk.open_layer("sha256:" + "c" * 64, 100, uncompressed_size=1000, inflated_key="L")
    honest = disk.open_layer("sha256:" + "c" * 64, 100, uncompressed_size=1000, inflated_key="H")
    wrong = b"w" * 10
    liar.write_inflated(0, 0, wrong, hashlib.sha256(wrong).hexdigest())
    assert set(liar.inflated_spans()) == {0}
    assert honest.inflated_spans() == {}
    liar.close()
    honest.close()
    again = DiskCache(tmp_path, 1 << 30)
    for key, spans in (("H", set()), ("L", {0}), ("", set())):
        handle = again.open_layer(
            "sha256:" + "c" * 64, 100, uncompressed_size=1000, inflated_key=key
        )
        assert set(handle.inflated_spans()) == spans
        handle.close()
