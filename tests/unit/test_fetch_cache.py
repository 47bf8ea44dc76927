"""DiskCache: sparse per-layer files, span log, size bound with LRU eviction of unused layers."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from snapshotter.errors import FormatError
from snapshotter.fetch.cache import DiskCache, layer_dir_name


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def test_write_read_log_and_reopen(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 30)
    layer = cache.open_layer(digest(1), 1 << 20)
    assert layer.present_spans() == set()
    layer.write(4096, b"abc")
    layer.mark([3, 5])
    layer.mark(range(7, 9))
    assert layer.read(4095, 4099) == b"\0abc"
    layer.close()
    with pytest.raises(ValueError):
        layer.read(0, 1)
    # A torn last line is ignored.
    log_file = tmp_path / layer_dir_name(digest(1)) / "spans"
    with open(log_file, "ab") as f:
        f.write(b"1x")
    again = DiskCache(tmp_path, 1 << 30).open_layer(digest(1), 1 << 20)
    assert again.present_spans() == {3, 5, 7, 8}
    assert again.read(4096, 4099) == b"abc"
    # Sparse: a few written bytes do not allocate the whole layer.
    assert os.stat(tmp_path / layer_dir_name(digest(1)) / "blob").st_blocks * 512 < 1 << 20


def test_size_change_starts_over(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 30)
    layer = cache.open_layer(digest(1), 100)
    layer.write(0, b"x" * 100)
    layer.mark([0])
    layer.close()
    layer = cache.open_layer(digest(1), 200)
    assert layer.present_spans() == set()
    assert layer.read(0, 100) == bytes(100)


def test_shared_handles_and_bounds(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 30)
    a = cache.open_layer(digest(1), 10)
    b = cache.open_layer(digest(1), 10)
    with pytest.raises(FormatError):
        cache.open_layer(digest(1), 11)
    a.write(0, b"0123456789")
    assert b.read(0, 10) == b"0123456789"
    with pytest.raises(ValueError):
        a.write(5, b"123456")
    a.close()
    assert b.read(0, 2) == b"01"
    b.close()
    assert not cache.remove_layer(digest(9))
    assert cache.remove_layer(digest(1))
    assert cache.cached_layers() == []


@pytest.mark.parametrize("bad", ["sha256:../../etc", "md5:abc", "sha256:" + "A" * 64, ""])
def test_invalid_digests(tmp_path: Path, bad: str) -> None:
    with pytest.raises(FormatError):
        DiskCache(tmp_path, 1).open_layer(bad, 1)


def test_whole_blob_digest_and_clear(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    cache = DiskCache(tmp_path, 1 << 30)
    layer = cache.open_layer(digest(1), len(data))
    layer.write(0, data)
    assert layer.blob_digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    layer.mark([0])
    layer.clear()
    assert layer.present_spans() == set()
    assert cache.usage() == 0


def test_eviction_lru_and_in_use(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mib = 1 << 20
    cache = DiskCache(tmp_path, 3 * mib)
    for i in range(3):
        layer = cache.open_layer(digest(i), mib)
        layer.write(0, b"x" * mib)
        layer.close()
        time.sleep(0.01)  # distinct mtimes
    assert cache.usage() == 3 * mib
    # Use layer 0 again: layer 1 becomes the least recently used.
    cache.open_layer(digest(0), mib).close()
    time.sleep(0.01)
    layer3 = cache.open_layer(digest(3), mib)
    layer3.write(0, b"y" * mib)
    assert sorted(cache.cached_layers()) == sorted([digest(0), digest(2), digest(3)])
    assert cache.usage() <= 3 * mib
    # A restarted cache sees the same layers and the same order.
    layer3.close()
    restarted = DiskCache(tmp_path, 3 * mib)
    assert restarted.usage() == 3 * mib
    # Everything in use: the bound cannot be kept, which is reported, not enforced.
    handles = [restarted.open_layer(d, mib) for d in restarted.cached_layers()]
    big = restarted.open_layer(digest(4), 2 * mib)
    with caplog.at_level(logging.WARNING):
        big.write(0, b"z" * 2 * mib)
    assert "over its bound" in caplog.text
    assert restarted.usage() == 5 * mib
    for h in handles:
        h.close()
    # Releasing handles lets eviction bring the cache back under the bound.
    assert restarted.usage() <= 3 * mib
    assert digest(4) in restarted.cached_layers()
    big.close()


def test_inflated_store(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 30)
    plain = cache.open_layer(digest(1), 100)
    assert not plain.keeps_inflated and plain.inflated_spans() == {}
    with pytest.raises(ValueError):
        plain.write_inflated(0, 0, b"x", "0" * 64)
    plain.close()
    layer = cache.open_layer(digest(1), 100, uncompressed_size=1 << 20)
    assert layer.keeps_inflated
    data = b"y" * 5000
    hexd = hashlib.sha256(data).hexdigest()
    layer.write_inflated(2, 8192, data, hexd)
    assert layer.inflated_spans() == {2: hexd}
    assert layer.read_inflated(8191, 8192 + 5001) == b"\0" + data + b"\0"
    with pytest.raises(ValueError):
        layer.write_inflated(3, (1 << 20) - 10, data, hexd)
    with pytest.raises(ValueError):
        layer.read_inflated(0, (1 << 20) + 1)
    # The decompressed bytes count against the bound.
    usage = cache.usage()
    assert usage >= 8192
    assert layer.fits((1 << 30) - usage) and not layer.fits((1 << 30) - usage + 1)
    layer.close()
    # Torn or malformed log lines are skipped; the store survives a reopen.
    log_file = tmp_path / layer_dir_name(digest(1)) / "inflated-spans"
    with open(log_file, "ab") as f:
        f.write(b"4 " + b"z" * 64 + b"\n5 abc\n6 " + hexd[:40].encode())
    again = DiskCache(tmp_path, 1 << 30)
    assert again.usage() >= usage  # measured at start, decompressed file included
    layer = again.open_layer(digest(1), 100, uncompressed_size=1 << 20)
    assert layer.inflated_spans() == {2: hexd}
    with pytest.raises(FormatError):
        again.open_layer(digest(1), 100, uncompressed_size=1 << 21)
    layer.clear()
    assert layer.inflated_spans() == {}
    assert layer.read_inflated(8192, 8200) == bytes(8)
    layer.close()
    # A different tar size means a stale store: it starts over.
    layer = again.open_layer(digest(1), 100, uncompressed_size=1 << 20)
    layer.write_inflated(0, 0, data, hexd)
    layer.close()
    layer = again.open_layer(digest(1), 100, uncompressed_size=1 << 19)
    assert layer.inflated_spans() == {}
