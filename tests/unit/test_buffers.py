"""BufferPool: buffers come back for reuse only when given back, within their bounds; a
finished SpanStreamInflater hands its buffer over (closing it then does not recycle it)."""

from __future__ import annotations

import pytest

from snapshotter.compression.buffers import BufferPool
from snapshotter.compression.span_stream import SpanStreamInflater
from tests.fixtures.range_source import gzip_zinfo_of, make_layer


def test_reuse_and_bounds() -> None:
    pool = BufferPool(keep=2, max_kept_bytes=1 << 20)
    a = pool.take(1000)
    assert len(a) == 1000 and not a.readonly
    under = a.obj
    pool.give(a)
    b = pool.take(900)  # the kept buffer fits: reused
    assert b.obj is under and len(b) == 900
    c = pool.take(900)  # nothing free: a new one
    c_obj = c.obj
    assert c_obj is not under
    big = pool.take(2 << 20)
    big_obj = big.obj
    pool.give(big)  # too big to keep
    assert pool.take(2 << 20).obj is not big_obj
    pool.give(b)
    pool.give(c)
    assert {id(pool.take(1).obj), id(pool.take(1).obj)} == {id(under), id(c_obj)}


def test_finished_stream_keeps_its_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BufferPool()
    monkeypatch.setattr("snapshotter.compression.span_stream.SPAN_BUFFERS", pool)
    lay = make_layer(31, span_size=16 << 10)
    info = gzip_zinfo_of(lay.ztoc)
    lo, hi = info.compressed_bounds(1)
    u0, u1 = info.uncompressed_bounds(1)
    stream = SpanStreamInflater(info, 1, 1)
    stream.feed(lay.blob[lo:hi])
    out = stream.finish()
    under = out.obj
    stream.close()
    assert pool.take(u1 - u0).obj is not under  # still the caller's
    assert bytes(out) == lay.tar[u0:u1]
    pool.give(out)
    assert pool.take(u1 - u0).obj is under  # given back: reused
    failed = SpanStreamInflater(info, 1, 1)
    failed_buf = failed._out.obj
    failed.close()  # never finished: its buffer goes back
    assert pool.take(u1 - u0).obj is failed_buf
