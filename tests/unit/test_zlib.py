"""The ctypes libz binding against CPython's zlib module."""

from __future__ import annotations

import random
import threading
import zlib as pyzlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.compression.zlib import (
    DATA_TYPE_BLOCK_END,
    WBITS_AUTO,
    WBITS_GZIP,
    WBITS_RAW,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_OK,
    Z_STREAM_END,
    Inflater,
)
from snapshotter.errors import CompressionError


def _deflate(data: bytes, level: int, wbits: int) -> bytes:
    c = pyzlib.compressobj(level, pyzlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def _inflate_all(inf: Inflater, src: bytes, flush: int, in_step: int, out_step: int) -> bytes:
    out = bytearray(out_step)
    result = bytearray()
    pos = 0
    while True:
        end = min(len(src), pos + in_step)
        ret, consumed, produced, _ = inf.inflate(memoryview(src)[:end], out, flush, in_pos=pos)
        pos += consumed
        result += out[:produced]
        if ret == Z_STREAM_END:
            return bytes(result)
        assert ret in (Z_OK, Z_BUF_ERROR)
        if ret == Z_BUF_ERROR:
            assert pos == len(src), "no progress while input remained"
            raise AssertionError("truncated")


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 1000),
    size=st.integers(0, 200_000),
    level=st.sampled_from([0, 1, 6, 9]),
    wbits=st.sampled_from([(WBITS_RAW, -15), (WBITS_GZIP, 31), (WBITS_AUTO, 31), (15, 15)]),
    flush=st.sampled_from([0, Z_BLOCK]),
    in_step=st.sampled_from([1, 100, 1 << 20]),
    out_step=st.sampled_from([1, 1000, 1 << 20]),
)
def test_inflate_matches_python_zlib(
    seed: int,
    size: int,
    level: int,
    wbits: tuple[int, int],
    flush: int,
    in_step: int,
    out_step: int,
) -> None:
    rnd = random.Random(seed)
    data = bytes(rnd.choice(b"abcdefgh") for _ in range(size // 2)) + rnd.randbytes(size // 2)
    if in_step == 1 or out_step == 1:
        data = data[:3000]
    ours_wbits, their_wbits = wbits
    src = _deflate(data, level, their_wbits)
    with Inflater(ours_wbits) as inf:
        assert _inflate_all(inf, src, flush, in_step, out_step) == data


def test_block_boundaries_prime_and_dictionary() -> None:
    """Restart mid-stream at every block boundary from (bits, window) alone."""
    rnd = random.Random(1)
    letters = bytes.maketrans(bytes(range(256)), b"abcdefghijklmnop" * 16)
    data = b"".join(
        rnd.randbytes(500) + rnd.randbytes(rnd.randrange(20_000)).translate(letters)
        for _ in range(30)
    )
    src = _deflate(data, 6, -15)
    out = bytearray(len(data))
    boundaries = []
    with Inflater(WBITS_RAW) as inf:
        pos = done = 0
        while True:
            ret, consumed, produced, dt = inf.inflate(src, out, Z_BLOCK, in_pos=pos, out_pos=done)
            pos += consumed
            done += produced
            if ret == Z_STREAM_END:
                break
            if dt & DATA_TYPE_BLOCK_END and not dt & 64 and done:
                window = inf.get_dictionary()
                assert window == data[max(0, done - 32768) : done]
                boundaries.append((pos, done, dt & 7, window))
    assert bytes(out) == data
    assert len(boundaries) > 5
    assert any(bits for _, _, bits, _ in boundaries)
    for cin, cout, bits, window in boundaries:
        with Inflater(WBITS_RAW) as inf:
            start = cin
            if bits:
                inf.prime(bits, src[cin - 1] >> (8 - bits))
            inf.set_dictionary(window)
            rest = bytearray(len(data) - cout)
            ret, _, produced, _ = inf.inflate(src, rest, in_pos=start)
            assert ret == Z_STREAM_END
            assert produced == len(rest) and bytes(rest) == data[cout:]


def test_errors_are_typed() -> None:
    with Inflater(WBITS_GZIP) as inf, pytest.raises(CompressionError, match="header"):
        inf.inflate(b"not gzip at all", bytearray(100))
    bad = bytearray(_deflate(b"hello world" * 100, 6, 31))
    bad[-2] ^= 0xFF  # length in the trailer
    with Inflater(WBITS_GZIP) as inf, pytest.raises(CompressionError, match="length"):
        inf.inflate(bytes(bad), bytearray(5000))
    zlib_with_dict = pyzlib.compressobj(zdict=b"dictionary")
    src = zlib_with_dict.compress(b"data") + zlib_with_dict.flush()
    with Inflater(15) as inf, pytest.raises(CompressionError, match="NEED_DICT"):
        inf.inflate(src, bytearray(100))
    # Truncation is reported as Z_BUF_ERROR, for the caller to judge.
    src = _deflate(b"x" * 1000, 6, -15)
    with Inflater(WBITS_RAW) as inf:
        ret, consumed, _, _ = inf.inflate(src[:2], bytearray(2000))
        assert ret == Z_OK and consumed == 2
        ret, consumed, produced, _ = inf.inflate(b"", bytearray(2000))
        assert (ret, consumed, produced) == (Z_BUF_ERROR, 0, 0)


def test_lifecycle_and_buffer_types() -> None:
    inf = Inflater(WBITS_RAW)
    src = _deflate(b"abc" * 100, 6, -15)
    out = bytearray(300)
    with pytest.raises(TypeError):
        inf.inflate(src, b"read-only output")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        inf.inflate(src, out, in_pos=len(src) + 1)
    assert inf.inflate(bytearray(src), memoryview(out))[0] == Z_STREAM_END
    assert bytes(out) == b"abc" * 100
    inf.release_buffers()
    out.extend(b"!")  # no longer pinned
    inf.close()
    inf.close()
    with pytest.raises(ValueError):
        inf.inflate(src, out)
    with pytest.raises(ValueError):
        inf.reset(WBITS_RAW)


def test_threads_share_nothing() -> None:
    """Independent inflaters in parallel threads (ctypes releases the GIL)."""
    data = random.Random(2).randbytes(300_000) * 3
    src = _deflate(data, 6, 31)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                with Inflater(WBITS_AUTO) as inf:
                    out = bytearray(len(data))
                    ret, _, produced, _ = inf.inflate(src, out)
                    assert ret == Z_STREAM_END and produced == len(data) and out == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
