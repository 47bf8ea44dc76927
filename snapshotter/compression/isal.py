"""Intel ISA-L's inflate (libisal2, through ctypes): about twice zlib's speed on x86.

Serving a span is mostly inflating it, so its speed is what a cold start waits for. ISA-L has
what random access into gzip needs: a preset dictionary (`isal_inflate_set_dict`) and a bit
buffer that can be primed with the bits a checkpoint starts in the middle of a byte with
(`read_in`/`read_in_length`, the fields after `next_in`). Only the stable head of
`struct inflate_state` is touched (its first fields, at the offsets of ISA-L 2.30's
igzip_lib.h, which a self-check proves at load); the rest of the state is ISA-L's, in a buffer
larger than the struct.

`RawInflater` inflates one raw deflate stream and stops at its end: a gzip member boundary
inside a span run is left to the zlib path (compression.gzip), which handles it. Without
libisal (or when its self-check fails) `available()` is False and zlib does everything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import struct
import zlib
from typing import Final

from snapshotter.compression.zlib import Buffer, Pin, WritableBuffer
from snapshotter.errors import CompressionError

log = logging.getLogger(__name__)

_STATE_BYTES: Final = 128 * 1024
"""Room for `struct inflate_state` (87,368 bytes in ISA-L 2.30)."""
_NEXT_OUT, _AVAIL_OUT, _NEXT_IN, _READ_IN, _AVAIL_IN, _READ_IN_LENGTH = 0, 8, 16, 24, 32, 36
ISAL_DECOMP_OK: Final = 0


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("isal")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn, args in (
        ("isal_inflate_init", [ctypes.c_void_p]),
        ("isal_inflate_set_dict", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]),
        ("isal_inflate", [ctypes.c_void_p]),
    ):
        f = getattr(lib, fn, None)
        if f is None:
            return None
        f.argtypes = args
        f.restype = None if fn == "isal_inflate_init" else ctypes.c_int
    return lib


_LIB: Final = _load()


class RawInflater:
    """One raw deflate stream, optionally started mid-byte and with a preset window."""

    __slots__ = ("_addr", "_state", "finished")

    def __init__(self, window: bytes, bits: int = 0, first: int = 0) -> None:
        """Start with the 32 KiB `window` as history; when `bits` (1..7), the stream begins
        with the top `bits` bits of the byte `first`."""
        if _LIB is None:
            raise CompressionError("ISA-L (libisal) is not available")
        self._state = ctypes.create_string_buffer(_STATE_BYTES)
        self._addr = ctypes.addressof(self._state)
        self.finished = False
        """The stream's last block has ended (what follows is a gzip trailer)."""
        _LIB.isal_inflate_init(self._addr)
        if window:
            buf = ctypes.create_string_buffer(window, len(window))
            if _LIB.isal_inflate_set_dict(self._addr, buf, len(window)) != ISAL_DECOMP_OK:
                raise CompressionError("ISA-L refused the checkpoint window")
        if bits:
            struct.pack_into("<Q", self._state, _READ_IN, first >> (8 - bits))
            struct.pack_into("<i", self._state, _READ_IN_LENGTH, bits)

    def inflate(
        self, src: Buffer, out: WritableBuffer, in_pos: int, out_pos: int
    ) -> tuple[int, int]:
        """Inflate `src[in_pos:]` into `out[out_pos:]`; (consumed, produced). Bits ISA-L
        took into its bit buffer count as consumed. Corrupt data raises CompressionError."""
        pin_in, pin_out = Pin(src, writable=False), Pin(out, writable=True)
        try:
            if not (0 <= in_pos <= pin_in.size and 0 <= out_pos <= pin_out.size):
                raise ValueError("inflate positions out of range")
            avail_in, avail_out = pin_in.size - in_pos, pin_out.size - out_pos
            st = self._state
            struct.pack_into("<QI", st, _NEXT_OUT, pin_out.address + out_pos, avail_out)
            struct.pack_into("<Q", st, _NEXT_IN, pin_in.address + in_pos)
            struct.pack_into("<I", st, _AVAIL_IN, avail_in)
            assert _LIB is not None
            ret = _LIB.isal_inflate(self._addr)
        finally:
            pin_in.release()
            pin_out.release()
        if ret < 0:
            raise CompressionError(f"ISA-L inflate failed ({ret}): corrupt deflate data")
        (left_out,) = struct.unpack_from("<I", st, _AVAIL_OUT)
        (left_in,) = struct.unpack_from("<I", st, _AVAIL_IN)
        consumed, produced = avail_in - left_in, avail_out - left_out
        if ret == ISAL_DECOMP_OK and left_out and left_in:
            self.finished = True  # it stopped with input and room left: the last block ended
        return consumed, produced


def inflate_run(window: bytes, bits: int, src: Buffer, want: int) -> bytearray | None:
    """Exactly `want` bytes inflated from the raw deflate data `src` (its first byte carrying
    `bits` bits when bits), or None when ISA-L cannot give them: the deflate stream ends first
    (a gzip member boundary inside the run) or the data is short or corrupt. The caller's zlib
    path then does it, and says what is wrong when something is."""
    view = memoryview(src).cast("B")
    if bits and not len(view):
        return None
    first, pos = (view[0], 1) if bits else (0, 0)
    out = bytearray(want)
    try:
        _, produced = RawInflater(window, bits, first).inflate(view, out, pos, 0)
    except CompressionError:
        return None
    return out if produced == want else None


def _self_check() -> bool:
    """Inflate a known stream, primed mid-byte, with a window: the fields are where we think."""
    window = bytes(range(256)) * 128
    data = b"checkpoint " * 3000 + window[:5000]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=window)
    stream = comp.compress(data) + comp.flush()
    # Shift the stream by 3 bits: the first byte carries them in its top bits.
    value = int.from_bytes(stream, "little") << 5
    shifted = value.to_bytes(len(stream) + 1, "little")
    out = inflate_run(window, 3, shifted, len(data))
    return out is not None and bytes(out) == data


@functools.cache
def available() -> bool:
    """Whether span inflation can use ISA-L here."""
    if _LIB is None:
        log.info("libisal not found: spans are inflated with zlib (about half the speed)")
        return False
    if not _self_check():
        log.warning("libisal failed its self-check: spans are inflated with zlib")
        return False
    return True
